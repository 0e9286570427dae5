"""A damaged JPEG frame (JPEG Lossless, as CT archives store it, or JPEG Baseline) never decodes into a volume.

libjpeg, which GDCM and Pillow decode JPEG with, reads through a frame overwritten or missing bytes inside, or
cut short behind its end-of-image marker, with only a message on the console, and gives an image. These tests
damage one slice of JPEG copies of the real CT (made by DCMTK's dcmcjpeg, as a PACS makes them) and check that
the series is refused naming that image, and that intact copies load as they are.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1

from db.models import JobState
from inference import frames
from inference.frames import jpeg_damage
from inference.volume import load_series_volume
from tests.conftest import CT_RULES, real_ct_copy, require_tool, storescu
from tests.test_pixel_integrity import _name, _refusal

VICTIM = 7  # the slice (by position) that is damaged
DCMCJPEG = {JPEGLosslessSV1: "+e1", JPEGLossless: "+el", JPEGBaseline8Bit: "+eb"}
LOSSLESS = [JPEGLosslessSV1, JPEGLossless]
DAMAGED = (
    "; a decoder reads through such damage without an error, so its pixel values cannot be trusted: send the "
    "image again from the scanner or archive"
)


@pytest.fixture(scope="module")
def encoded(shared_fixtures, tmp_path_factory) -> Callable[[UID], Path]:
    """The real CT in a JPEG transfer syntax, encoded once per syntax by dcmcjpeg: a folder to copy."""
    folders: dict[UID, Path] = {}

    def encode(syntax: UID) -> Path:
        if syntax not in folders:
            folder = tmp_path_factory.mktemp(f"ct-{DCMCJPEG[syntax][1:]}")
            native = folder / "native.tmp"
            for source in (shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"):
                dataset = pydicom.dcmread(source)
                dataset.decompress(generate_instance_uid=False)
                dataset.save_as(native)
                subprocess.run(
                    [require_tool("dcmcjpeg"), DCMCJPEG[syntax], str(native), str(folder / source.name)], check=True
                )
            native.unlink()
            folders[syntax] = folder
        return folders[syntax]

    return encode


def _copy(encoded: Callable[[UID], Path], syntax: UID, folder: Path) -> list[Path]:
    shutil.copytree(encoded(syntax), folder)
    return sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


@pytest.fixture(params=[*LOSSLESS, JPEGBaseline8Bit], ids=["lossless-sv1", "lossless", "baseline"])
def jpeg_ct(request, encoded, tmp_path) -> list[Path]:
    """A copy of the real CT in one JPEG transfer syntax, its files sorted by position."""
    return _copy(encoded, request.param, tmp_path / "ct")


@pytest.fixture
def reference(shared_fixtures, tmp_path) -> np.ndarray:
    """The real CT's HU, as the loader reads the scanner's own (JPEG 2000) files."""
    return load_series_volume(real_ct_copy(tmp_path / "original", shared_fixtures)).hu


def _frame(path: Path) -> bytes:
    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


def _rewrite_frame(path: Path, change: Callable[[bytes], bytes]) -> pydicom.Dataset:
    dataset = pydicom.dcmread(path)
    dataset.PixelData = encapsulate([change(_frame(path))])
    dataset.save_as(path)
    return dataset


def _decodes_without_a_warning(path: Path) -> bool:
    """Whether pydicom's decoders give an array for ``path`` without raising or warning (as libjpeg does)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return not caught


def _extra_bytes(damaged: pydicom.Dataset) -> str:
    """The reason for a lossless slice with a run of its compressed data zeroed, as a pattern (the number of
    bytes left over depends on the encoder's Huffman table)."""
    return (
        re.escape(f"the JPEG data of {_name(damaged)} is damaged: its compressed data holds ")
        + r"\d{3} bytes more than its 262,144 samples take: bytes in it were changed or added"
        + re.escape(DAMAGED)
    )


def _scan_middle(frame: bytes) -> int:
    """An offset in the middle of the frame's compressed data, not just after a 0xFF byte."""
    start = frame.index(b"\xff\xda") + 2
    position = (start + len(frame)) // 2
    while frame[position - 1] == 0xFF:
        position += 1
    return position


def test_intact_jpeg_lossless_copies_of_the_real_ct_load_as_the_original(encoded, tmp_path, reference):
    for syntax in LOSSLESS:
        files = _copy(encoded, syntax, tmp_path / syntax.name.replace(" ", "-"))

        np.testing.assert_array_equal(load_series_volume(files).hu, reference)


def test_an_intact_jpeg_baseline_copy_of_the_real_ct_loads(encoded, tmp_path):
    files = _copy(encoded, JPEGBaseline8Bit, tmp_path / "ct")

    assert load_series_volume(files).hu.shape == (20, 512, 512)


