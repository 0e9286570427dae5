"""Pixel data that would decode to wrong values is refused naming the image, never read silently.

On the real TotalSegmentator CT (20 JPEG 2000 slices, BitsStored 12, unsigned), with the volume loader the
pipeline uses: values that need more bits than BitsStored (read with BitsStored bits, as decoders do, metal
would become fat or air) in every stored form, and JPEG 2000 frames that are cut short, overwritten in the
middle, or empty. Values that fit BitsStored, and intact codestreams, load exactly as before.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from inference.frames import codestream_damage, jpeg2000_damage
from inference.volume import VolumeError, load_series_volume
from tests.conftest import real_ct_copy, require_tool

VICTIM = 7  # the slice (by position) that is changed
DECODER_REFUSAL = "cannot be decoded: its JPEG 2000 Image Compression (Lossless Only) data is damaged or incomplete"
STORED_FORMS = {
    "uncompressed": ExplicitVRLittleEndian,
    "RLE": RLELossless,
    "JPEG 2000": JPEG2000Lossless,
    "JPEG-LS": JPEGLSLossless,
    "JPEG lossless": JPEGLosslessSV1,
}


@pytest.fixture
def ct(shared_fixtures, tmp_path) -> list[Path]:
    """A copy of the real CT to change, its files sorted by position."""
    return real_ct_copy(tmp_path / "ct", shared_fixtures)


@pytest.fixture
def reference(ct) -> np.ndarray:
    """The real CT's HU as the loader reads the untouched copy."""
    return load_series_volume(ct).hu


def _name(dataset: pydicom.Dataset) -> str:
    return f"image {dataset.InstanceNumber} (SOP Instance UID {dataset.SOPInstanceUID})"


def _refusal(files: list[Path]) -> str:
    with pytest.raises(VolumeError) as error:
        load_series_volume(files)
    return str(error.value)


# --- BitsStored -------------------------------------------------------------------------------------------------


def _store(
    path: Path, values: np.ndarray, *, signed: bool, syntax: UID, bits_stored: int = 12, **extra: tuple[str, int]
) -> None:
    """Write ``values`` as the pixels of ``path`` in ``syntax``, encoded with all 16 bits, then labelled with
    ``bits_stored`` (what an export with a wrong BitsStored writes). Signed values are HU (RescaleIntercept 0)."""
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 15, int(signed)
    dataset.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    if signed:
        dataset.RescaleIntercept = "0"
    for tag, (vr, value) in extra.items():
        dataset.add_new(int(tag, 16), vr, value)
    if syntax == JPEGLosslessSV1:  # DCMTK's encoder, as a PACS uses it
        native = path.with_suffix(".native")
        dataset.save_as(native)
        subprocess.run([require_tool("dcmcjpeg"), "+e1", str(native), str(path)], check=True)
        native.unlink()
        dataset = pydicom.dcmread(path)
    elif syntax != ExplicitVRLittleEndian:
        dataset.compress(syntax, generate_instance_uid=False)
    dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
    dataset.save_as(path)


def _stored_values(path: Path, signed: bool) -> np.ndarray:
    """The slice's stored values (HU + 1024, unsigned), or its HU (signed)."""
    values = pydicom.dcmread(path).pixel_array.astype(np.int32)
    return values - 1024 if signed else values


def _too_wide(path: Path, kind: str, bits: int) -> str:
    return (
        f"{_name(pydicom.dcmread(path))} has {kind} pixel values that need {bits} bits, but its BitsStored "
        "(0028,0101) says 12: read with 12 bits they would become other, wrong HU values, so the series is not "
        "processed; correct BitsStored in the export, or send the scanner's original images"
    )


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", STORED_FORMS.values(), ids=STORED_FORMS.keys())
def test_metal_beyond_bits_stored_is_refused_in_every_stored_form(ct, syntax, signed):
    values = _stored_values(ct[VICTIM], signed)
    values[200:210, 200:210] = 3000 if signed else 5000  # a prosthesis: 3000 HU, or 3976 HU stored as HU + 1024
    _store(ct[VICTIM], values, signed=signed, syntax=syntax)

    # with 12 bits, 5000 would read as 904 (-120 HU, fat) and 3000 HU as -1096 HU (air)
    assert _refusal(ct) == _too_wide(ct[VICTIM], "signed" if signed else "unsigned", 13)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["uncompressed", "RLE"])
