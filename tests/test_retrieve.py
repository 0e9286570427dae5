"""Planning systems pull results: DCMTK findscu, movescu and getscu, and a real Orthanc, against the node's Q/R SCP."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, JobState, Series
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import Node, Orthanc, data_set_bytes, free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

PHANTOM = PhantomSpec(rows=96, columns=96, slices=30, pixel_spacing=(3.5, 3.5), slice_spacing=5.0)
PLANNER = "PLANNER"


@dataclass
class ProcessedStudy:
    node: Node
    study_uid: str
    ct_series_uid: str
    planner_port: int
    orthanc: Orthanc  # configured, not started: the test that needs it starts it


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessedStudy]:
    """A node that has received and segmented a phantom CT; PLANNER and Orthanc may pull and be moved to."""
    workdir = tmp_path_factory.mktemp("retrieve")
    planner_port, node_port = free_port(), free_port()
    orthanc = Orthanc(workdir / "orthanc", {"node": ["DICOMNODE", "127.0.0.1", node_port]})
    node = Node(
        workdir / "node",
        {
            "network": {"port": node_port},
            "peers": {
                "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
                "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
                "orthanc": {"ae_title": orthanc.ae_title, "hosts": ["127.0.0.1"], "roles": ["find", "move"]},
            },
            "destinations": {
                "planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port},
                "orthanc": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port},
            },
            "rules": [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
            "results": {"segmentation_types": ["BINARY"], "rtstruct": True},
            "inference": {"workers": 1},
        },
    ).start()
    try:
        phantom = write_phantom_series(workdir / "ct", PHANTOM)
        sent = storescu(node.port, phantom.files)
        assert sent.returncode == 0, sent.stderr
        node.wait_for_state(phantom.series_instance_uid, JobState.DONE, timeout=120)
        yield ProcessedStudy(node, phantom.study_instance_uid, phantom.series_instance_uid, planner_port, orthanc)
    finally:
        node.stop()
        orthanc.stop()


def result_series(node: Node, modality: str) -> tuple[str, Path]:
    """The UID and stored file of the node's result series of ``modality``."""
    with node.sessions() as session:
        series = session.scalars(
            select(Series).where(Series.modality == modality, Series.source_job_id.is_not(None))
        ).one()
        path = session.scalars(select(Instance.path).where(Instance.series_id == series.id)).one()
        return series.series_instance_uid, Path(path)


def findscu(node: Node, out: Path, *keys: str, calling_ae: str = PLANNER, model: str = "-S") -> list[pydicom.Dataset]:
    """C-FIND with DCMTK findscu; the responses it extracted (-X), in order."""
    out.mkdir(parents=True, exist_ok=True)
    command = [require_tool("findscu"), "-v", model, "-aet", calling_ae, "-aec", node.ae_title, "-X", "-od", str(out)]
    command += [arg for key in keys for arg in ("-k", key)] + ["127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Received Final Find Response (Success)" in output, output
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_find_at_study_series_and_image_level(processed: ProcessedStudy, tmp_path: Path) -> None:
    node, study = processed.node, processed.study_uid
    studies = findscu(
        node,
        tmp_path / "study",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study}",
        "PatientID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "StudyDate",
    )
    assert len(studies) == 1
    assert set(studies[0].ModalitiesInStudy) == {"CT", "SEG", "SR", "RTSTRUCT"}
    assert int(studies[0].NumberOfStudyRelatedSeries) == 4
    assert int(studies[0].NumberOfStudyRelatedInstances) == PHANTOM.slices + 3
    assert studies[0].RetrieveAETitle == node.ae_title

    seg_uid, _ = result_series(node, "SEG")
    segs = findscu(
        node,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "Modality=SEG",
        "SeriesInstanceUID",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    )
    assert [s.SeriesInstanceUID for s in segs] == [seg_uid]
    assert "baseline" in segs[0].SeriesDescription
    assert int(segs[0].NumberOfSeriesRelatedInstances) == 1

    images = findscu(
        node,
        tmp_path / "image",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study}",
        f"SeriesInstanceUID={processed.ct_series_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
        "SOPClassUID",
    )
    assert len(images) == PHANTOM.slices
    assert {i.SOPClassUID for i in images} == {pydicom.uid.CTImageStorage}