@pytest.mark.parametrize(
    "damage",
    [
        lambda frame, at: frame[:at] + bytes(512) + frame[at + 512 :],
        lambda frame, at: frame[:at] + bytes(16) + frame[at + 16 :],
        lambda frame, at: frame[:at] + b"\xff\xd9" + frame[at + 2 :],
        lambda frame, at: frame[:at] + frame[at + 1000 :],
        lambda frame, at: frame[:at] + b"\xff\xd9",
    ],
    ids=["zeroed-512-bytes", "zeroed-16-bytes", "end-marker-inside", "1000-bytes-lost", "cut-behind-end-marker"],
)
def test_a_frame_damaged_inside_is_refused_naming_the_image_though_it_decodes(jpeg_ct, damage):
    damaged = _rewrite_frame(jpeg_ct[VICTIM], lambda frame: damage(frame, _scan_middle(frame)))
    assert _decodes_without_a_warning(jpeg_ct[VICTIM])  # libjpeg only prints "Corrupt JPEG data" on the console

    reason = _refusal(jpeg_ct)

    assert reason.startswith(f"the JPEG data of {_name(damaged)} is damaged: its compressed data "), reason
    assert reason.endswith(DAMAGED), reason


@pytest.mark.parametrize("walk", ["all-positions-at-once", "code-by-code"])
def test_the_reason_says_how_the_compressed_data_disagrees_with_its_samples(encoded, tmp_path, monkeypatch, walk):
    if walk == "code-by-code":  # as data over 1 MiB is walked
        monkeypatch.setattr(frames, "MAX_JUMPED_BYTES", 0)
    files = _copy(encoded, JPEGLosslessSV1, tmp_path / "ct")
    frame = _frame(files[VICTIM])
    at = _scan_middle(frame)
    damaged = _rewrite_frame(files[VICTIM], lambda frame: frame[:at] + bytes(512) + frame[at + 512 :])

    assert re.fullmatch(_extra_bytes(damaged), _refusal(files))


def test_a_frame_over_a_mebibyte_is_walked_code_by_code(encoded, tmp_path):
    files = _copy(encoded, JPEGLosslessSV1, tmp_path / "ct")
    dataset = pydicom.dcmread(files[VICTIM])  # 16-bit noise beside 0 and 65535 (category 16): some 4 bits a sample
    values = np.random.default_rng(2).integers(0, 1 << 16, size=(1024, 1024), dtype=np.uint16)
    values[::2, ::3], values[1::2, ::5] = 0, 65535
    dataset.decompress(generate_instance_uid=False)
    dataset.Rows, dataset.Columns, dataset.BitsStored, dataset.HighBit = 1024, 1024, 16, 15
    dataset.PixelData = values.tobytes()
    native, large = tmp_path / "native.dcm", tmp_path / "large.dcm"
    dataset.save_as(native)
    subprocess.run([require_tool("dcmcjpeg"), "+e1", str(native), str(large)], check=True)
    frame = _frame(large)
    at = _scan_middle(frame)

    assert len(frame) > frames.MAX_JUMPED_BYTES
    assert jpeg_damage(frame) is None
    assert jpeg_damage(frame[:at] + bytes(512) + frame[at + 512 :]) is not None
    assert jpeg_damage(frame[:at] + frame[at + 1 :]) is not None


