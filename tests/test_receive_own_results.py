"""The node's own results sent back to it by a real peer (DCMTK storescu), as a PACS auto-routing rule that forwards
them does, again at each retry: a copy identical to the result the node holds is answered success and kept once; any
other object claiming to be one of its results is refused and quarantined."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from sqlalchemy import func, select

from db.models import Instance, Job, JobState, RejectedInstance, Series
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.storage import same_data_set
from tests.conftest import CT_RULES, Node, data_set_bytes, require_tool, storescu, succeeded_files
from tests.test_partial_results import result_files

pytestmark = pytest.mark.integration

SMALL = PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(6.0, 6.0), slice_spacing=8.0, noise_sd=5.0)
RETURNED = "instance.own_result_returned"
CREATOR = "DICOM NODE TEST"
# A router forwarding SEGs in implicit VR little endian only: storescu -R -xi, with Label Map Segmentation Storage,
# which DCMTK 3.6.7 does not know of itself.
SEG_IN_IMPLICIT_VR = """\
[[TransferSyntaxes]]
[ImplicitOnly]
TransferSyntax1 = 1.2.840.10008.1.2

[[PresentationContexts]]
[SegInImplicitVR]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.66.4\\ImplicitOnly
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.66.7\\ImplicitOnly

[[Profiles]]
[Router]
PresentationContexts = SegInImplicitVR
"""


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Iterator[tuple[Node, dict[str, Path]]]:
    """A node that processed one CT series into a BINARY and a LABELMAP SEG, their SRs and an RTSTRUCT, and those
    result files."""
    folder = tmp_path_factory.mktemp("own-results")
    series = write_phantom_series(folder / "ct", SMALL)
    results = {"rtstruct": True, "segmentation_types": ["BINARY", "LABELMAP"]}
    node = Node(folder / "node", {"rules": CT_RULES, "inference": {"workers": 1}, "results": results})
    node.start()
    try:
        assert storescu(node.port, series.files).returncode == 0
        node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
        yield node, result_files(node, series.series_instance_uid)
    finally:
        node.stop()


def held(node: Node) -> list[int]:
    """How many instances and series are recorded, jobs, and refused instances."""
    with node.sessions() as session:
        return [
            session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Instance, Series, Job, RejectedInstance)
        ]


def quarantined(node: Node) -> list[Path]:
    return sorted((node.storage / "quarantine").iterdir())


def test_a_result_routed_back_again_and_again_is_answered_success_and_kept_once(processed):
    """Each retry of the forward was refused and kept again in quarantine (never deleted by default), up to
    ~40 MB an RTSTRUCT, until the disk reached its reserve."""
    node, results = processed
    sent = [results["rtstruct.dcm"], results["sr-binary.dcm"]]
    before = {path: path.read_bytes() for path in sent}
    recorded, in_quarantine, logged = held(node), quarantined(node), node.log().count(RETURNED)

    as_stored = storescu(node.port, sent * 3, calling_ae="ORTHANC")  # the auto-router's retries
    in_implicit_vr = storescu(node.port, sent, calling_ae="ORTHANC", extra=["-xi"])  # transcoded by the peer

    for answer in (as_stored, in_implicit_vr):
        assert answer.returncode == 0, answer.stdout + answer.stderr
    assert len(succeeded_files(as_stored.stderr + as_stored.stdout)) == 6
    assert len(succeeded_files(in_implicit_vr.stderr + in_implicit_vr.stdout)) == 2
    assert "-> Little Endian Implicit" in in_implicit_vr.stderr + in_implicit_vr.stdout
    assert quarantined(node) == in_quarantine
    assert held(node) == recorded  # nothing recorded as received: no series, no job, no refusal
    assert {path: path.read_bytes() for path in sent} == before
    assert 1 <= node.log().count(RETURNED) - logged <= 2  # once per peer each 10 s (two associations), not per copy
    assert "a routing rule on that peer probably forwards the node's results back to it" in node.log()


def test_another_object_claiming_to_be_a_result_is_still_refused_and_quarantined(processed, tmp_path):
    """A forged or altered object under a result's UIDs would be handed out by Query/Retrieve as the node's result:
    another contour under the RTSTRUCT's own UIDs (which a comparison of what results are made from would not see:
    it has no pixel data), and another SR in the SR's result series."""
    node, results = processed
    altered = pydicom.dcmread(results["rtstruct.dcm"])
    altered.ROIContourSequence[0].ContourSequence[0].ContourData[0] += 1
    altered.save_as(tmp_path / "altered.dcm")
    other = pydicom.dcmread(results["sr-binary.dcm"])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.save_as(tmp_path / "other.dcm")
    sent = [tmp_path / "altered.dcm", tmp_path / "other.dcm"]
    in_quarantine = quarantined(node)

    answer = storescu(node.port, sent * 2, calling_ae="ORTHANC", extra=["--no-halt"])  # each copy, as a retry sends

    output = answer.stderr + answer.stdout
    assert output.count("Received Store Response (Error: CannotUnderstand)") == 4, output
    new = [path for path in quarantined(node) if path not in in_quarantine]
    assert sorted(data_set_bytes(path) for path in new) == sorted(data_set_bytes(path) for path in sent * 2)
    series = {str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID) for path in sent}
    with node.sessions() as session:
        jobs = session.execute(
            select(Series.series_instance_uid, Series.source_job_id).where(Series.series_instance_uid.in_(series))
        )
        expected = {
            f"SeriesInstanceUID {uid} is a series of this node's own results (job {job}); the node never adds "
            "received instances to its results, so this instance is quarantined"
            for uid, job in jobs
        }
        reasons = set(session.scalars(select(RejectedInstance.reason).where(RejectedInstance.path.in_(map(str, new)))))
    assert len(expected) == 2 and reasons == expected
    kept = pydicom.dcmread(results["rtstruct.dcm"]).ROIContourSequence[0].ContourSequence[0].ContourData[0]
    assert kept != altered.ROIContourSequence[0].ContourSequence[0].ContourData[0]  # the node's result is unchanged


