"""Compressed frames whose own header describes another image than Rows and Columns are refused before any
decoder allocates what they say: by the volume loader (the job fails naming the image) and by C-GET/C-MOVE
for a peer that needs the instance decompressed (a failed sub-operation)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1
from pynetdicom import AE, build_role, evt

from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.retrieve.scp import (
    MAX_DECOMPRESSED_BYTES,
    NotDecompressed,
    Stored,
    decompression_refusal,
    readable_form,
)
from inference.frames import decoded_bytes, encapsulated_problem, frame_problem
from inference.volume import VolumeError, load_series_volume
from tests.conftest import Node, require_tool, storescu

SPEC = PhantomSpec(rows=128, columns=96, slices=4, pixel_spacing=(3.0, 3.0), slice_spacing=5.0)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_ONLY = {(CT_IMAGE, "1.2.840.10008.1.2.1")}
MEMORY_BOUND_MB = 200  # the decoders would allocate 1 to 2.5 GB for these frames


def _frames_of(dataset: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(dataset.PixelData, number_of_frames=int(dataset.get("NumberOfFrames") or 1)))


def _rewrite_frame(path: Path, change: Callable[[bytes], bytes], index: int = 0) -> pydicom.Dataset:
    """Replace frame ``index`` of ``path`` by ``change(frame)``; returns the data set written."""
    dataset = pydicom.dcmread(path)
    frames = _frames_of(dataset)
    frames[index] = change(frames[index])
    dataset.PixelData = encapsulate(frames)
    dataset.save_as(path)
    return dataset


def _siz_size(width: int, height: int) -> Callable[[bytes], bytes]:
    """Make a JPEG 2000 codestream's SIZ marker say ``width`` x ``height`` (Xsiz and Ysiz, offsets 0)."""

    def change(stream: bytes) -> bytes:
        siz = stream.index(b"\xff\x51")
        return stream[: siz + 6] + struct.pack(">LL", width, height) + stream[siz + 14 :]

    return change


def _sof_size(width: int, height: int, marker: bytes) -> Callable[[bytes], bytes]:
    """Make a JPEG or JPEG-LS frame header (``marker``: SOFn) say ``width`` x ``height`` (its Y, then X)."""

    def change(stream: bytes) -> bytes:
        sof = stream.index(marker)
        return stream[: sof + 5] + struct.pack(">HH", height, width) + stream[sof + 9 :]

    return change


def _rle_runs(megabytes: int) -> Callable[[bytes], bytes]:
    """Two RLE segments of replicate runs (2 bytes -> 128 bytes): ``megabytes`` MB expanding 64 times."""
    segment = bytes([0x81, 0]) * (megabytes * 250_000)
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    return lambda _frame: header + segment + segment


def _name(dataset: pydicom.Dataset) -> str:
    return f"image {dataset.InstanceNumber} (SOP Instance UID {dataset.SOPInstanceUID})"


# --- what must still load -------------------------------------------------------------------------------------


def test_real_totalsegmentator_ct_passes_the_frame_check_and_loads(shared_fixtures):
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))

    assert [encapsulated_problem(pydicom.dcmread(path), path.name) for path in files] == [None] * len(files)
    assert load_series_volume(files).hu.shape == (len(files), 512, 512)


@pytest.mark.parametrize("compression", ["jpeg2000", "rle", "jpegls"])
@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
def test_phantoms_in_each_compressed_syntax_load_as_uncompressed_ones_do(tmp_path, compression, enhanced):
    plain = write_phantom_series(tmp_path / "plain", SPEC)
    compressed = write_phantom_series(tmp_path / compression, replace(SPEC, compression=compression, enhanced=enhanced))

    assert [encapsulated_problem(pydicom.dcmread(path), "it") for path in compressed.files] == [None] * len(
        compressed.files
    )
    np.testing.assert_array_equal(load_series_volume(compressed.files).hu, load_series_volume(plain.files).hu)


def test_jpeg_lossless_from_dcmtk_passes_and_its_frame_header_is_read(tmp_path):
    source = write_phantom_series(tmp_path / "plain", replace(SPEC, slices=1)).files[0]
    target = tmp_path / "jpeg.dcm"
    subprocess.run([require_tool("dcmcjpeg"), "+e1", str(source), str(target)], check=True)
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == JPEGLosslessSV1

    assert encapsulated_problem(pydicom.dcmread(target), "it") is None
    dataset = _rewrite_frame(target, _sof_size(4096, 4096, b"\xff\xc3"))  # SOF3: lossless
    assert encapsulated_problem(dataset, "it") == (
        "the JPEG data of it is 4096 x 4096 pixels, but its Columns and Rows say 96 x 128; it is not decoded"
    )