def test_garbage_in_the_bits_above_bits_stored_is_refused(ct, syntax):
    values = _stored_values(ct[VICTIM], signed=False)
    values[::7, ::5] |= 0x8000
    _store(ct[VICTIM], values, signed=False, syntax=syntax)

    assert _refusal(ct) == _too_wide(ct[VICTIM], "unsigned", 16)


def test_signed_values_written_without_sign_extension_read_as_bits_stored_says(ct, reference):
    """-1000 HU written as 12 bits with zeros above (DICOM leaves the bits above BitsStored undefined): a frame
    with no value below 0 is read with its 12 bits, as pydicom reads it."""
    hu = _stored_values(ct[VICTIM], signed=True)
    _store(ct[VICTIM], hu & 0x0FFF, signed=True, syntax=ExplicitVRLittleEndian)

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


def test_metal_beside_sign_extended_air_is_still_refused_when_signed(ct):
    """Values from -1024 up to 3000 HU in one frame need 13 bits: BitsStored 12 cannot be right."""
    hu = _stored_values(ct[VICTIM], signed=True)
    assert hu.min() < 0
    hu[200:210, 200:210] = 3000
    _store(ct[VICTIM], hu, signed=True, syntax=ExplicitVRLittleEndian)

    assert _refusal(ct) == _too_wide(ct[VICTIM], "signed", 13)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", STORED_FORMS.values(), ids=STORED_FORMS.keys())
def test_values_that_fit_bits_stored_load_unchanged_in_every_stored_form(ct, reference, syntax, signed):
    for path in ct[VICTIM : VICTIM + 2]:
        _store(path, _stored_values(path, signed), signed=signed, syntax=syntax)

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


def test_an_embedded_overlay_in_the_bits_above_bits_stored_is_left_out(ct, reference):
    values = _stored_values(ct[VICTIM], signed=False)
    values[100:150, 100:150] |= 1 << 15  # a retired overlay plane in bit 15, declared by OverlayBitPosition
    overlay = {"60000010": ("US", 512), "60000011": ("US", 512), "60000100": ("US", 16), "60000102": ("US", 15)}
    _store(ct[VICTIM], values, signed=False, syntax=ExplicitVRLittleEndian, **overlay)

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"BitsStored": 20},
            "has BitsStored (0028,0101) 20, where it must be 1 to its BitsAllocated (0028,0100) 16: which bits of "
            "each pixel hold its value cannot be told",
        ),
        (
            {"HighBit": 15},
            "has HighBit (0028,0102) 15, but with BitsStored (0028,0101) 12 it must be 11: which bits of each pixel "
            "hold its value cannot be told",
        ),
        (
            {"PixelRepresentation": 2},
            "has PixelRepresentation (0028,0103) 2; it must be 0 (unsigned) or 1 (signed), so whether its pixel "
            "values are negative cannot be told",
        ),
    ],
    ids=["bits-stored-over-bits-allocated", "high-bit", "pixel-representation"],
)
def test_a_pixel_description_that_disagrees_with_itself_is_refused_by_the_loader(ct, change, reason):
    dataset = pydicom.dcmread(ct[VICTIM])
    for keyword, value in change.items():
        setattr(dataset, keyword, value)
    dataset.save_as(ct[VICTIM])

    assert _refusal(ct) == f"{_name(dataset)} {reason}"


# --- damaged JPEG 2000 ------------------------------------------------------------------------------------------


def _codestream(path: Path) -> bytes:
    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


