"""An image the node would not use for its own results is never decompressed for a retrieving peer.

The real JPEG 2000 CT, one slice changed as the loader's own tests change it: its codestream overwritten in the
middle (it decodes without a warning, thousands of pixels wrong), or re-encoded with the irreversible (lossy) 9-7
wavelet and labelled JPEG 2000 Lossless Only. A real ``dicom-node serve`` stores them as sent; DCMTK getscu, as a
planning system runs it (uncompressed syntaxes only), gets the clean slice decompressed and that one as a failed
sub-operation, never as a clean Explicit VR Little Endian image; a move destination that accepts JPEG 2000 (DCMTK
storescp) gets it as stored, byte for byte: its own decoder reads what the node received.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.transfer_syntax import converted
from tests.conftest import Node, free_port, real_ct_copy, require_tool, storescu, wait_for
from tests.test_lossless_claims import VICTIM, _openjpeg_lossy, _relabelled
from tests.test_pixel_integrity import _codestream, _first_free, _rewrite_codestream

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"
CLEAN = VICTIM + 1  # a slice sent unchanged beside the victim


def _overwritten_in_the_middle(files: list[Path]) -> pydicom.Dataset:
    """The victim slice with 64 bytes in the middle of its codestream replaced by 0xFF: it still decodes."""
    stream = _codestream(files[VICTIM])
    at = _first_free(stream, len(stream) // 2)
    return _rewrite_codestream(files[VICTIM], lambda s: s[:at] + b"\xff" * 64 + s[at + 64 :])


def _lossy_labelled_lossless(files: list[Path]) -> pydicom.Dataset:
    """The victim slice re-encoded with the irreversible 9-7 wavelet, labelled JPEG 2000 Lossless Only."""
    return _relabelled(files, _openjpeg_lossy, JPEG2000Lossless)


CASES: dict[str, tuple[Callable[[list[Path]], pydicom.Dataset], str]] = {
    "codestream-overwritten": (
        _overwritten_in_the_middle,
        r"the JPEG 2000 data of instance {uid} is damaged: a marker code \(FF FF\) lies inside the compressed data "
        r"of tile 1, at byte [\d,]+, where no encoder writes one; a decoder reads through such damage without an "
        r"error, so its pixel values cannot be trusted",
    ),
    "irreversible-as-lossless": (
        _lossy_labelled_lossless,
        r"the pixel data of instance {uid} uses the irreversible \(9-7\) wavelet transform, which is lossy, but its "
        r"transfer syntax, JPEG 2000 \(lossless only\), allows lossless data only",
    ),
}


def _getscu(node: Node, series_uid: str, out: Path, *options: str) -> str:
    """getscu of the series into ``out`` (proposing ``options``' storage syntaxes); what it printed."""
    out.mkdir()
    command = [require_tool("getscu"), "-v", "-S", *options, "-aet", PLANNER, "-aec", node.ae_title]
    command += ["-od", str(out), "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}"]
    result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _movescu_to_storescp(node: Node, series_uid: str, port: int, out: Path) -> dict[str, pydicom.Dataset]:
    """movescu of the series to a storescp that accepts JPEG 2000 Lossless (as stored); what it received."""
    out.mkdir()
    scp = subprocess.Popen(
        [require_tool("storescp"), "+xv", "-aet", PLANNER, "-od", str(out), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        command = [require_tool("movescu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-aem", PLANNER]
        command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}"]
        result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)
        assert "Received Final Move Response (Success)" in result.stdout + result.stderr, result.stdout + result.stderr
        wait_for(lambda: len(list(out.iterdir())) == 2, timeout=30, what="moved files")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    return {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, out.iterdir())}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_an_image_the_node_does_not_trust_is_not_decompressed_for_a_getscu_peer(
    shared_fixtures, start_node, tmp_path, case
):
    change, reason = CASES[case]
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    victim = change(files)
    victim_uid, clean_uid = str(victim.SOPInstanceUID), str(pydicom.dcmread(files[CLEAN]).SOPInstanceUID)
    planner_port = free_port()
    node = start_node(destinations={"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}})
    sent = storescu(node.port, [files[CLEAN], files[VICTIM]], extra=["-xv"])  # JPEG 2000 Lossless: stored as sent
    assert sent.returncode == 0, sent.stdout + sent.stderr
    series_uid = str(victim.SeriesInstanceUID)

    output = _getscu(node, series_uid, tmp_path / "uncompressed")  # proposes uncompressed syntaxes only

    got = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, (tmp_path / "uncompressed").iterdir())}
    assert list(got) == [clean_uid], output
    assert got[clean_uid].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(got[clean_uid].pixel_array, pydicom.dcmread(files[CLEAN]).pixel_array)
    final = output.split("Received Final C-GET Response")[-1]
    assert re.search(r"Completed Suboperations\s+: 1\n", final), output
    assert re.search(r"Failed Suboperations\s+: 1\n", final), output
    (line,) = [line for line in node.log().splitlines() if "retrieve.not_decompressed" in line]
    assert re.search(reason.format(uid=re.escape(victim_uid)), line), line
    assert (
        "The node does not decompress it for a peer either: it is sent only to peers that accept its stored "
        'transfer syntax"'
    ) in line

    moved = _movescu_to_storescp(node, series_uid, planner_port, tmp_path / "as-stored")  # it accepts JPEG 2000

    assert sorted(moved) == sorted([clean_uid, victim_uid])
    assert moved[victim_uid].file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert next(generate_frames(moved[victim_uid].PixelData, number_of_frames=1)) == _codestream(files[VICTIM])


def test_an_irreversible_codestream_labelled_lossless_decompressed_says_it_was_lossy_compressed(
    shared_fixtures, tmp_path
):
    """Whatever its transfer syntax claims, an image decompressed from a lossy codestream carries
    LossyImageCompression "01" and its method (the retrieve SCP refuses this one, as above; the marking does not
    rely on that)."""
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    victim = _lossy_labelled_lossless(files)
    assert "LossyImageCompression" not in victim

    sent = converted(pydicom.dcmread(files[VICTIM]), ExplicitVRLittleEndian, "instance under test")

    assert sent.LossyImageCompression == "01"
    assert sent.LossyImageCompressionMethod == "ISO_15444_1"  # JPEG 2000 irreversible
    assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
