"""Query/Retrieve answers each person under their own name and serves only the results the node stands behind.

One PatientID whose studies name two people is answered as two patients, and a PATIENT-level retrieval by that
PatientID alone is refused; the results of a series whose job is FAILED (cancelled, or a re-run that failed) are
neither found, counted nor sent until a retry serves them again; ModalitiesInStudy matches only series still held;
a name stored with its ideographic and phonetic groups is found by its alphabetic group alone.

The node is a real ``dicom-node serve`` without workers; the peers are DCMTK storescu, findscu, getscu and movescu.
Results are recorded through the database layer, as a worker records them, so no model runs.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from db import jobs
from db.ingest import record_results
from db.models import JobState
from db.session import transaction
from dicom_node.audit import recent
from dicom_node.phantom import PhantomSeries, PhantomSpec, write_phantom_series
from dicom_node.receive.header import read_file_header
from tests.conftest import CT_RULES, TEST_WORKER, Node, free_port, storescu, wait_for
from tests.test_qr_identity import PLANNER, _dcmtk, _find, _keys
from tests.test_qr_identity import _node as _planner_node

SLICES = 4
RESULT_IMAGES = 2


def _node(start_node, planner_port: int, *, process: bool = False) -> Node:
    """A node whose planner may find, get and move; with ``process``, CT series wait QUEUED (no worker runs)."""
    return _planner_node(start_node, planner_port, **({"rules": CT_RULES} if process else {}))


def _phantom(folder: Path, **spec: object) -> PhantomSeries:
    return write_phantom_series(folder, PhantomSpec(rows=32, columns=32, slices=SLICES, **spec))  # type: ignore[arg-type]


def _stored(node: Node, series: PhantomSeries, state: JobState) -> None:
    sent = storescu(node.port, series.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    node.wait_for_state(series.series_instance_uid, state, timeout=60)


def _move(node: Node, out: Path, planner_port: int, model: str, *keys: str) -> tuple[Counter[str], str]:
    """The Modality (or PatientName) of each instance a C-MOVE to the planner delivered, counted, and the output."""
    out.mkdir(parents=True)
    output = _dcmtk(
        "movescu", node, model, "-aet", PLANNER, "-aec", node.ae_title, "-aem", PLANNER, "--port", str(planner_port),
        "-od", str(out), *_keys(*keys),
    )  # fmt: skip
    return _received(out), output


def _get(node: Node, out: Path, *keys: str) -> Counter[str]:
    out.mkdir(parents=True)
    _dcmtk("getscu", node, "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out), *_keys(*keys))
    return _received(out)


def _received(folder: Path) -> Counter[str]:
    found = [pydicom.dcmread(path, stop_before_pixels=True) for path in folder.iterdir()]
    return Counter(str(d.Modality) for d in found)


def _record_results(node: Node, ct: PhantomSeries, folder: Path) -> str:
    """Record two images of a SEG series of the CT's study as the CT's job's results, as a worker does; their
    Series Instance UID."""
    folder.mkdir()
    series_uid = generate_uid()
    paths = []
    for number, source in enumerate(ct.files[:RESULT_IMAGES], start=1):
        dataset = pydicom.dcmread(source)
        dataset.SeriesInstanceUID, dataset.Modality, dataset.SeriesNumber = series_uid, "SEG", 99
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(folder / f"seg{number}.dcm")
        paths.append(folder / f"seg{number}.dcm")
    with transaction(node.sessions) as session:
        job = jobs.job_for_series_uid(session, ct.series_instance_uid)
        assert job is not None
        record_results(session, job.id, [read_file_header(path) for path in paths])
    return series_uid


def _finish(node: Node, series_uid: str) -> None:
    """Take the QUEUED job and finish it DONE, as a worker whose results need no sending does."""
    with transaction(node.sessions) as session:
        job = jobs.job_for_series_uid(session, series_uid)
        assert job is not None and jobs.claim(session, job, TEST_WORKER, timedelta(minutes=5))
        jobs.finish_processing(session, job, JobState.DONE, "processed by the test")


def _served(node: Node, out: Path, planner_port: int, ct: PhantomSeries, seg_uid: str) -> dict[str, object]:
    """What the planner is told and sent of the study: at every level, in every count, by C-GET and C-MOVE."""
    study, seg = f"StudyInstanceUID={ct.study_instance_uid}", f"SeriesInstanceUID={seg_uid}"
    series = _find(node, out / "series", "-S", "QueryRetrieveLevel=SERIES", study, "Modality")
    (counts,) = _find(
        node, out / "study", "-S", "QueryRetrieveLevel=STUDY", study, "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    (person,) = _find(
        node, out / "patient", "-P", "QueryRetrieveLevel=PATIENT", f"PatientID={PhantomSpec.patient_id}",
        "NumberOfPatientRelatedInstances",
    )  # fmt: skip
    by_modality = _find(node, out / "by-modality", "-S", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=SEG")
    images = _find(node, out / "images", "-S", "QueryRetrieveLevel=IMAGE", study, seg, "SOPInstanceUID")
    moved, _ = _move(node, out / "moved", planner_port, "-S", "QueryRetrieveLevel=STUDY", study)
    modalities = counts.ModalitiesInStudy
    return {
        "series": sorted(str(d.Modality) for d in series),
        "study": (
            [str(m) for m in modalities] if isinstance(modalities, MultiValue) else [str(modalities)],
            counts.NumberOfStudyRelatedSeries,
            counts.NumberOfStudyRelatedInstances,
        ),
        "patient instances": person.NumberOfPatientRelatedInstances,
        "studies with a SEG": len(by_modality),
        "SEG images": len(images),
        "got": _get(node, out / "got", "QueryRetrieveLevel=STUDY", study),
        "moved": moved,
        "got by series": _get(node, out / "got-series", "QueryRetrieveLevel=SERIES", study, seg),
    }


WITH_RESULTS = {
    "series": ["CT", "SEG"],
    "study": (["CT", "SEG"], 2, SLICES + RESULT_IMAGES),
    "patient instances": SLICES + RESULT_IMAGES,
    "studies with a SEG": 1,
    "SEG images": RESULT_IMAGES,
    "got": Counter({"CT": SLICES, "SEG": RESULT_IMAGES}),
    "moved": Counter({"CT": SLICES, "SEG": RESULT_IMAGES}),
    "got by series": Counter({"SEG": RESULT_IMAGES}),
}
WITHOUT_RESULTS = {
    "series": ["CT"],
    "study": (["CT"], 1, SLICES),
    "patient instances": SLICES,
    "studies with a SEG": 0,
    "SEG images": 0,
    "got": Counter({"CT": SLICES}),
    "moved": Counter({"CT": SLICES}),
    "got by series": Counter(),
}


@pytest.mark.integration
def test_one_patient_id_naming_two_people_is_answered_as_two_and_not_retrieved_as_one(start_node, tmp_path) -> None:
    """Two studies share PatientID PHANTOM-1, one of Müller^Jürgen, one of Other^Person. A PATIENT-level C-FIND for
    Müller^Jürgen answered Other^Person (the newest study of the PatientID) with 2 studies, and a C-MOVE by the
    PatientID sent both people's images."""
    planner_port = free_port()
    node = _node(start_node, planner_port)
    muller = _phantom(tmp_path / "muller", patient_name="Müller^Jürgen", character_set="ISO_IR 192")
    other = _phantom(tmp_path / "other", patient_name="Other^Person")
    for series in (muller, other):
        _stored(node, series, JobState.IGNORED)

    (answer,) = _find(
        node, tmp_path / "by-name", "-P", "QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 192",
        "PatientName=Müller^Jürgen", "PatientID", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
    )  # fmt: skip
    assert (str(answer.PatientName), answer.NumberOfPatientRelatedStudies) == ("Müller^Jürgen", 1)
    assert answer.NumberOfPatientRelatedInstances == SLICES
    people = _find(
        node, tmp_path / "by-id", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PHANTOM-1", "PatientName",
        "NumberOfPatientRelatedStudies",
    )  # fmt: skip
    assert sorted((str(d.PatientName), d.NumberOfPatientRelatedStudies) for d in people) == [
        ("Müller^Jürgen", 1),
        ("Other^Person", 1),
    ]

    moved, output = _move(
        node, tmp_path / "moved", planner_port, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PHANTOM-1"
    )
    assert moved == Counter() and "DataSetDoesNotMatchSOPClass" in output, output  # 0xA900, nothing sent
    assert "is held for more than one person (its studies differ in PatientName)" in node.log()
    by_study = _get(
        node, tmp_path / "by-study", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={muller.study_instance_uid}"
    )
    assert by_study == Counter({"CT": SLICES})