def _write_fragments(path: Path, fragments: list[bytes]) -> pydicom.Dataset:
    """Make ``fragments`` (each padded to an even length) the pixel data of ``path``, after an empty offset table."""
    items = [b"", *(fragment + b"\x00" * (len(fragment) % 2) for fragment in fragments)]
    dataset = pydicom.dcmread(path)
    dataset.PixelData = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item for item in items)
    dataset.save_as(path)
    return dataset


def _rewrite_codestream(path: Path, change: Callable[[bytes], bytes]) -> pydicom.Dataset:
    dataset = pydicom.dcmread(path)
    dataset.PixelData = encapsulate([change(_codestream(path))])
    dataset.save_as(path)
    return dataset


def _without_tile_part_length(stream: bytes) -> bytes:
    """The codestream with Psot 0 in its (only) tile-part: it then runs to the end-of-codestream marker."""
    sot = stream.index(b"\xff\x90")
    return stream[: sot + 6] + bytes(4) + stream[sot + 10 :]


@pytest.mark.parametrize(
    "cut",
    [
        lambda stream: stream[: len(stream) // 2],
        lambda stream: stream[: len(stream) * 9 // 10],
        lambda stream: stream[:-10],
        lambda stream: stream.rstrip(b"\x00")[:-2],  # all but the end-of-codestream marker
        lambda stream: _without_tile_part_length(stream)[: len(stream) * 9 // 10],
        lambda stream: stream[: len(stream) // 2] + stream[len(stream) // 2 + 1000 :],  # 1000 bytes lost inside
        lambda stream: stream[: len(stream) // 2] + bytes(range(256)) * 4 + stream[len(stream) // 2 :],  # 1024 added
    ],
    ids=["half", "nine-tenths", "last-10-bytes", "end-marker", "open-ended-tile-part", "bytes-lost", "bytes-added"],
)
def test_a_codestream_cut_short_or_changed_in_length_is_refused_naming_the_image(ct, cut):
    damaged = _rewrite_codestream(ct[VICTIM], cut)

    assert _refusal(ct) == f"{_name(damaged)} {DECODER_REFUSAL}"


def _first_free(stream: bytes, position: int) -> int:
    """``position``, or the first after it that does not follow a 0xFF byte (where a marker code would start)."""
    while stream[position - 1] == 0xFF:
        position += 1
    return position


@pytest.mark.parametrize(
    ("damage", "code"),
    [(b"\xff" * 512, "FF FF"), (b"\xff\x90", "FF 90"), (b"\xff\xd9", "FF D9")],
    ids=["erased-block", "tile-part-marker", "end-marker"],
)
def test_a_codestream_overwritten_in_the_middle_is_refused_though_it_decodes(ct, damage, code):
    stream = _codestream(ct[VICTIM])
    at = _first_free(stream, len(stream) // 2)
    damaged = _rewrite_codestream(ct[VICTIM], lambda s: s[:at] + damage + s[at + len(damage) :])

    assert _refusal(ct) == (
        f"the JPEG 2000 data of {_name(damaged)} is damaged: a marker code ({code}) lies inside the compressed data "
        f"of tile 1, at byte {at:,}, where no encoder writes one; a decoder reads through such damage without an "
        "error, so its pixel values cannot be trusted: send the image again from the scanner or archive"
    )


def test_an_empty_fragment_in_place_of_the_codestream_is_refused_before_decoding(ct):
    damaged = _write_fragments(ct[VICTIM], [b""])

    assert _refusal(ct) == (
        f"the JPEG 2000 data of {_name(damaged)} is empty (a zero-length fragment): the image's compressed data is "
        "missing; it is not decoded"
    )


def test_an_empty_fragment_in_place_of_the_second_half_of_the_codestream_is_refused(ct):
    stream = _codestream(ct[VICTIM])
    damaged = _write_fragments(ct[VICTIM], [stream[: len(stream) // 2 & ~1], b""])

    assert _refusal(ct) == f"{_name(damaged)} {DECODER_REFUSAL}"


def test_an_empty_fragment_between_the_parts_of_a_whole_codestream_loses_nothing(ct, reference):
    stream = _codestream(ct[VICTIM])
    half = len(stream) // 2 & ~1
    _write_fragments(ct[VICTIM], [stream[:half], b"", stream[half:]])

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


def test_an_open_ended_last_tile_part_is_intact(ct, reference):
    _rewrite_codestream(ct[VICTIM], _without_tile_part_length)

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


# --- the structure check on codestreams of other encoders -----------------------------------------------------

OTHER_ENCODERS = [
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "GDCMJ2K_TextGBR.dcm",  # GDCM: 16 tiles of 6 tile-parts, each declaring 5
    "examples_jpeg2k.dcm",  # a JP2 file padded with 0xFF after its end-of-codestream marker
    "SC_rgb_gdcm_KY.dcm",
]


def _bundled(name: str) -> pydicom.Dataset:
    """One of the JPEG 2000 files pydicom ships (made by GDCM, Kakadu and others)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} does not come with this pydicom")
    return pydicom.dcmread(path)


def test_intact_codestreams_of_the_real_ct_and_other_encoders_show_no_damage(ct):
    datasets = [pydicom.dcmread(path) for path in ct] + [_bundled(name) for name in OTHER_ENCODERS]

    assert [codestream_damage(dataset, "it") for dataset in datasets] == [None] * len(datasets)


def test_a_lost_tile_part_that_the_decoder_reads_past_is_found():
    """GDCM's 16-tile codestream with its tile-part counts (TNsot) corrected to 6: losing the last tile-part of
    tile 6 (its finest detail) decodes without complaint, with thousands of pixel values changed."""
    dataset = _bundled("GDCMJ2K_TextGBR.dcm")
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    stream = bytearray(frame[frame.index(b"\xff\x4f\xff\x51") :])
    position, lost = stream.index(b"\xff\x90"), None
    while stream[position : position + 2] == b"\xff\x90":
        _, tile, length, part, _ = struct.unpack_from(">HHLBB", stream, position + 2)
        stream[position + 11] = 6
        lost = (position, length) if (tile, part) == (5, 5) else lost
        position += length
    assert jpeg2000_damage(bytes(stream)) is None and lost is not None
    start, length = lost

    assert jpeg2000_damage(bytes(stream[:start] + stream[start + length :])) == (
        "tile 6 has 5 of the 6 tile-parts it declares"
    )


# --- Bytes after native pixel data -------------------------------------------------------------------------------


def _with_bytes_after_the_pixels(path: Path, extra: bytes) -> None:
    dataset = pydicom.dcmread(path)
    dataset.decompress(generate_instance_uid=False)
    dataset.PixelData = dataset.PixelData + extra
    dataset.save_as(path)


def test_zero_bytes_after_native_pixel_data_are_padding_and_the_series_loads(ct, reference):
    """An intact image with 1,024 zero bytes after its pixels failed the whole series ("excess padding")."""
    _with_bytes_after_the_pixels(ct[VICTIM], bytes(1024))

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


def test_a_row_more_than_rows_says_is_not_taken_for_padding(ct):
    """513 rows of data under Rows 512: read as 512 the image is whole but one row is dropped, or the header is
    wrong about its columns and it is sheared; which cannot be told."""
    row = pydicom.dcmread(ct[VICTIM]).pixel_array[-1].astype(np.uint16).tobytes()
    _with_bytes_after_the_pixels(ct[VICTIM], row)

    assert (
        "holds 525,312 bytes, but its Rows 512 x Columns 512 x SamplesPerPixel 1 x BitsAllocated 16/8 need 524,288: "
        "read with these values the image would be wrong"
    ) in _refusal(ct)


# --- PixelRepresentation the pixel data does not bear out ------------------------------------------------------

MISLABEL_FORMS = {"uncompressed": ExplicitVRLittleEndian, "RLE": RLELossless, "JPEG-LS": JPEGLSLossless}
NO_SIGN_OF_THEIR_OWN = "would read far below air (bone read on the wrong side)"


def _write(
    path: Path,
    values: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    intercept: int = -1024,
    syntax: UID = ExplicitVRLittleEndian,
    labelled: bool | None = None,
    padding: int | None = None,
) -> pydicom.Dataset:
    """Write ``values`` (their 16-bit pattern) as the pixels of ``path``, encoded in ``syntax`` as ``signed``
    says, then labelled with PixelRepresentation ``labelled`` (an export or anonymiser that rewrote it)."""
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    dataset.PixelData = values.astype(np.int64).astype(np.int16 if signed else np.uint16).tobytes()
    dataset["PixelData"].VR = "OW"
    dataset.RescaleSlope, dataset.RescaleIntercept = "1", str(intercept)
    if padding is not None:
        dataset.add_new(0x00280120, "SS" if signed else "US", padding)
    if syntax != ExplicitVRLittleEndian:
        dataset.compress(syntax, generate_instance_uid=False)
    if labelled is not None:
        dataset.PixelRepresentation = int(labelled)
    dataset.save_as(path)
    return dataset


def _signed_header_refusal(dataset: pydicom.Dataset, stored: np.ndarray) -> str:
    """The refusal of an image whose unsigned 12-bit ``stored`` values (RescaleIntercept -1024) are labelled signed."""
    misread = (stored >= 2048) & (stored - 4096 - 1024 < -1500)
    hu = np.unique(stored[misread]) - 1024
    return (
        f"{_name(dataset)} has PixelRepresentation (0028,0103) 1 (signed), but read so, {int(misread.sum()):,} "
        f"pixels {NO_SIGN_OF_THEIR_OWN}, {hu[0] - 4096:,.0f} to {hu[-1] - 4096:,.0f} HU, as no CT can; read as "
        f"unsigned they would be {hu[0]:,.0f} to {hu[-1]:,.0f} HU: its values are most likely unsigned and "
        "PixelRepresentation wrong, so the series is not processed; correct PixelRepresentation in the export, "
        "or send the scanner's original images"
    )


@pytest.mark.parametrize("syntax", MISLABEL_FORMS.values(), ids=MISLABEL_FORMS.keys())
def test_a_signed_header_on_the_scanners_unsigned_12_bit_pixels_is_refused(ct, syntax):
    """PixelRepresentation 1 on the real CT's unsigned 12-bit values (RescaleIntercept -1024 kept): read signed,
    from BitsStored (uncompressed, RLE) or by the decoder (JPEG-LS), its bone (1,024 HU and up) would read
    -3,072 HU and up, below air, and leave the measurements: refused, naming the image, as JPEG 2000 is."""
    stored = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64)
    assert stored.min() >= 0 and stored.max() >= 2048  # bone in bit 11
    dataset = _write(ct[VICTIM], stored, bits_stored=12, signed=False, syntax=syntax, labelled=True)

    assert _refusal(ct) == _signed_header_refusal(dataset, stored)


@pytest.mark.parametrize("syntax", MISLABEL_FORMS.values(), ids=MISLABEL_FORMS.keys())
def test_an_unsigned_header_on_signed_16_bit_pixels_is_refused(ct, syntax):
    """PixelRepresentation 0 on signed 16-bit values with RescaleIntercept -1024 whose air noise lies just below
    0 (-1,025 to -1,040 HU): read unsigned, that air would be 64,496 HU and up, far above anything else in the
    image: refused, naming the image, where before the series was read with ~50,000 such pixels a slice."""
    stored = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64)
    air = stored == 0
    stored[air] -= np.random.default_rng(0).integers(0, 17, int(air.sum()))
    dataset = _write(ct[VICTIM], stored, bits_stored=16, signed=True, syntax=syntax, labelled=False)

    misread = stored < 0
    hu = np.unique(stored[misread]) + 65536 - 1024
    assert _refusal(ct) == (
        f"{_name(dataset)} has PixelRepresentation (0028,0103) 0 (unsigned), but read so, {int(misread.sum()):,} "
        f"pixels would read {hu[0]:,.0f} to {hu[-1]:,.0f} HU, far above every other pixel in it (the highest "
        f"other {stored.max() - 1024:,.0f} HU), as no CT can; read as signed they would be air or tissue, "
        f"{hu[0] - 65536:,.0f} to {hu[-1] - 65536:,.0f} HU: its values are most likely signed and "
        "PixelRepresentation wrong, so the series is not processed; correct PixelRepresentation in the export, or "
        "send the scanner's original images"
    )


def test_unsigned_12_bit_pixels_with_intercept_minus_1024_load_unchanged(ct, reference):
    """The scanner's own encoding, every slice uncompressed: bone in bit 11 is bone."""
    for path in ct:
        _write(path, pydicom.dcmread(path).pixel_array, bits_stored=12, signed=False)

    np.testing.assert_array_equal(load_series_volume(ct).hu, reference)


def _outside_field(shape: tuple[int, ...]) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return (rows - shape[0] / 2) ** 2 + (columns - shape[1] / 2) ** 2 > 250**2


def test_signed_16_bit_pixels_with_air_below_zero_and_minus_2000_padding_load_unchanged(ct):
    """Signed 16-bit with RescaleIntercept -1024, air noise below 0 and PixelPaddingValue -2000 (-3,024 HU)
    outside the field, as a GE scanner writes: read as stored."""
    stored = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64)
    air = stored == 0
    stored[air] -= np.random.default_rng(0).integers(0, 17, int(air.sum()))
    stored[_outside_field(stored.shape)] = -2000
    _write(ct[VICTIM], stored, bits_stored=16, signed=True, padding=-2000)

    volume = load_series_volume(ct)

    np.testing.assert_array_equal(volume.hu[VICTIM], stored - 1024)


@pytest.mark.parametrize("fill", [None, -2048], ids=["air", "air-and-fill"])
def test_signed_12_bit_pixels_without_sign_extension_whose_high_bit_is_air_load_unchanged(ct, fill):
    """HU (RescaleIntercept 0) written as 12 bits with zeros above: -1,000 HU is stored as 3096, bit 11 set, and
    reads as air; a fill of one value below air outside the field (-2,048 HU, undeclared) stands too."""
    hu = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64) - 1024
    if fill is not None:
        hu[_outside_field(hu.shape)] = fill
    _write(ct[VICTIM], hu & 0x0FFF, bits_stored=12, signed=False, intercept=0, labelled=True)

    np.testing.assert_array_equal(load_series_volume(ct).hu[VICTIM], hu)


@pytest.mark.parametrize("metal", ["block", "saturated"])
def test_unsigned_16_bit_metal_at_the_top_of_an_extended_scale_loads_unchanged(ct, metal):
    """Unsigned 16-bit, RescaleIntercept -1024: a prosthesis stored as 60,000 (58,976 HU; read as signed it
    would be far below air), or saturated at 65,535 with edges that climb to it through every value (read as
    signed, its top values would be air): metal, read as stored."""
    stored = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64)
    if metal == "block":
        stored[200:240, 200:240] = 60_000
    else:
        stored[200:240, 200:240] = 65_535
        edge = np.linspace(3_000, 65_535, 200).astype(np.int64)
        stored[180:200, 200:210] = edge.reshape(20, 10)
        stored[240:260, 200:210] = edge[::-1].reshape(20, 10)
        stored[200:240, 240:250] = np.linspace(65_535, 60_000, 400).astype(np.int64).reshape(40, 10)
    _write(ct[VICTIM], stored, bits_stored=16, signed=False)

    np.testing.assert_array_equal(load_series_volume(ct).hu[VICTIM], stored - 1024)


def _with_rim(stored: np.ndarray, fill: int, radius: float, width: int) -> np.ndarray:
    """``stored`` with ``fill`` outside a round field of ``radius`` pixels and a rim ``width`` pixels wide inside
    its edge blended linearly from the field's values to the fill, as a reformat or resampling interpolates it."""
    rows, columns = np.ogrid[: stored.shape[0], : stored.shape[1]]
    distance = np.sqrt((rows - stored.shape[0] / 2 + 0.3) ** 2 + (columns - stored.shape[1] / 2 + 0.6) ** 2)
    blended = stored.copy()
    blended[distance > radius] = fill
    rim = (distance > radius - width) & (distance <= radius)
    weight = (distance[rim] - (radius - width)) / width
    blended[rim] = np.round(stored[rim] * (1 - weight) + fill * weight).astype(np.int64)
    return blended


RIMS = {  # RescaleIntercept, PixelPaddingValue declared, field radius, rim width
    "HU-fill-undeclared": (0, None, 250, 3),
    "HU-padding-declared": (0, -2000, 250, 3),
    "HU+1024-padding-declared-rim-across-the-body": (-1024, -2000, 200, 1),
}


@pytest.mark.parametrize("rim", RIMS.values(), ids=RIMS.keys())
@pytest.mark.parametrize("syntax", MISLABEL_FORMS.values(), ids=MISLABEL_FORMS.keys())
def test_signed_12_bit_pixels_with_a_rim_interpolated_between_fill_and_field_load_unchanged(ct, syntax, rim):
    """Signed 12-bit with -2000 stored outside the field (-2,000 HU as HU, or -3,024 HU as GE stores HU + 1024)
    and a rim of hundreds of values interpolated between that fill and air or tissue (a reformatted or
    resampled series), written without sign extension (uncompressed, RLE) or sign-extended by the decoder
    (JPEG-LS): the rim's values lie far below air, and may lie where a misread sign puts bone, but they join
    the fill and run on smoothly into the field, so the image is read as stored, not refused as unsigned."""
    intercept, padding, radius, width = rim
    hu = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64) - 1024
    stored = _with_rim(np.clip(hu - intercept, -1024 - intercept, 2047), -2000, radius, width)
    rim_values = np.unique(stored[(stored > -2000) & (stored + intercept < -1500)])
    assert len(rim_values) > 100  # far more than a fill of a few values
    if syntax == JPEGLSLossless:
        _write(ct[VICTIM], stored, bits_stored=12, signed=True, intercept=intercept, syntax=syntax, padding=padding)
    else:
        written = stored & 0x0FFF
        if padding is not None:  # declared as the data holds it, without sign extension
            _write(ct[VICTIM], written, bits_stored=12, signed=False, intercept=intercept, syntax=syntax)
            dataset = pydicom.dcmread(ct[VICTIM])
            dataset.PixelRepresentation = 1
            dataset.add_new(0x00280120, "SS", padding)
            dataset.save_as(ct[VICTIM])
        else:
            _write(ct[VICTIM], written, bits_stored=12, signed=False, intercept=intercept, syntax=syntax, labelled=True)

    np.testing.assert_array_equal(load_series_volume(ct).hu[VICTIM], stored + intercept)


@pytest.mark.parametrize("syntax", MISLABEL_FORMS.values(), ids=MISLABEL_FORMS.keys())
def test_signed_12_bit_pixels_with_air_noise_far_below_air_and_no_fill_load_unchanged(ct, syntax):
    """Signed 12-bit HU (RescaleIntercept 0) whose air noise reaches -1,700 HU in hundreds of values (a sharp
    kernel at low dose, not clipped), with no fill to join: the values are continuous with the air beside them,
    as a misread sign's bone is not, so the image is read as stored."""
    hu = pydicom.dcmread(ct[VICTIM]).pixel_array.astype(np.int64) - 1024
    hu = np.clip(hu, -1024, 2047)
    rng = np.random.default_rng(0)
    noisy = (hu == -1024) & (rng.random(hu.shape) < 0.05)
    hu[noisy] -= rng.integers(0, 677, int(noisy.sum()))
    assert len(np.unique(hu[hu < -1500])) > 100
    if syntax == JPEGLSLossless:
        _write(ct[VICTIM], hu, bits_stored=12, signed=True, intercept=0, syntax=syntax)
    else:
        _write(ct[VICTIM], hu & 0x0FFF, bits_stored=12, signed=False, intercept=0, syntax=syntax, labelled=True)

    np.testing.assert_array_equal(load_series_volume(ct).hu[VICTIM], hu)
