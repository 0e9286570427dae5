"""Data sets built to exhaust the receiver: refused at C-STORE before they cost memory."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db.models import RejectedInstance
from dicom_node import status
from dicom_node.receive.storage import encode_file_meta
from tests.conftest import Node, send_file_raw

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode()
    return encoded + b"\0" if len(encoded) % 2 else encoded


def _header(sop_instance: str) -> bytes:
    return _element(0x0008, 0x0016, b"UI", _uid(CT_IMAGE)) + _element(0x0008, 0x0018, b"UI", _uid(sop_instance))


def _send(node: Node, folder: Path, sop_instance: str, syntax: str, payload_chunks) -> tuple[int, str]:
    """C-STORE a data set written chunk by chunk (never held whole), as its raw bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_instance}.dcm"
    with open(path, "wb") as stream:
        stream.write(encode_file_meta(CT_IMAGE, sop_instance, syntax, "PACS"))
        for chunk in payload_chunks:
            stream.write(chunk)
    response = send_file_raw(node.port, path, CT_IMAGE, syntax, called_ae=node.ae_title)
    return int(response.Status), str(response.get("ErrorComment", ""))


def _deflate_bomb(sop_instance: str, inflated_bytes: int):
    """A 2 MB Deflate stream that inflates to ``inflated_bytes``: header, then one huge OB element of zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    yield compressor.compress(_header(sop_instance) + struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, inflated_bytes))
    zeros = bytes(64 * 1024 * 1024)
    for _ in range(inflated_bytes // len(zeros)):
        yield compressor.compress(zeros)
    yield compressor.flush()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _reason(node: Node, sop_instance: str) -> str:
    with node.sessions() as session:
        return session.scalars(
            select(RejectedInstance.reason).where(RejectedInstance.sop_instance_uid == sop_instance)
        ).one()


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path, start_node):
    node = start_node()
    before = _peak_rss_mb(node.process.pid)
    uid = generate_uid()

    answered = _send(
        node, tmp_path / "bomb", uid, DeflatedExplicitVRLittleEndian, _deflate_bomb(uid, 2200 * 1024 * 1024)
    )

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert "inflates to more than 2048 MB" in _reason(node, uid) and "decompression bomb" in _reason(node, uid)
    peak = _peak_rss_mb(node.process.pid)
    print(f"node peak RSS {before:.0f} MB before, {peak:.0f} MB after a 2.2 GB deflate bomb")
    assert peak - before < 200  # inflated in 16 MB chunks and counted, never held


def _deflated(*parts: bytes | int) -> list[bytes]:
    """A Deflate stream of ``parts``: bytes as they are, a number as that many zero bytes (never held whole)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = []
    for part in parts:
        if isinstance(part, bytes):
            chunks.append(compressor.compress(part))
            continue
        zeros = bytes(min(part, 16 * 1024 * 1024))
        for start in range(0, part, len(zeros)):
            chunks.append(compressor.compress(zeros[: min(len(zeros), part - start)]))
    return [*chunks, compressor.flush()]


def _image_header(sop_instance: str, pixel_bytes: int) -> bytes:
    """A 16 x 16, 16-bit image's header, up to its Pixel Data element declaring ``pixel_bytes`` (it needs 512)."""
    us = [(0x0002, 1), (0x0010, 16), (0x0011, 16), (0x0100, 16), (0x0101, 16), (0x0102, 15), (0x0103, 0)]
    image = b"".join(_element(0x0028, element, b"US", struct.pack("<H", value)) for element, value in us)
    return _header(sop_instance) + image + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)


@pytest.mark.parametrize(
    ("parts", "refusal"),
    [
        pytest.param(
            lambda uid: [_image_header(uid, 512 + 300 * 1024**2), 512 + 300 * 1024**2],
            "Pixel Data holds 314572800 bytes more than its header needs (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
            "BitsAllocated 16 x 1 frame(s)); more than 64 KB beyond the image is not padding, so the instance is "
            "refused",
            id="pixel-data-padded-with-zeros",
        ),
        pytest.param(
            lambda uid: [
                _image_header(uid, 512),
                512,
                struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 300 * 1024**2),
                300 * 1024**2,
            ],
            "Deflate-compressed data set holds 314572812 bytes after its Pixel Data, more than the 1 MB an image "
            "carries there: refused as a decompression bomb",
            id="trailing-padding",
        ),
    ],
)
def test_zeros_deflated_past_what_an_image_needs_are_refused_at_c_store(tmp_path, start_node, parts, refusal):
    node = start_node()
    uid = generate_uid()

    answered = _send(node, tmp_path / "bomb", uid, DeflatedExplicitVRLittleEndian, _deflated(*parts(uid)))

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid) == refusal
    assert node.cli("status").returncode == 0 and node.process.poll() is None  # the node keeps serving