def test_find_matching_wildcards_ranges_and_uid_lists(processed: ProcessedStudy, tmp_path: Path) -> None:
    node, study = processed.node, processed.study_uid
    ct = processed.ct_series_uid
    seg_uid, _ = result_series(node, "SEG")
    by_list = findscu(
        node,
        tmp_path / "list",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        f"SeriesInstanceUID={ct}\\{seg_uid}",
        "Modality",
    )
    assert sorted(s.Modality for s in by_list) == ["CT", "SEG"]
    by_wildcard = findscu(
        node, tmp_path / "wild", "QueryRetrieveLevel=SERIES", "Modality=R?STRUC*", "SeriesInstanceUID"
    )
    assert len(by_wildcard) == 1
    in_range = findscu(
        node, tmp_path / "range", "QueryRetrieveLevel=STUDY", "StudyDate=19000101-29991231", "StudyInstanceUID"
    )
    assert [s.StudyInstanceUID for s in in_range] == [study]
    out_of_range = findscu(
        node, tmp_path / "none", "QueryRetrieveLevel=STUDY", "StudyDate=-19000101", "StudyInstanceUID"
    )
    assert out_of_range == []
    patients = findscu(
        node,
        tmp_path / "patient",
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "NumberOfPatientRelatedStudies",
        model="-P",
    )
    assert len(patients) == 1 and int(patients[0].NumberOfPatientRelatedStudies) == 1


def test_move_sends_the_seg_byte_identical_to_a_known_destination(processed: ProcessedStudy, tmp_path: Path) -> None:
    node = processed.node
    seg_uid, stored = result_series(node, "SEG")
    received = tmp_path / "planner"
    received.mkdir()
    scp = subprocess.Popen(
        [require_tool("storescp"), "-aet", PLANNER, "-od", str(received), str(processed.planner_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        result = movescu(
            node,
            PLANNER,
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={processed.study_uid}",
            f"SeriesInstanceUID={seg_uid}",
        )
        assert "Received Final Move Response (Success)" in result, result
        files = wait_for(lambda: list(received.iterdir()), timeout=10, what="the moved SEG")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert len(files) == 1
    assert data_set_bytes(files[0]) == data_set_bytes(stored)


def movescu(node: Node, destination: str, *keys: str, calling_ae: str = PLANNER) -> str:
    command = [require_tool("movescu"), "-v", "-S", "-aet", calling_ae, "-aec", node.ae_title, "-aem", destination]
    command += [arg for key in keys for arg in ("-k", key)] + ["127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def test_get_returns_seg_and_rtstruct_byte_identical(processed: ProcessedStudy, tmp_path: Path) -> None:
    node = processed.node
    for modality in ("SEG", "RTSTRUCT"):
        series_uid, stored = result_series(node, modality)
        out = tmp_path / modality
        out.mkdir()
        command = [
            require_tool("getscu"),
            "-v",
            "-S",
            "+B",
            "-aet",
            PLANNER,
            "-aec",
            node.ae_title,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={processed.study_uid}",
            "-k",
            f"SeriesInstanceUID={series_uid}",
            "127.0.0.1",
            str(node.port),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        files = list(out.iterdir())
        assert len(files) == 1, result.stdout + result.stderr
        assert data_set_bytes(files[0]) == data_set_bytes(stored)


def test_unknown_move_destination_is_refused(processed: ProcessedStudy) -> None:
    seg_uid, _ = result_series(processed.node, "SEG")
    result = movescu(
        processed.node,
        "NOBODY",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={processed.study_uid}",
        f"SeriesInstanceUID={seg_uid}",
    )
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in result, result
    assert "unknown move destination 'NOBODY'" in processed.node.log()


def test_a_caller_that_is_no_peer_cannot_query(processed: ProcessedStudy, tmp_path: Path) -> None:
    command = [
        require_tool("findscu"),
        "-S",
        "-aet",
        "INTRUDER",
        "-aec",
        processed.node.ae_title,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(processed.node.port),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr


def test_orthanc_queries_the_node_and_retrieves_the_rtstruct(processed: ProcessedStudy) -> None:
    node, orthanc = processed.node, processed.orthanc.start()
    query = orthanc.post_json(
        "/modalities/node/query",
        {"Level": "Series", "Query": {"StudyInstanceUID": processed.study_uid, "Modality": "RTSTRUCT"}},
    )
    answers = orthanc.get(f"{query['Path']}/answers?expand")
    assert len(answers) == 1
    # Orthanc retrieves with a C-MOVE to itself: the node knows it as a destination.
    orthanc.post_json(f"{query['Path']}/answers/0/retrieve", {"TargetAet": orthanc.ae_title, "Synchronous": True})
    series_uid, stored = result_series(node, "RTSTRUCT")
    found = orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}})
    assert len(found) == 1
    copy = node.workdir / "rtstruct-from-orthanc.dcm"
    copy.write_bytes(orthanc.request_bytes(f"/instances/{found[0]}/file"))
    assert data_set_bytes(copy) == data_set_bytes(stored)


def test_show_lists_the_result_series_the_node_holds(processed: ProcessedStudy) -> None:
    shown = processed.node.cli("show", processed.ct_series_uid).stdout
    for modality in ("SEG", "SR", "RTSTRUCT"):
        series_uid, _ = result_series(processed.node, modality)
        assert f"{modality:<8} {series_uid}" in shown, shown


def test_a_stored_file_shortened_on_disk_is_not_sent_and_is_named(start_node, tmp_path: Path) -> None:
    """A file cut short on disk (a failing disk, a copy interrupted by hand) was sent by C-GET as if whole."""
    node = start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]},
        },
        inference={"workers": 0},
        completion={"quiet_seconds": 600},
    )
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))
    assert storescu(node.port, series.files).returncode == 0
    with node.sessions() as session:
        damaged = Path(session.scalars(select(Instance.path).order_by(Instance.id).limit(1)).one())
        uid = session.scalars(select(Instance.sop_instance_uid).where(Instance.path == str(damaged))).one()
    whole = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:300])

    out = tmp_path / "got"
    out.mkdir()
    command = [require_tool("getscu"), "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)

    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"CT.{other}" for other in series.sop_instance_uids if other != uid
    )
    assert (
        f"the stored file of instance {uid} is 300 bytes, but it was stored with {whole:,}: it was changed or "
        "damaged on disk, so it is not sent" in node.log()
    )


