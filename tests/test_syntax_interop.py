"""Peers get the node's images in a transfer syntax they take: DCMTK getscu with its defaults, a storescp that takes
only Implicit VR Little Endian (C-MOVE and dispatch), a destination that takes none of the kinds of objects offered
(C-MOVE says so), lossy images that stay marked lossy when sent decompressed, and the node's log naming the
presentation contexts it rejected and why. Real peers against a real ``dicom-node serve``, from the real CT."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from sqlalchemy import select

from db.models import AuditEvent, Instance
from tests.conftest import Node, accepts_connections, free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"
IMPLICIT_ONLY = "IMPLICITSCP"
MR_ONLY = "MRONLYSCP"
DCMCONV_OPTIONS = {"implicit": "+ti", "big-endian": "+tb", "deflated": "+td"}
STORESCU_OPTIONS = {"implicit": "-xi", "big-endian": "-xb", "deflated": "-xd", "j2k-lossless": "-xv", "lossy": "-xw"}
STORED_SYNTAX = {
    "implicit": ImplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
    "deflated": "1.2.840.10008.1.2.1.99",
    "j2k-lossless": JPEG2000Lossless,
    "lossy": JPEG2000,
}
MR_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[MROnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed
[[Profiles]]
[MROnly]
PresentationContexts = MROnly
"""


@dataclass
class Holdings:
    node: Node
    series: dict[str, str]  # kind -> Series Instance UID
    study: str
    pixels: dict[str, np.ndarray]  # SOP Instance UID -> the pixels sent to the node
    lossy_ratio: str | None  # the LossyImageCompressionRatio the lossy images carry, if any
    ports: dict[str, int]  # destination AE -> port


def _copy(dataset: pydicom.Dataset, study: str, series: str, number: int) -> pydicom.Dataset:
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SeriesNumber = study, series, 900 + number
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def _write_series(folder: Path, sources: list[Path], kind: str, study: str, number: int) -> tuple[str, list[Path]]:
    """Two real CT slices as one new series of ``kind``: converted by DCMTK's dcmconv, or (lossy) by pydicom's
    JPEG 2000 encoder at 10:1 without LossyImageCompression (as some senders write it): only its transfer syntax
    says it is lossy."""
    folder.mkdir(parents=True)
    series, files = generate_uid(), []
    for index, source in enumerate(sources[:2]):
        dataset = _copy(pydicom.dcmread(source), study, series, number)
        if kind == "j2k-lossless":
            path = folder / f"{index}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            files.append(path)
            continue
        dataset.decompress(generate_instance_uid=False)
        if kind == "lossy":
            dataset.compress(JPEG2000, j2k_cr=[10], generate_instance_uid=False)
            for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
                if keyword in dataset:
                    del dataset[keyword]
            path = folder / f"{index}.dcm"
            dataset.save_as(path, enforce_file_format=True)
        else:
            explicit = folder / f"{index}-explicit.dcm"
            dataset.save_as(explicit, enforce_file_format=True)
            path = folder / f"{index}.dcm"
            subprocess.run([require_tool("dcmconv"), DCMCONV_OPTIONS[kind], str(explicit), str(path)], check=True)
            explicit.unlink()
        files.append(path)
    return series, files


@pytest.fixture(scope="module")
def holdings(tmp_path_factory, shared_fixtures) -> Iterator[Holdings]:
    workdir = tmp_path_factory.mktemp("syntax-interop")
    ports = {IMPLICIT_ONLY: free_port(), MR_ONLY: free_port()}
    node = Node(
        workdir / "node",
        {
            "peers": {
                "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
                "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "move", "get"]},
            },
            "destinations": {
                name.lower(): {"ae_title": name, "host": "127.0.0.1", "port": port} for name, port in ports.items()
            },
        },
    ).start()
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    study = generate_uid()
    series, pixels, lossy_ratio = {}, {}, None
    for number, kind in enumerate(STORED_SYNTAX):
        series[kind], files = _write_series(workdir / kind, sources, kind, study, number)
        sent = storescu(node.port, files, extra=[STORESCU_OPTIONS[kind]])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        for path in files:
            dataset = pydicom.dcmread(path)
            pixels[str(dataset.SOPInstanceUID)] = dataset.pixel_array
            if kind == "lossy" and "LossyImageCompressionRatio" in dataset:
                lossy_ratio = str(dataset.LossyImageCompressionRatio)
    wait_for(lambda: _stored_syntaxes(node) == {STORED_SYNTAX[kind] for kind in STORED_SYNTAX}, timeout=60)
    yield Holdings(node, series, study, pixels, lossy_ratio, ports)
    node.stop()