def test_uncompressed_pixel_data_longer_than_padding_explains_is_refused(tmp_path, start_node):
    node = start_node()
    uid = generate_uid()
    pixels = 512 + 2**20  # the image needs 512 (1,024 zero bytes more are accepted: tests/test_pixel_integrity.py)

    answered = _send(
        node, tmp_path / "bloated", uid, ExplicitVRLittleEndian, [_image_header(uid, pixels), bytes(pixels)]
    )

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid).startswith("Pixel Data holds 1048576 bytes more than its header needs")


def test_deeply_nested_sequences_are_refused_at_c_store(tmp_path, start_node):
    node = start_node()
    uid = generate_uid()
    depth = 50_000
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    answered = _send(
        node, tmp_path / "nested", uid, ExplicitVRLittleEndian, [_header(uid), opening * depth, closing * depth]
    )

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid).startswith("data set nests sequences too deeply to be read")
    assert node.cli("status").returncode == 0 and node.process.poll() is None  # the node keeps serving


def test_tiny_jpeg2000_images_declaring_8192_by_8192_are_refused_before_any_allocation(tmp_path, start_node):
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from db.models import JobEvent, JobState
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from tests.conftest import CT_RULES, storescu

    series = write_phantom_series(tmp_path / "src", PhantomSpec(rows=64, columns=64, slices=3))
    for path in series.files:  # each a few hundred bytes, declaring 8192 x 8192 pixels
        dataset = pydicom.dcmread(path)
        dataset.Rows = dataset.Columns = 8192
        dataset.PixelData = np.zeros((8192, 8192), dtype=np.int16).tobytes()
        dataset.compress(JPEG2000Lossless)
        dataset.save_as(path)
        assert path.stat().st_size < 4096
    node = start_node(rules=CT_RULES, inference={"workers": 1})

    assert storescu(node.port, series.files, extra=["-xv"]).returncode == 0  # stored as sent

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=60)
    assert node.job_reason(series.series_instance_uid) == (
        "not admitted: images of 8192 x 8192 pixels are larger than a CT reconstruction matrix can be "
        "(2048 x 2048, admission.max_matrix)"
    )
    with node.sessions() as session:  # refused from the headers: no worker ever held it
        states = [e.to_state for e in session.query(JobEvent).order_by(JobEvent.id)]
    assert JobState.PROCESSING not in states


EMPTY_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def test_an_undefined_length_sequence_of_empty_items_is_refused_before_it_is_read(tmp_path, start_node):
    """2 MB of empty items (262,144): read by pydicom, about 160 MB of memory and 5 s of CPU per copy."""
    node = start_node()
    before = _peak_rss_mb(node.process.pid)
    uid = generate_uid()
    sequence = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    answered = _send(
        node, tmp_path / "items", uid, ExplicitVRLittleEndian, [_header(uid), sequence, EMPTY_ITEM * 262_144, closing]
    )

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid) == (
        "the data set holds more than 10,000 sequence items before its pixel data, more than an image of 1 frame(s) "
        "needs; refused unread, as reading it would take gigabytes of memory"
    )
    assert _peak_rss_mb(node.process.pid) - before < 100
    assert node.process.poll() is None


def test_per_frame_groups_far_more_than_the_frames_are_refused_at_c_store(tmp_path, start_node):
    """A defined-length PerFrameFunctionalGroupsSequence of 500,000 empty items for one frame: cheap to receive,
    gigabytes once admission reads it, unless refused here."""
    node = start_node()
    uid = generate_uid()
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 500_000
    frames = _element(0x0028, 0x0008, b"IS", b"1 ")
    per_frame = _element(0x5200, 0x9230, b"SQ", items)

    answered = _send(node, tmp_path / "frames", uid, ExplicitVRLittleEndian, [_header(uid), frames, per_frame])

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid).startswith("the data set holds more than 10,000 sequence items before its pixel data")