def getscu(node: Node, out: Path, *keys: str, calling_ae: str = PLANNER, model: str = "-S", log: str = "-v") -> str:
    """C-GET with DCMTK getscu into ``out``; its output (``log="-d"``: with the responses' elements)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [require_tool("getscu"), log, model, "-aet", calling_ae, "-aec", node.ae_title, "-od", str(out)]
    command += [arg for key in keys for arg in ("-k", key)] + ["127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def rewritten(source: Path, folder: Path, **values: str) -> Path:
    """A copy of ``source`` with new values (a new SOP Instance UID unless given), as a PACS might send it."""
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = values.pop("SOPInstanceUID", pydicom.uid.generate_uid())
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


QR_PEERS = {
    "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
    "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]},
}


def test_another_patients_image_sent_into_a_stored_series_is_neither_answered_nor_sent(start_node, tmp_path) -> None:
    """A PACS sends patient C's image with the Study and Series UIDs of patient A's stored series. Admission fails
    the series, but the instance is stored: an IMAGE-level C-FIND answered it with A's PatientID and name, and a
    C-GET of A's series delivered it."""
    node = start_node(peers=QR_PEERS, completion={"quiet_seconds": 600})
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=3))
    assert storescu(node.port, series.files).returncode == 0
    foreign = rewritten(series.files[0], tmp_path / "foreign", PatientID="PAT-C", PatientName="Charlie^Carl")
    sent = storescu(node.port, [foreign])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with node.sessions() as session:  # stored and recorded: only Query/Retrieve keeps it out
        assert len(session.scalars(select(Instance.id)).all()) == 4

    keys = [f"StudyInstanceUID={series.study_instance_uid}", f"SeriesInstanceUID={series.series_instance_uid}"]
    asked = findscu(node, tmp_path / "one", "QueryRetrieveLevel=IMAGE", *keys, f"SOPInstanceUID={foreign.stem}")
    listed = findscu(node, tmp_path / "all", "QueryRetrieveLevel=IMAGE", *keys, "SOPInstanceUID", "PatientID")
    output = getscu(node, tmp_path / "got", "QueryRetrieveLevel=SERIES", *keys)

    assert asked == []
    assert sorted(str(r.SOPInstanceUID) for r in listed) == sorted(series.sop_instance_uids)
    assert {str(r.PatientID) for r in listed} == {"PHANTOM-1"}
    got = [pydicom.dcmread(path) for path in (tmp_path / "got").iterdir()]
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(series.sop_instance_uids), output
    assert {(str(d.PatientID), str(d.PatientName)) for d in got} == {("PHANTOM-1", "Phantom^Synthetic")}