def _in_implicit_vr(folder: Path) -> list[str]:
    """storescu's options to send SEGs in implicit VR little endian only."""
    config = folder / "router.cfg"
    config.write_text(SEG_IN_IMPLICIT_VR)
    return ["-xf", str(config), "Router"]


@pytest.mark.parametrize("name", ["seg-binary.dcm", "seg-labelmap.dcm"])
def test_a_seg_routed_back_in_implicit_vr_is_answered_success_and_kept_once(processed, name, tmp_path):
    """Read in implicit VR, a SEG's pixel data is OW where the stored copy has OB, the same bytes: each copy a router
    forwarded in implicit VR (many do) was refused and quarantined again."""
    node, results = processed
    seg = results[name]
    before = seg.read_bytes()
    recorded, in_quarantine = held(node), quarantined(node)

    answer = storescu(node.port, [seg] * 2, calling_ae="ORTHANC", extra=[*_in_implicit_vr(tmp_path), "--no-halt"])

    output = answer.stderr + answer.stdout
    assert answer.returncode == 0, output
    assert "-> Little Endian Implicit" in output
    assert len(succeeded_files(output)) == 2, output
    assert quarantined(node) == in_quarantine
    assert held(node) == recorded
    assert seg.read_bytes() == before


def test_an_altered_seg_in_implicit_vr_is_still_refused_and_quarantined(processed, tmp_path):
    """One label changed in the LABELMAP, one pixel in the BINARY SEG: sent in implicit VR, neither is the node's
    result, however its VRs read."""
    node, results = processed
    binary = pydicom.dcmread(results["seg-binary.dcm"])
    pixels = bytearray(binary.PixelData)
    pixels[len(pixels) // 2] ^= 0x01
    binary.PixelData = bytes(pixels)
    binary.save_as(tmp_path / "binary.dcm")
    labelmap = pydicom.dcmread(results["seg-labelmap.dcm"])
    labelmap.SegmentSequence[0].SegmentLabel += "x"
    labelmap.save_as(tmp_path / "labelmap.dcm")
    sent = [tmp_path / "binary.dcm", tmp_path / "labelmap.dcm"]
    recorded, in_quarantine = held(node), quarantined(node)

    answer = storescu(node.port, sent, calling_ae="ORTHANC", extra=[*_in_implicit_vr(tmp_path), "--no-halt"])

    output = answer.stderr + answer.stdout
    assert output.count("Received Store Response (Error: CannotUnderstand)") == 2, output
    assert "-> Little Endian Implicit" in output
    new = [path for path in quarantined(node) if path not in in_quarantine]
    assert len(new) == 2 and all(
        pydicom.dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian for path in new
    )
    assert held(node) == [*recorded[:3], recorded[3] + 2]  # two refusals recorded, nothing else
    assert pydicom.dcmread(results["seg-binary.dcm"]).PixelData != binary.PixelData  # the node's result is unchanged


def test_the_same_data_set_is_every_element_with_the_same_value_whatever_its_encoding(processed, tmp_path):
    """Transcoded by DCMTK, a result with a private element and a private sequence (UN in implicit VR, read as LO and
    SQ in explicit VR) and a 16-bit image (OW, byte-swapped in big endian) is the same data set, deflated too; with one value
    changed, or compressed (its pixel data is not decoded to compare it), it is not."""
    _node, results = processed
    image = write_phantom_series(tmp_path / "ct", SMALL).files[0]  # 16-bit pixel data
    result = pydicom.dcmread(results["seg-binary.dcm"])
    item = pydicom.Dataset()
    item.private_block(0x0011, CREATOR, create=True).add_new(0x01, "SS", -5)
    block = result.private_block(0x0011, CREATOR, create=True)
    block.add_new(0x01, "LO", "a private value")
    block.add_new(0x02, "SQ", [item])
    result.save_as(tmp_path / "private.dcm")
    block[0x02].value[0].private_block(0x0011, CREATOR)[0x01].value = -4
    result.save_as(tmp_path / "changed.dcm")

    def transcoded(path: Path, option: str) -> bytes:
        out = tmp_path / f"{path.stem}{option}.dcm"
        subprocess.run([require_tool("dcmconv"), option, str(path), str(out)], check=True)
        return data_set_bytes(out)

    for path in (image, tmp_path / "private.dcm"):
        assert same_data_set(path, transcoded(path, "+ti"), ImplicitVRLittleEndian)
        assert same_data_set(path, transcoded(path, "+tb"), ExplicitVRBigEndian)
        assert same_data_set(path, transcoded(path, "+td"), DeflatedExplicitVRLittleEndian)
    assert not same_data_set(
        tmp_path / "private.dcm", transcoded(tmp_path / "changed.dcm", "+ti"), ImplicitVRLittleEndian
    )
    assert not same_data_set(tmp_path / "private.dcm", transcoded(tmp_path / "changed.dcm", "+tb"), ExplicitVRBigEndian)
    compressed = tmp_path / "compressed.dcm"
    subprocess.run([require_tool("dcmcrle"), str(image), str(compressed)], check=True)
    assert not same_data_set(image, data_set_bytes(compressed), RLELossless)