def _private_elements(count: int) -> bytes:
    return b"".join(_element(0x0009 + 2 * (n // 4096), 0x1000 + n % 4096, b"LO", b"x ") for n in range(count))


PIXELS = _element(0x7FE0, 0x0010, b"OB", bytes(64))


def test_an_image_holds_at_most_5000_elements_and_128_per_further_frame_a_report_more():
    """Admission reads every image of a series in one thread: 200 images of 98,000 elements each held up another
    sender's 3-slice series for 55 s. A real CT slice holds a few hundred; a report or structure set has no pixel
    data and may hold more."""
    from dicom_node.receive.structure import structure_problem

    image = _header("1.2.3") + _private_elements(4_998)  # 5,000 with the two UIDs
    assert structure_problem(image + PIXELS, implicit=False, little_endian=True) is None
    image += _private_elements(1)
    assert structure_problem(image + PIXELS, implicit=False, little_endian=True) == (
        "the data set holds 5,001 elements before its pixel data, more than an image of 1 frame(s) needs (5,000 at "
        "most); refused unread, as reading such images would hold up the series of every other sender"
    )
    report = _header("1.2.3") + _private_elements(20_000)
    assert structure_problem(report, implicit=False, little_endian=True) is None
    frames = _element(0x0028, 0x0008, b"IS", b"300 ")  # 5,000 + 299 x 128 = 43,272
    enhanced = _header("1.2.3") + frames + _private_elements(40_000) + PIXELS
    assert structure_problem(enhanced, implicit=False, little_endian=True) is None


def test_an_image_of_too_many_elements_is_refused_at_c_store(tmp_path, start_node):
    node = start_node()
    uid = generate_uid()

    answered = _send(
        node, tmp_path / "elements", uid, ExplicitVRLittleEndian, [_header(uid), _private_elements(6_000), PIXELS]
    )

    assert answered == (status.CANNOT_UNDERSTAND, "Cannot understand: the reason is in the node's log")
    assert _reason(node, uid).startswith(
        "the data set holds 6,002 elements before its pixel data, more than an image of 1 frame(s) needs (5,000 at "
        "most)"
    )


def test_structure_walk_allows_what_real_images_hold_and_follows_every_encoding():
    from dicom_node.receive.structure import structure_problem

    nested = _header("1.2.3") + struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    nested += (
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    ) * 70
    assert structure_problem(nested, implicit=False, little_endian=True).startswith(
        "data set nests sequences too deeply to be read (more than 64 levels"
    )
    # a sequence sent as UN of undefined length is implicit VR inside; its items are counted all the same
    as_un = struct.pack("<HH2sHI", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + EMPTY_ITEM * 10_001
    assert "10,000 sequence items" in structure_problem(_header("1.2.3") + as_un, implicit=False, little_endian=True)
    implicit = struct.pack("<HHI", 0x0009, 0x1010, 0xFFFFFFFF) + EMPTY_ITEM * 10_001
    assert "10,000 sequence items" in structure_problem(implicit, implicit=True, little_endian=True)
    # more frames allow more items: 300 frames of an Enhanced CT's functional groups
    frames = _element(0x0028, 0x0008, b"IS", b"300 ")
    per_frame = _element(0x5200, 0x9230, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 12_000)
    assert structure_problem(_header("1.2.3") + frames + per_frame, implicit=False, little_endian=True) is None


def test_structure_walk_passes_the_real_ct_slices(shared_fixtures):
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicom_node.receive.structure import structure_problem

    for path in sorted((shared_fixtures / "example_ct_dicom_valid").iterdir())[:3]:
        dataset = pydicom.dcmread(path)
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, dataset)
        assert structure_problem(encoded.getvalue(), implicit=False, little_endian=True) is None


def test_a_header_of_megabytes_before_the_pixel_data_is_refused_unless_its_frames_need_it():
    """A 9 MB private value in each image would be held by admission, the worker and the encoder, per image."""
    from dicom_node.receive.structure import structure_problem

    private = _element(0x0009, 0x1010, b"OB", bytes(9 * 1024**2))
    pixels = _element(0x7FE0, 0x0010, b"OB", bytes(64))

    assert structure_problem(_header("1.2.3") + private + pixels, implicit=False, little_endian=True) == (
        "the data set holds 9.0 MB before its pixel data, more than the header of an image of 1 frame(s) needs "
        "(8.0 MB at most); refused unread, as every copy of it would be held in memory"
    )
    frames = _element(0x0028, 0x0008, b"IS", b"300 ")  # 300 frames may carry 8 MB + 299 x 16 KB
    assert structure_problem(_header("1.2.3") + frames + private + pixels, implicit=False, little_endian=True) is None


def test_an_icons_compressed_fragments_are_skipped_not_read_as_elements():
    """A fragment shaped like an element header must not throw the walk off the items that follow."""
    from dicom_node.receive.structure import structure_problem

    fragment = struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, 0x7FFFFFF0) + bytes(8)  # looks like a 2 GB value
    icon_pixels = (
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # empty offset table
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment))
        + fragment
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    icon = (
        struct.pack("<HH2sHI", 0x0088, 0x0200, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + icon_pixels
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    items = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + EMPTY_ITEM * 10_001
    items += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    assert structure_problem(_header("1.2.3") + icon, implicit=False, little_endian=True) is None
    assert "10,000 sequence items" in structure_problem(
        _header("1.2.3") + icon + items, implicit=False, little_endian=True
    )


def test_a_private_sequence_in_implicit_vr_is_counted_though_no_dictionary_names_it():
    from dicom_node.receive.structure import structure_problem

    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 10_001
    private = struct.pack("<HHI", 0x0071, 0x1018, len(items)) + items  # defined length, read as SQ by pydicom

    assert "10,000 sequence items" in structure_problem(private, implicit=True, little_endian=True)
    plain = struct.pack("<HHI", 0x0071, 0x1019, 8) + bytes(8)  # a private value that is no sequence
    assert structure_problem(plain, implicit=True, little_endian=True) is None