def test_findscu_finds_a_name_whatever_empty_trailing_components_either_side_spells_out(start_node, tmp_path) -> None:
    """DOE^JOHN^^ is DOE^JOHN (PS3.5 6.2.1): a planning system asking for DOE^JOHN did not find the study a modality
    sent as DOE^JOHN^^, nor the reverse. Case still counts."""
    node = start_node(peers=QR_PEERS, completion={"quiet_seconds": 600})
    names = {"PAT-PADDED": "DOE^JOHN^^", "PAT-PLAIN": "DOE^JOHN", "PAT-LOWER": "doe^john", "PAT-OTHER": "ROE^JANE"}
    for seed, (patient_id, name) in enumerate(names.items()):
        spec = PhantomSpec(rows=32, columns=32, slices=1, seed=seed, patient_id=patient_id, patient_name=name)
        sent = storescu(node.port, write_phantom_series(tmp_path / patient_id, spec).files)
        assert sent.returncode == 0, sent.stdout + sent.stderr

    def patients(name: str) -> list[str]:
        folder = tmp_path / f"find-{len(list(tmp_path.glob('find-*')))}"
        found = findscu(node, folder, "QueryRetrieveLevel=STUDY", f"PatientName={name}", "PatientID")
        return sorted(str(answer.PatientID) for answer in found)

    assert patients("DOE^JOHN") == ["PAT-PADDED", "PAT-PLAIN"]
    assert patients("DOE^JOHN^^") == ["PAT-PADDED", "PAT-PLAIN"]
    assert patients("DOE*") == ["PAT-PADDED", "PAT-PLAIN"]
    assert patients("*^JOHN") == ["PAT-PADDED", "PAT-PLAIN"]
    assert patients("doe^john^") == ["PAT-LOWER"]


def test_a_patient_level_get_of_a_patient_id_from_two_issuers_is_refused_unless_the_issuer_is_named(
    start_node, tmp_path
) -> None:
    """Patient PHANTOM-1 without an issuer and PHANTOM-1 of OTHER-HOSPITAL are two patients: a PATIENT-level C-GET
    by PatientID alone sent both; a PATIENT-level C-FIND answered them without saying whose ID each was."""
    node = start_node(peers=QR_PEERS, completion={"quiet_seconds": 600})
    ours = write_phantom_series(tmp_path / "ours", PhantomSpec(rows=32, columns=32, slices=2))
    theirs = write_phantom_series(tmp_path / "theirs", PhantomSpec(rows=32, columns=32, slices=2, seed=1))
    other_hospital = [
        rewritten(
            path,
            tmp_path / "other",
            SOPInstanceUID=uid,
            IssuerOfPatientID="OTHER-HOSPITAL",
            PatientName="Echo^Eve",
        )
        for path, uid in zip(theirs.files, theirs.sop_instance_uids, strict=True)
    ]
    assert storescu(node.port, [*ours.files, *other_hospital]).returncode == 0

    patients = findscu(node, tmp_path / "find", "QueryRetrieveLevel=PATIENT", "PatientID=PHANTOM-1", model="-P")
    refused = getscu(
        node, tmp_path / "refused", "QueryRetrieveLevel=PATIENT", "PatientID=PHANTOM-1", model="-P", log="-d"
    )
    named = getscu(
        node,
        tmp_path / "named",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=PHANTOM-1",
        "IssuerOfPatientID=OTHER-HOSPITAL",
        model="-P",
    )

    assert [str(p.get("IssuerOfPatientID", "(not returned)")) for p in patients] == ["", "OTHER-HOSPITAL"]
    assert list((tmp_path / "refused").iterdir()) == [], refused
    assert "DIMSE Status                  : 0xa900" in refused, refused
    assert "[PatientID names several patients: retrieve by StudyInstanceUID]" in refused, refused
    assert (
        "a retrieval by peer planner was refused: the PatientID of this PATIENT-level retrieval belongs to more "
        "than one patient" in node.log()
    )
    got = [pydicom.dcmread(path) for path in (tmp_path / "named").iterdir()]
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(theirs.sop_instance_uids), named