@pytest.mark.parametrize(
    "cut",
    [
        lambda frame: frame[: len(frame) // 2],
        lambda frame: frame[:-10],
        lambda frame: frame.rstrip(b"\x00")[:-2],  # all but the end-of-image marker
    ],
    ids=["half", "last-10-bytes", "end-marker"],
)
def test_a_frame_cut_short_is_refused_naming_the_image(jpeg_ct, cut):
    damaged = _rewrite_frame(jpeg_ct[VICTIM], cut)
    syntax = damaged.file_meta.TransferSyntaxUID

    reason = _refusal(jpeg_ct)

    assert reason in (
        f"{_name(damaged)} cannot be decoded: its {syntax.name} data is damaged or incomplete",
        f"the JPEG data of {_name(damaged)} is damaged: its compressed data ends without its end-of-image marker: "
        f"it was cut short{DAMAGED}",
    ), reason


# --- restart markers (Pillow writes them into a baseline frame) ---------------------------------------------------


def _with_restart_markers(path: Path) -> bytes:
    """The slice as a JPEG Baseline frame with a restart marker after every 4 rows of blocks (16 intervals)."""
    stream = io.BytesIO()
    Image.fromarray(pydicom.dcmread(path).pixel_array).save(stream, "JPEG", quality=95, restart_marker_rows=4)
    return stream.getvalue()


def _restart_marker(frame: bytes, number: int) -> int:
    """Where restart marker ``number`` (counted from 0, as RSTn repeat 0 to 7) starts."""
    position = frame.index(b"\xff\xda")
    for counted in range(number + 1):
        position = frame.index(bytes([0xFF, 0xD0 + counted % 8]), position + 2)
    return position


def test_a_frame_with_restart_markers_loads_and_one_lost_interval_is_named(encoded, tmp_path):
    files = _copy(encoded, JPEGBaseline8Bit, tmp_path / "ct")
    frame = _with_restart_markers(files[VICTIM])
    _rewrite_frame(files[VICTIM], lambda _: frame)
    load_series_volume(files)
    third, fourth = _restart_marker(frame, 2), _restart_marker(frame, 3)

    damaged = _rewrite_frame(files[VICTIM], lambda _: frame[:third] + frame[fourth:])

    assert _refusal(files) == (
        f"the JPEG data of {_name(damaged)} is damaged: its restart marker at byte {third:,} is RST3 where RST2 "
        f"must come: the data between them was lost{DAMAGED}"
    )


def test_eight_lost_restart_intervals_are_found_by_their_count(encoded, tmp_path):
    files = _copy(encoded, JPEGBaseline8Bit, tmp_path / "ct")
    frame = _with_restart_markers(files[VICTIM])
    first, ninth = _restart_marker(frame, 0), _restart_marker(frame, 8)

    damaged = _rewrite_frame(files[VICTIM], lambda _: frame[:first] + frame[ninth:])

    assert _refusal(files) == (
        f"the JPEG data of {_name(damaged)} is damaged: its compressed data holds 8 restart interval(s), but its "
        f"restart interval (256) and size make 16: data was lost or added{DAMAGED}"
    )


# --- intact frames of other encoders ------------------------------------------------------------------------------


def _gdcm_lossless(path: Path, target: Path) -> Path:
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


OTHER_ENCODERS = [
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # lossless, three interleaved components: its markers only are checked
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # subsampled colour: two luminance blocks in each unit
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "examples_ybr_color.dcm",  # 30 frames
]


def test_intact_frames_of_other_encoders_show_no_damage(shared_fixtures, tmp_path):
    native = tmp_path / "native.dcm"
    dataset = pydicom.dcmread(real_ct_copy(tmp_path / "ct", shared_fixtures)[VICTIM])
    dataset.decompress(generate_instance_uid=False)
    dataset.save_as(native)
    sixteen_bit = pydicom.dcmread(native)  # 16-bit values 0 beside 65535: differences of category 16
    values = np.random.default_rng(1).integers(0, 1 << 16, size=(512, 512), dtype=np.uint16)
    values[::2, ::3], values[1::2, ::5] = 0, 65535
    sixteen_bit.BitsStored, sixteen_bit.HighBit, sixteen_bit.PixelData = 16, 15, values.tobytes()
    sixteen_bit.save_as(tmp_path / "sixteen.dcm")
    encoded = [
        _gdcm_lossless(native, tmp_path / "gdcm.dcm"),
        _gdcm_lossless(tmp_path / "sixteen.dcm", tmp_path / "g16.dcm"),
    ]
    for option in DCMCJPEG.values():
        target = tmp_path / f"sixteen{option}.dcm"
        if option != "+eb":
            subprocess.run([require_tool("dcmcjpeg"), option, str(tmp_path / "sixteen.dcm"), str(target)], check=True)
            encoded.append(target)
    frames = [
        frame
        for path in [*encoded, *(Path(get_testdata_file(name)) for name in OTHER_ENCODERS)]
        for frame in generate_frames(
            pydicom.dcmread(path).PixelData, number_of_frames=int(pydicom.dcmread(path).get("NumberOfFrames") or 1)
        )
    ]

    assert len(frames) == 4 + len(OTHER_ENCODERS) - 1 + 30
    assert [jpeg_damage(frame) for frame in frames] == [None] * len(frames)
    assert np.array_equal(pydicom.dcmread(tmp_path / "g16.dcm").pixel_array, values)


# --- the node ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_jpeg_lossless_series_with_a_damaged_image_fails_naming_it_and_an_intact_one_goes_done(
    encoded, tmp_path, start_node
):
    intact = _copy(encoded, JPEGLosslessSV1, tmp_path / "intact")
    damaged_files = _copy(encoded, JPEGLosslessSV1, tmp_path / "damaged")
    for path in damaged_files:  # another series, so both are processed
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = dataset.SeriesInstanceUID + ".9"
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID + ".9"
        dataset.save_as(path)
    frame = _frame(damaged_files[VICTIM])
    at = _scan_middle(frame)
    damaged = _rewrite_frame(damaged_files[VICTIM], lambda frame: frame[:at] + bytes(512) + frame[at + 512 :])
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    assert storescu(node.port, [*intact, *damaged_files], extra=["-xs"]).returncode == 0

    node.wait_for_state(damaged.SeriesInstanceUID, JobState.FAILED, timeout=180)
    assert re.fullmatch(_extra_bytes(damaged), node.job_reason(damaged.SeriesInstanceUID) or "")
    node.wait_for_state(pydicom.dcmread(intact[0]).SeriesInstanceUID, JobState.DONE, timeout=180)