# --- what the volume loader refuses, without the memory ---------------------------------------------------------

LOAD_AND_MEASURE = """
import json, resource, sys
from pathlib import Path
from inference.volume import VolumeError, load_series_volume
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_series_volume([Path(p) for p in sys.argv[1:]])
    reason = None
except VolumeError as error:
    reason = str(error)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"reason": reason, "grown_mb": grown}))
"""


def _load_in_a_fresh_process(files: list[Path]) -> tuple[str | None, float]:
    """The volume loader's refusal and how much its peak memory grew, in a process of its own (fresh peak)."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, *map(str, files)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return answer["reason"], answer["grown_mb"]


HOSTILE = {
    "jpeg2000": (_siz_size(16384, 16384), "is 16384 x 16384 pixels, but its Columns and Rows say 96 x 128"),
    "jpegls": (_sof_size(16384, 16384, b"\xff\xf7"), "is 16384 x 16384 pixels, but its Columns and Rows say 96 x 128"),
    "rle": (
        _rle_runs(20),
        "has a segment of 10,000,000 bytes (segment 1), longer than any RLE encoding of 96 x 128 pixels can be "
        "(24,577 bytes)",
    ),
}
KIND = {"jpeg2000": "JPEG 2000", "jpegls": "JPEG-LS", "rle": "RLE"}


@pytest.mark.parametrize("compression", sorted(HOSTILE))
def test_a_frame_bigger_than_its_header_fails_the_series_before_it_is_decoded(tmp_path, compression):
    series = write_phantom_series(tmp_path, replace(SPEC, compression=compression))
    change, problem = HOSTILE[compression]
    hostile = _rewrite_frame(series.files[2], change)

    reason, grown_mb = _load_in_a_fresh_process(series.files)

    assert reason == f"the {KIND[compression]} data of {_name(hostile)} {problem}; it is not decoded"
    print(f"{compression}: peak memory grew {grown_mb:.0f} MB")
    assert grown_mb < MEMORY_BOUND_MB


def test_a_bad_frame_of_a_multi_frame_image_is_named_by_its_number(tmp_path):
    series = write_phantom_series(tmp_path, replace(SPEC, compression="jpeg2000", enhanced=True))
    hostile = _rewrite_frame(series.files[0], _siz_size(8192, 8192), index=2)

    with pytest.raises(VolumeError) as error:
        load_series_volume(series.files)

    assert str(error.value) == (
        f"the JPEG 2000 data of frame 3 of image (SOP Instance UID {hostile.SOPInstanceUID}) is 8192 x 8192 pixels, "
        "but its Columns and Rows say "
        "96 x 128; it is not decoded"
    )


def test_jpeg2000_in_jp2_boxes_is_read_through_its_boxes(tmp_path):
    path = write_phantom_series(tmp_path, replace(SPEC, slices=1, compression="jpeg2000")).files[0]
    codestream = _frames_of(pydicom.dcmread(path))[0]

    def boxed(stream: bytes) -> bytes:
        ihdr = struct.pack(">4sLLHBBBB", b"ihdr", 128, 96, 1, 15, 7, 0, 0)
        return (
            b"\x00\x00\x00\x0cjP  \r\n\x87\n"
            + struct.pack(">L4s4sL4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
            + struct.pack(">L4s", 8 + 4 + len(ihdr), b"jp2h")
            + struct.pack(">L", 4 + len(ihdr))
            + ihdr
            + struct.pack(">L4s", 8 + len(stream), b"jp2c")
            + stream
        )

    assert frame_problem(boxed(codestream), "JPEG 2000", 128, 96, 1, 16) is None
    assert frame_problem(boxed(_siz_size(96, 4096)(codestream)), "JPEG 2000", 128, 96, 1, 16) == (
        "is 96 x 4096 pixels, but its Columns and Rows say 96 x 128"
    )
    assert frame_problem(codestream, "JPEG 2000", 128, 96, 3, 16) == (
        "has 1 component(s), but its SamplesPerPixel says 3"
    )
    assert frame_problem(codestream, "JPEG 2000", 128, 96, 1, 8) == (
        "holds 16-bit samples, more than its BitsAllocated (8)"
    )
    assert frame_problem(b"\x00" * 64, "JPEG 2000", 128, 96, 1, 16) == (
        "does not start with a JPEG 2000 image header (SIZ marker)"
    )


def test_rle_headers_no_encoding_of_the_image_can_have_are_refused():
    def rle(count: int, offsets: list[int], length: int) -> bytes:
        header = struct.pack("<16L", count, *offsets, *([0] * (15 - len(offsets))))
        return header + bytes(length - 64)

    assert frame_problem(rle(2, [64, 1000], 2000), "RLE", 128, 96, 1, 16) is None
    assert frame_problem(rle(3, [64, 100, 200], 2000), "RLE", 128, 96, 1, 16) == (
        "has 3 segment(s), where SamplesPerPixel 1 and BitsAllocated 16 allow 1 to 2"
    )
    assert frame_problem(rle(0, [], 2000), "RLE", 128, 96, 1, 16) == (
        "has 0 segment(s), where SamplesPerPixel 1 and BitsAllocated 16 allow 1 to 2"
    )
    assert frame_problem(rle(2, [64, 5000], 2000), "RLE", 128, 96, 1, 16) == (
        "has segment offsets [64, 5000] that do not increase inside its 2000 bytes"
    )
    assert frame_problem(b"\x01\x00", "RLE", 128, 96, 1, 16) == "is 2 bytes, shorter than the 64-byte RLE header"
    assert frame_problem(b"anything", "Deflate", 128, 96, 1, 16) is None  # other syntaxes pass


def test_jpeg_without_a_frame_header_before_its_scan_is_refused():
    quantisation = b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)
    scan = b"\xff\xda" + struct.pack(">H", 8) + bytes(6)
    assert frame_problem(b"\xff\xd8" + quantisation + scan, "JPEG", 128, 96, 1, 16) == (
        "has no frame header (SOF marker) before its image data"
    )
    baseline = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 128, 96, 1) + bytes(3)
    assert frame_problem(b"\xff\xd8" + quantisation + baseline + scan, "JPEG", 128, 96, 1, 8) is None


# --- what C-GET and C-MOVE do not decompress ------------------------------------------------------------------


def _many_frames(folder: Path, frames: int, side: int = 512) -> Path:
    """A small JPEG 2000 file whose header declares ``frames`` frames of ``side`` x ``side`` (each a real one)."""
    path = write_phantom_series(folder, replace(SPEC, slices=1)).files[0]
    dataset = pydicom.dcmread(path)
    dataset.Rows = dataset.Columns = side
    dataset.PixelData = np.zeros((side, side), dtype=np.int16).tobytes()
    dataset.compress(JPEG2000Lossless)
    frame = _frames_of(dataset)[0]
    dataset.NumberOfFrames = frames
    dataset.PixelData = encapsulate([frame] * frames)
    dataset.save_as(path)
    return path


def _stored(path: Path) -> Stored:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return Stored(str(path), CT_IMAGE, str(dataset.file_meta.TransferSyntaxUID), str(dataset.SOPInstanceUID))


def test_retrieval_does_not_decompress_a_mismatching_frame_or_gigabytes(tmp_path):
    series = write_phantom_series(tmp_path / "ct", replace(SPEC, compression="jpeg2000"))
    hostile = _rewrite_frame(series.files[1], _siz_size(16384, 16384))
    frames = MAX_DECOMPRESSED_BYTES // (512 * 512 * 2) + 1
    big = _many_frames(tmp_path / "big", frames)

    dataset, how = readable_form(_stored(series.files[0]), EXPLICIT_VR_ONLY)  # a good one still decompresses
    assert (
        how == "decompressed to Explicit VR Little Endian"
        and dataset.file_meta.TransferSyntaxUID.is_compressed is False
    )
    with pytest.raises(NotDecompressed) as mismatch:
        readable_form(_stored(series.files[1]), EXPLICIT_VR_ONLY)
    assert str(mismatch.value) == (
        f"the JPEG 2000 data of instance {hostile.SOPInstanceUID} is 16384 x 16384 pixels, but its Columns and Rows "
        "say 96 x 128; it is not decoded"
    )
    big_dataset = pydicom.dcmread(big)
    assert decoded_bytes(big_dataset) == frames * 512 * 512 * 2
    assert decompression_refusal(big_dataset, "1.2.3") == (
        f"instance 1.2.3 would take {frames * 512 * 512 * 2 / 1e6:,.0f} MB decompressed ({frames} frame(s) of "
        "512 x 512 pixels), more than the 2,000 MB the node decompresses for a retrieval; it is sent only to peers "
        "that accept its stored transfer syntax"
    )
    # a peer that takes JPEG 2000 gets the stored bytes: nothing is decoded for it
    as_stored = {(CT_IMAGE, JPEG2000Lossless)}
    assert readable_form(_stored(series.files[1]), as_stored)[1] == "as stored"
    assert readable_form(_stored(big), as_stored)[1] == "as stored"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.integration
def test_c_get_for_an_uncompressed_only_peer_fails_the_hostile_instances_and_sends_the_rest(tmp_path):
    series = write_phantom_series(tmp_path / "ct", replace(SPEC, compression="jpeg2000"))
    hostile = _rewrite_frame(series.files[1], _siz_size(16384, 16384))
    rle = write_phantom_series(tmp_path / "rle", replace(SPEC, compression="rle", slices=1))
    runs = pydicom.dcmread(rle.files[0])
    runs.StudyInstanceUID, runs.SeriesInstanceUID = hostile.StudyInstanceUID, hostile.SeriesInstanceUID
    runs.save_as(rle.files[0])
    runs = _rewrite_frame(rle.files[0], _rle_runs(20))
    big = _many_frames(tmp_path / "big", MAX_DECOMPRESSED_BYTES // (512 * 512 * 2) + 1)
    declared = pydicom.dcmread(big)
    declared.StudyInstanceUID, declared.SeriesInstanceUID = hostile.StudyInstanceUID, hostile.SeriesInstanceUID
    declared.save_as(big)
    node = Node(tmp_path / "node", {}).start()
    try:
        assert storescu(node.port, [*series.files, big], extra=["-xv"]).returncode == 0  # JPEG 2000
        assert storescu(node.port, rle.files, extra=["-xr"]).returncode == 0  # RLE
        peak_before = _peak_rss_mb(node.process.pid)

        ae = AE(ae_title="VIEWER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.3")  # Study Root Get
        ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])  # Explicit VR Little Endian only
        received: list[str] = []

        def on_store(event: evt.Event) -> int:
            received.append(str(event.dataset.SOPInstanceUID))
            return 0

        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title=node.ae_title,
            ext_neg=[build_role(CT_IMAGE, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = hostile.StudyInstanceUID, hostile.SeriesInstanceUID
        responses = list(assoc.send_c_get(query, "1.2.840.10008.5.1.4.1.2.2.3"))
        assoc.release()
        status, report = responses[-1]
        time.sleep(0.5)  # the log line is written as the handler ends

        refused = {hostile.SOPInstanceUID, runs.SOPInstanceUID, declared.SOPInstanceUID}
        assert status.Status == 0xB000
        assert set(report.FailedSOPInstanceUIDList) == refused
        assert sorted(received) == sorted(set(series.sop_instance_uids) - refused)
        log = node.log()
        assert log.count("retrieve.not_decompressed") == 3
        assert f"the JPEG 2000 data of instance {hostile.SOPInstanceUID} is 16384 x 16384 pixels" in log
        assert f"the RLE data of instance {runs.SOPInstanceUID} has a segment of 10,000,000 bytes" in log
        assert f"instance {declared.SOPInstanceUID} would take" in log
        grown = _peak_rss_mb(node.process.pid) - peak_before
        print(f"node peak memory grew {grown:.0f} MB during the C-GET")
        assert grown < MEMORY_BOUND_MB
        assert node.process.poll() is None
    finally:
        node.stop()


def test_a_jpeg2000_codestream_whose_sign_disagrees_with_pixel_representation_is_not_read_as_hu(
    tmp_path, shared_fixtures
):
    """TotalSegmentator's real JPEG 2000 slices are unsigned in the codestream and in the header; told signed
    (PixelRepresentation 1), their bone would decode as below air: the volume is refused, naming the image."""
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:3]
    assert load_series_volume(sources).hu.max() > 1000  # as sent: read as it is, bone included
    altered = []
    for path in sources:
        dataset = pydicom.dcmread(path)
        assert dataset.PixelRepresentation == 0
        dataset.PixelRepresentation = 1
        altered.append(tmp_path / path.name)
        dataset.save_as(altered[-1])
    with pytest.raises(VolumeError) as refused:
        load_series_volume(altered)
    assert str(refused.value).startswith("the JPEG 2000 data of image ")
    assert "says its samples are unsigned, but its PixelRepresentation says signed (1): read as the header says" in (
        str(refused.value)
    )
    assert encapsulated_problem(pydicom.dcmread(altered[0]), "it") is None  # C-GET re-encoding does not judge it


def test_signed_ct_written_as_an_unsigned_jpeg2000_codestream_reads_as_its_header_says(tmp_path, shared_fixtures):
    """A known encoder fault (dcm4che before 5.20): signed HU (RescaleIntercept 0) in an unsigned 13-bit
    codestream. Read as PixelRepresentation says, air and fat come out right: the series loads, HU unchanged."""
    openjpeg = pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the JPEG 2000 test data")
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:3]
    written, original = [], []
    for path in sources:
        dataset = pydicom.dcmread(path)
        hu = (dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)).astype(np.int16)
        original.append(hu)
        codestream = openjpeg.encode((hu.astype(np.int32) & 0x1FFF).astype(np.uint16), bits_stored=13)
        dataset.PixelData = encapsulate([codestream])
        dataset["PixelData"].VR = "OB"
        dataset.PixelRepresentation, dataset.BitsStored, dataset.HighBit = 1, 13, 12
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
        written.append(tmp_path / path.name)
        dataset.save_as(written[-1])

    volume = load_series_volume(written)

    by_uid = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): hu
        for p, hu in zip(written, original, strict=True)
    }
    for k, ref in enumerate(volume.slices):
        np.testing.assert_array_equal(volume.hu[k], by_uid[ref.sop_instance_uid])


def test_signed_ct_with_a_rim_interpolated_to_its_fill_written_as_an_unsigned_codestream_reads_as_its_header_says(
    tmp_path, shared_fixtures
):
    """The same encoder fault on a reformatted series: a -2000 fill outside a round field and a rim of 3 pixels
    interpolated between it and the image (hundreds of values between -2000 and -1500 HU). Before, that rim was
    taken for bone read on the wrong side and the series was refused; a rim joins the fill, as misread bone cannot."""
    openjpeg = pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the JPEG 2000 test data")
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:3]
    written, original = [], {}
    for path in sources:
        dataset = pydicom.dcmread(path)
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        rows, columns = np.indices(hu.shape)
        radius = np.hypot(rows - hu.shape[0] / 2 + 0.5, columns - hu.shape[1] / 2 + 0.5)
        outward = np.clip((radius - 237.0) / 3.0, 0.0, 1.0)  # 0 inside the field, 1 on the fill
        rimmed = np.rint(hu * (1 - outward) - 2000 * outward).astype(np.int16)
        assert len(np.unique(rimmed[(rimmed < -1500) & (rimmed > -2000)])) > 100
        original[str(dataset.SOPInstanceUID)] = rimmed
        codestream = openjpeg.encode((rimmed.astype(np.int32) & 0x1FFF).astype(np.uint16), bits_stored=13)
        dataset.PixelData = encapsulate([codestream])
        dataset["PixelData"].VR = "OB"
        dataset.PixelRepresentation, dataset.BitsStored, dataset.HighBit = 1, 13, 12
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
        written.append(tmp_path / path.name)
        dataset.save_as(written[-1])

    volume = load_series_volume(written)

    for k, ref in enumerate(volume.slices):
        np.testing.assert_array_equal(volume.hu[k], original[ref.sop_instance_uid])


def test_unsigned_ct_in_a_codestream_flagged_signed_reads_as_its_header_says(tmp_path, shared_fixtures):
    """The mirror case: TotalSegmentator's real 12-bit unsigned slices written as a signed codestream of the same
    bits. Read as PixelRepresentation 0 says, bone is bone (the codestream's reading would put it far below air):
    the series loads with its original HU."""
    openjpeg = pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the JPEG 2000 test data")
    sources = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[:3]
    written, original = [], {}
    for path in sources:
        dataset = pydicom.dcmread(path)
        stored = dataset.pixel_array.astype(np.int32)
        original[str(dataset.SOPInstanceUID)] = stored * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        same_bits = np.where(stored >= 2048, stored - 4096, stored).astype(np.int16)  # 12-bit two's complement
        dataset.PixelData = encapsulate([openjpeg.encode(same_bits, bits_stored=12)])
        dataset["PixelData"].VR = "OB"
        written.append(tmp_path / path.name)
        dataset.save_as(written[-1])

    volume = load_series_volume(written)

    assert volume.hu.max() > 1000  # the bone
    for k, ref in enumerate(volume.slices):
        np.testing.assert_array_equal(volume.hu[k], original[ref.sop_instance_uid])