def _stored_syntaxes(node: Node) -> set[str]:
    with node.sessions() as session:
        return set(session.scalars(select(Instance.transfer_syntax_uid)))


def _getscu(holdings: Holdings, out: Path, kind: str) -> tuple[subprocess.CompletedProcess[str], list[pydicom.Dataset]]:
    """getscu with its defaults, by series; its output and the data sets it received."""
    out.mkdir()
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", holdings.node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={holdings.study}"]
    command += ["-k", f"SeriesInstanceUID={holdings.series[kind]}", "127.0.0.1", str(holdings.node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result, [pydicom.dcmread(path) for path in sorted(out.iterdir())]


def _movescu(holdings: Holdings, kind: str, destination: str) -> subprocess.CompletedProcess[str]:
    """movescu with its defaults, by series, printing the responses in full (``-d``: their comments too)."""
    command = [require_tool("movescu"), "-d", "-S", "-aet", PLANNER, "-aec", holdings.node.ae_title]
    command += ["-aem", destination, "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={holdings.study}"]
    command += ["-k", f"SeriesInstanceUID={holdings.series[kind]}", "127.0.0.1", str(holdings.node.port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def storescp(tmp_path) -> Iterator[callable]:
    """Factory: a DCMTK storescp with the given AE title, port and options; stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def _start(ae_title: str, port: int, *options: str) -> Path:
        received = tmp_path / f"received-{ae_title}"
        received.mkdir()
        command = [require_tool("storescp"), "-aet", ae_title, "-od", str(received), *options, str(port)]
        started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: accepts_connections(port), timeout=20, what=f"storescp on port {port}")
        return received

    yield _start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def _assert_same_pixels(holdings: Holdings, received: list[pydicom.Dataset]) -> None:
    for dataset in received:
        np.testing.assert_array_equal(dataset.pixel_array, holdings.pixels[str(dataset.SOPInstanceUID)])


@pytest.mark.parametrize("kind", ["implicit", "big-endian", "deflated"])
def test_getscu_with_its_defaults_gets_a_series_stored_in_an_uncompressed_syntax_it_did_not_pick(
    holdings, tmp_path, kind
):
    result, received = _getscu(holdings, tmp_path / kind, kind)

    assert len(received) == 2, result.stdout + result.stderr
    assert {str(d.file_meta.TransferSyntaxUID) for d in received} <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    _assert_same_pixels(holdings, received)


@pytest.mark.parametrize("kind", ["j2k-lossless", "big-endian"])
def test_a_move_destination_taking_only_implicit_vr_gets_the_series_converted(holdings, storescp, kind):
    received_folder = storescp(IMPLICIT_ONLY, holdings.ports[IMPLICIT_ONLY], "+xi")

    result = _movescu(holdings, kind, IMPLICIT_ONLY)

    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(list(received_folder.iterdir())) == 2, timeout=30, what="two instances at storescp")
    received = [pydicom.dcmread(path) for path in sorted(received_folder.iterdir())]
    assert {str(d.file_meta.TransferSyntaxUID) for d in received} == {ImplicitVRLittleEndian}
    _assert_same_pixels(holdings, received)


def test_a_lossy_image_sent_decompressed_still_says_it_went_through_lossy_compression(holdings, tmp_path):
    result, received = _getscu(holdings, tmp_path / "lossy", "lossy")

    assert len(received) == 2, result.stdout + result.stderr
    for dataset in received:
        assert not dataset.file_meta.TransferSyntaxUID.is_compressed
        assert dataset.LossyImageCompression == "01"
        methods = dataset["LossyImageCompressionMethod"].value
        assert "ISO_15444_1" in (list(methods) if isinstance(methods, MultiValue) else [methods])
        if holdings.lossy_ratio is not None:
            assert str(dataset.LossyImageCompressionRatio) == holdings.lossy_ratio


def test_a_move_to_a_destination_that_accepts_none_of_the_objects_offered_says_so(holdings, storescp, tmp_path):
    profile = tmp_path / "mr-only.cfg"
    profile.write_text(MR_ONLY_PROFILE)
    received_folder = storescp(MR_ONLY, holdings.ports[MR_ONLY], "-xf", str(profile), "MROnly")

    result = _movescu(holdings, "implicit", MR_ONLY)

    output = result.stdout + result.stderr
    assert "Refused: OutOfResourcesSubOperations" in output, output
    assert f"Move destination {MR_ONLY} accepted none of the objects" in output
    assert list(received_folder.iterdir()) == []
    log = holdings.node.log()
    assert f"move destination {MR_ONLY} at 127.0.0.1:{holdings.ports[MR_ONLY]} accepted none of the kinds" in log
    assert "CT Image Storage in Implicit VR Little Endian, Explicit VR Little Endian" in log
    with holdings.node.sessions() as session:
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "move")).all()
    assert any(f"{MR_ONLY} at 127.0.0.1:{holdings.ports[MR_ONLY]} accepted none" in (d or "") for d in details)


def test_the_node_logs_which_kinds_of_objects_it_rejected_from_a_peer_and_why(holdings, tmp_path):
    node = holdings.node
    worklist = tmp_path / "worklist.dcm"
    query = pydicom.Dataset()
    query.PatientName = ""
    query.ScheduledProcedureStepSequence = [pydicom.Dataset()]
    query.save_as(worklist, implicit_vr=False, little_endian=True)
    findscu = [require_tool("findscu"), "-W", "-aet", PLANNER, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    subprocess.run([*findscu, str(worklist)], capture_output=True, text=True, timeout=60)
    image = _one_image(node)
    subprocess.run(
        [
            require_tool("storescu"),
            "-aet",
            "PACS",
            "-aec",
            node.ae_title,
            "-R",
            "-xm",
            "127.0.0.1",
            str(node.port),
            image,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    def rejected_lines() -> list[str]:
        return [line for line in node.log().splitlines() if "association.contexts_rejected" in line]

    wait_for(lambda: len(rejected_lines()) >= 2, timeout=20, what="two log lines naming rejected contexts")
    lines = rejected_lines()
    assert any(
        "abstract syntax not supported): Modality Worklist Information Model - FIND" in line and PLANNER in line
        for line in lines
    ), lines
    assert any(
        "none of the transfer syntaxes proposed is one the node reads (MPEG2 Main Profile / Main Level): CT Image "
        "Storage"
        in line
        and "PACS" in line
        for line in lines
    ), lines


def _one_image(node: Node) -> str:
    with node.sessions() as session:
        return str(session.scalars(select(Instance.path).limit(1)).one())


def _binary_segs(folder: Path, sources: list[Path]) -> list[Path]:
    """BINARY SEGs of three real CT slices, as the node writes them: JPEG 2000 Lossless, and uncompressed."""
    import highdicom as hd

    images = sorted((pydicom.dcmread(path) for path in sources[:3]), key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((3, images[0].Rows, images[0].Columns), np.uint8)
    mask[:, 100:200, 50:301] = 1  # 251 columns: frames that do not end on a byte
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="liver",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
        segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    paths = []
    for number, syntax in enumerate((JPEG2000Lossless, ExplicitVRLittleEndian), start=1):
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=mask,
            segmentation_type="BINARY",
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
            transfer_syntax_uid=syntax,
        )
        paths.append(folder / f"seg-{number}.dcm")
        seg.save_as(paths[-1])
    return paths


def test_dispatch_sends_results_to_a_destination_taking_only_implicit_vr(storescp, shared_fixtures, tmp_path):
    from dicom_node.config import Destination
    from dicom_node.dispatch import send_files

    port = free_port()
    received_folder = storescp(IMPLICIT_ONLY, port, "+xi")
    segs = _binary_segs(tmp_path, sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")))
    destination = Destination(ae_title=IMPLICIT_ONLY, host="127.0.0.1", port=port)

    outcome = send_files("DICOMNODE", destination, [str(path) for path in segs], timeout=20)

    assert outcome.error is None and outcome.sent == [str(path) for path in segs]
    sent = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(path) for path in segs)}
    received = [pydicom.dcmread(path) for path in sorted(received_folder.iterdir())]
    assert len(received) == 2
    for dataset in received:
        assert dataset.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        np.testing.assert_array_equal(dataset.pixel_array, sent[str(dataset.SOPInstanceUID)].pixel_array)