@pytest.mark.integration
def test_results_of_a_series_changed_since_and_failed_are_not_served_and_a_retry_serves_them_again(
    start_node, tmp_path
) -> None:
    """A DONE series reopened by a late image that admission then refused is FAILED; its SEG, made from the images
    before, was still found, counted (ModalitiesInStudy, NumberOf...) and sent by C-GET and C-MOVE. A series
    cancelled (or failed in delivery) before anything changed it keeps results that describe it: served."""
    planner_port = free_port()
    node = _node(start_node, planner_port, process=True)
    ct = _phantom(tmp_path / "ct", patient_name="Withdrawn^Wes")
    _stored(node, ct, JobState.QUEUED)
    seg_uid = _record_results(node, ct, tmp_path / "results")
    assert _served(node, tmp_path / "queued", planner_port, ct, seg_uid) == WITH_RESULTS

    cancelled = node.cli("cancel", ct.series_instance_uid)
    assert cancelled.returncode == 0 and node.job_state(ct.series_instance_uid) is JobState.FAILED, cancelled.stderr
    assert _served(node, tmp_path / "cancelled", planner_port, ct, seg_uid) == WITH_RESULTS

    retried = node.cli("retry", ct.series_instance_uid)
    assert retried.returncode == 0, retried.stderr
    node.wait_for_state(ct.series_instance_uid, JobState.QUEUED)
    _finish(node, ct.series_instance_uid)
    assert _served(node, tmp_path / "done", planner_port, ct, seg_uid) == WITH_RESULTS

    late = pydicom.dcmread(ct.files[-1])  # half the matrix: admission refuses the reopened series
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pixels = late.pixel_array[::2, ::2].copy()
    (late.Rows, late.Columns), late.PixelData = pixels.shape, pixels.tobytes()
    late.PixelSpacing = [float(v) * 2 for v in late.PixelSpacing]
    late.InstanceNumber = SLICES + 1
    late.save_as(tmp_path / "late.dcm")
    sent = storescu(node.port, [tmp_path / "late.dcm"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    node.wait_for_state(ct.series_instance_uid, JobState.FAILED, timeout=60)
    assert "not admitted" in (node.job_reason(ct.series_instance_uid) or "")
    refused = {**WITHOUT_RESULTS, "study": (["CT"], 1, SLICES + 1), "patient instances": SLICES + 1}
    refused |= {"got": Counter({"CT": SLICES + 1}), "moved": Counter({"CT": SLICES + 1})}
    assert _served(node, tmp_path / "refused", planner_port, ct, seg_uid) == refused
    shown = node.cli("show", ct.series_instance_uid)
    assert "(not served by Query/Retrieve: the series received images after it, and is FAILED)" in shown.stdout

    seg = f"SeriesInstanceUID={seg_uid}"
    study = f"StudyInstanceUID={ct.study_instance_uid}"
    assert _get(node, tmp_path / "got-seg", "-S", "QueryRetrieveLevel=SERIES", study, seg) == Counter()
    why = (
        f"nothing was sent to peer {PLANNER.lower()}: series {seg_uid} holds results that no longer describe their "
        "series: it received images after them, and is FAILED"
    )
    wait_for(lambda: why in node.log(), what="the log to say why nothing was sent")
    assert any(why in (detail or "") for detail in _audit_details(node, "get")), _audit_details(node, "get")


@pytest.mark.integration
def test_modalities_in_study_matches_only_series_still_held(start_node, tmp_path) -> None:
    """Retention purged the CT's images and kept its results: ModalitiesInStudy=CT still matched the study, whose
    own answer said SEG."""
    node = _node(start_node, free_port(), process=True)
    ct = _phantom(tmp_path / "ct", patient_name="Purged^Pia")
    _stored(node, ct, JobState.QUEUED)
    _record_results(node, ct, tmp_path / "results")
    _finish(node, ct.series_instance_uid)
    purged = node.cli("purge", "--days", "0.00001", "--results-days", "100")
    assert purged.returncode == 0 and "freed" in purged.stdout, purged.stdout + purged.stderr

    by_ct = _find(node, tmp_path / "ct-studies", "-S", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=CT")
    assert by_ct == []
    (study,) = _find(
        node, tmp_path / "seg-studies", "-S", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=SEG",
        "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    assert (str(study.ModalitiesInStudy), study.NumberOfStudyRelatedInstances) == ("SEG", RESULT_IMAGES)
    keys = (f"StudyInstanceUID={ct.study_instance_uid}", f"SeriesInstanceUID={ct.series_instance_uid}")
    assert _get(node, tmp_path / "got-ct", "-S", "QueryRetrieveLevel=SERIES", *keys) == Counter()
    wait_for(
        lambda: f"series {ct.series_instance_uid} was purged (by retention or dicom-node purge) on " in node.log(),
        what="the log to say the CT was purged",
    )


def _audit_details(node: Node, action: str) -> list[str | None]:
    with node.sessions() as session:
        return [row.detail for row in recent(session, actions=[action])]


@pytest.mark.integration
def test_a_name_stored_with_three_component_groups_is_found_by_its_alphabetic_group(start_node, tmp_path) -> None:
    """A Latin-only planning system asks for Yamada^Tarou; the study is stored as Yamada^Tarou=山田^太郎=やまだ^たろう
    (ISO 2022 IR 87) and was found only by a wildcard or the whole three-group value."""
    node = _node(start_node, free_port())
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    series = _phantom(tmp_path / "yamada", patient_name=name, character_set="\\ISO 2022 IR 87")
    _stored(node, series, JobState.IGNORED)

    def found(level: str, asked: str) -> list[Dataset]:
        folder = tmp_path / f"{level}-{len(list(tmp_path.iterdir()))}"
        model = "-P" if level == "PATIENT" else "-S"  # the Study Root model has no PATIENT level
        return _find(node, folder, model, f"QueryRetrieveLevel={level}", f"PatientName={asked}", "StudyInstanceUID")

    (study,) = found("STUDY", "Yamada^Tarou")
    assert str(study.StudyInstanceUID) == series.study_instance_uid and str(study.PatientName) == name
    assert len(found("PATIENT", "Yamada^Tarou")) == 1
    assert found("STUDY", "Yamada^Taro") == [] and found("STUDY", "Tarou") == []
