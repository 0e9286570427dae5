"""Check each compressed frame's own header against the image's header before any decoder runs.

A decoder allocates what the frame's own header says: a 2 KB JPEG 2000 codestream whose SIZ marker
says 16384 x 16384 makes it allocate gigabytes, whatever Rows and Columns say, and runs of RLE expand
64 times before anything counts them. So each frame's header is read first and must describe the
image that Rows, Columns, SamplesPerPixel and BitsAllocated describe:

- JPEG 2000 and HTJ2K (bare codestream or JP2 boxes): the SIZ marker's image size (Xsiz - XOsiz,
  Ysiz - YOsiz), its number of components and their precision;
- JPEG (baseline, extended, lossless) and JPEG-LS: the frame header's (SOFn, or SOF55 for JPEG-LS)
  Y and X, number of components and precision;
- RLE: the 64-byte header's segment count (at most SamplesPerPixel x bytes per sample, and 15),
  increasing offsets inside the frame, and no segment longer than any RLE encoding of one byte plane
  can be (two bytes per pixel: a literal run of one byte, plus the padding byte).

Other transfer syntaxes pass unchecked. Reasons are sentences naming the image; nothing is decoded.

A frame that decodes can still be damaged: OpenJPEG (all three JPEG 2000 decoders pydicom uses are built
on it) reads through a JPEG 2000 codestream overwritten in the middle without an error or a warning. So
after a clean decode, :func:`codestream_damage` checks what a codestream's structure can show: its
tile-parts (SOT lengths) follow one another up to the end-of-codestream marker, every tile is there with
all its tile-parts, and no marker code (0xFF90 to 0xFFFF, which encoders never write there) lies inside
the compressed data of a tile. Bytes replaced by other valid-looking bytes show no sign at all: no
decoder, and no check without a checksum, can find them.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

KINDS: dict[str, str] = {
    **dict.fromkeys(JPEG2000TransferSyntaxes, "JPEG 2000"),
    **dict.fromkeys(JPEGTransferSyntaxes, "JPEG"),
    **dict.fromkeys(JPEGLSTransferSyntaxes, "JPEG-LS"),
    RLELossless: "RLE",
}
"""The transfer syntaxes whose frames are checked, and the name of their format in reasons."""

JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
"""SOF0-SOF15 (but DHT, JPG and DAC, which share the range) and JPEG-LS' SOF55."""
MAX_MARKER_SEGMENTS = 1000
"""Marker segments read before a JPEG frame header: real files have a few dozen at most."""
MAX_RLE_SEGMENTS = 15


def frame_problem(frame: bytes, kind: str, rows: int, columns: int, samples: int, bits_allocated: int) -> str | None:
    """What in one encoded frame's own header disagrees with the image's, ending a sentence that starts
    'the <kind> data of <image> ...'; None when it agrees (or ``kind`` is not checked)."""
    if not frame and kind in KINDS.values():
        return "is empty (a zero-length fragment): the image's compressed data is missing"
    if kind == "JPEG 2000":
        found = _jpeg2000_header(frame)
        if found is None:
            return "does not start with a JPEG 2000 image header (SIZ marker)"
    elif kind in ("JPEG", "JPEG-LS"):
        found = _jpeg_frame_header(frame)
        if found is None:
            return "has no frame header (SOF marker) before its image data"
    elif kind == "RLE":
        return _rle_problem(frame, rows, columns, samples, bits_allocated)
    else:
        return None
    width, height, components, precision = found
    if (width, height) != (columns, rows):
        return f"is {width} x {height} pixels, but its Columns and Rows say {columns} x {rows}"
    if components != samples:
        return f"has {components} component(s), but its SamplesPerPixel says {samples}"
    if precision > bits_allocated:
        return f"holds {precision}-bit samples, more than its BitsAllocated ({bits_allocated})"
    return None


def encapsulated_problem(dataset: Dataset, name: str) -> str | None:
    """The first frame of ``dataset`` whose own header disagrees with its Rows, Columns, SamplesPerPixel or
    BitsAllocated, as a sentence naming it (``name`` is the image, e.g. 'instance 1.2.3'); None when every
    frame agrees, or the transfer syntax is not one checked here."""
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    kind = KINDS.get(syntax)
    if kind is None or "PixelData" not in dataset:
        return None
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.BitsAllocated)
        number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None  # the decoder refuses such a header itself, before it allocates
    try:
        for index, frame in enumerate(_frames(dataset, number_of_frames), start=1):
            if index > number_of_frames:
                return (
                    f"the {kind} data of {name} holds more frames than its NumberOfFrames ({number_of_frames}) "
                    "says; it is not decoded"
                )
            problem = frame_problem(frame, kind, rows, columns, samples, bits)
            if problem is not None:
                where = f"frame {index} of {name}" if number_of_frames > 1 else name
                return f"the {kind} data of {where} {problem}; it is not decoded"
    except (ValueError, KeyError, struct.error):
        return f"the {kind} data of {name} cannot be split into its {number_of_frames} frame(s); it is not decoded"
    return None


def decoded_bytes(dataset: Dataset) -> int:
    """How many bytes the pixel data of ``dataset`` takes decoded, by its header (Rows x Columns x
    NumberOfFrames x SamplesPerPixel x bytes per sample); 0 when the header does not say."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.BitsAllocated)
        number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return 0
    return max(rows, 0) * max(columns, 0) * max(number_of_frames, 1) * max(samples, 1) * max((bits + 7) // 8, 1)


def _frames(dataset: Dataset, number_of_frames: int) -> Iterator[bytes]:
    """The encoded frames, split as pydicom's decoders split them (offset tables, else fragment markers)."""
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    return generate_frames(dataset.PixelData, number_of_frames=number_of_frames, extended_offsets=extended)


def stored_precision(dataset: Dataset) -> int | None:
    """The most bits a sample has in any frame's own header (JPEG 2000 SIZ, JPEG or JPEG-LS frame header): the
    decoder gives values of that many bits, whatever BitsStored says; None for other transfer syntaxes, or
    frames whose header cannot be read (those are refused by :func:`encapsulated_problem`)."""
    meta = getattr(dataset, "file_meta", None)
    kind = KINDS.get(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    if kind not in ("JPEG 2000", "JPEG", "JPEG-LS") or "PixelData" not in dataset:
        return None
    read = _jpeg2000_header if kind == "JPEG 2000" else _jpeg_frame_header
    try:
        headers = [read(frame) for frame in _frames(dataset, int(dataset.get("NumberOfFrames") or 1))]
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    precisions = [header[3] for header in headers if header is not None]
    return max(precisions) if precisions and len(precisions) == len(headers) else None


def codestream_damage(dataset: Dataset, name: str) -> str | None:
    """The first JPEG 2000 frame of ``dataset`` whose codestream structure shows damage
    (:func:`jpeg2000_damage`), as a sentence naming it (``name`` is the image); None when none does, or for
    another transfer syntax. Meant for frames that decoded: a decoder's own refusal says more."""
    meta = getattr(dataset, "file_meta", None)
    if KINDS.get(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "") != "JPEG 2000":
        return None
    number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    try:
        for index, frame in enumerate(_frames(dataset, number_of_frames), start=1):
            damage = jpeg2000_damage(frame)
            if damage is not None:
                where = f"frame {index} of {name}" if number_of_frames > 1 else name
                return (
                    f"the JPEG 2000 data of {where} is damaged: {damage}; a decoder reads through such damage "
                    "without an error, so its pixel values cannot be trusted: send the image again from the "
                    "scanner or archive"
                )
    except (ValueError, KeyError, TypeError, struct.error):
        return f"the JPEG 2000 data of {name} cannot be split into its {number_of_frames} frame(s)"
    return None


def jpeg2000_damage(frame: bytes) -> str | None:
    """What in a JPEG 2000 codestream's structure shows damage, as words that end a sentence; None when its
    structure is intact (its compressed bytes themselves cannot be checked). Its tile-parts must follow one
    another by their lengths (Psot, 0 for a last one that runs to the end-of-codestream marker) up to the
    end-of-codestream marker, or the end of the data but padding; each tile's tile-parts must be numbered
    0, 1, 2... (TPsot) with none missing, at least as many as it declares (TNsot; some encoders write one
    too few); no marker code may lie inside a tile's data."""
    codestream = frame if frame[:4] == b"\xff\x4f\xff\x51" else _jp2_codestream(frame)
    if codestream is None or len(codestream) < 42:
        return None  # refused by its header check before decoding
    tiles = _tile_count(codestream)
    if tiles is None:
        return "its image header (SIZ marker) gives no tile size"
    position, markers = _skip_segments(codestream, 2, len(codestream), until=SOT)
    if position is None:
        return "its main header does not lead to its first tile-part (SOT marker)"
    scan = CAP not in markers  # HTJ2K (a CAP marker): its code-blocks follow other rules
    parts: Counter[int] = Counter()
    declared: dict[int, int] = {}
    data_end = len(codestream.rstrip(b"\x00\xff"))  # fragments are padded to an even length
    while position < data_end and codestream[position : position + 2] != b"\xff\xd9":
        if codestream[position : position + 2] != b"\xff\x90" or position + 12 > len(codestream):
            return f"at byte {position:,}, after a complete tile-part, comes neither another one nor its end"
        _, tile, length, part, count = struct.unpack_from(">HHLBB", codestream, position + 2)
        end = _tile_part_end(codestream, position, length, data_end)
        if end is None:
            return f"a tile-part at byte {position:,} says it is {length:,} bytes, but {len(codestream) - position:,} follow"
        problem = _tile_part_problem(codestream, position, end, tile, tiles, scan=scan)
        if problem is None and part != parts[tile]:
            problem = (
                f"tile-part {parts[tile] + 1} of tile {tile + 1} is missing (the next one there is numbered {part + 1})"
            )
        if problem is not None:
            return problem
        parts[tile] += 1
        declared[tile] = count or declared.get(tile, 0)
        position = end
    return _missing_parts(parts, declared, tiles)


SOT, SOD, CAP = 0x90, 0x93, 0x50
IN_DATA_MARKERS = {0x91: 6, 0x92: 2}
"""The only markers allowed inside a tile's compressed data, and their length in bytes: SOP (start of packet:
marker, Lsop, Nsop) and EPH (end of packet header)."""


def _tile_count(codestream: bytes) -> int | None:
    """How many tiles the SIZ marker's image and tile sizes make; None where a tile size is 0."""
    xsiz, ysiz, _, _, xtsiz, ytsiz, xtosiz, ytosiz = struct.unpack_from(">8L", codestream, 8)
    if not xtsiz or not ytsiz or xtosiz > xsiz or ytosiz > ysiz:
        return None
    return -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)


def _skip_segments(codestream: bytes, position: int, end: int, until: int) -> tuple[int | None, set[int]]:
    """Where marker ``until`` starts, after the marker segments (each with its length) from ``position``, and the
    markers passed; None where something that is not a marker segment, or one running past ``end``, comes first."""
    markers: set[int] = set()
    for _ in range(MAX_MARKER_SEGMENTS):
        if position + 2 > end or codestream[position] != 0xFF:
            return None, markers
        if codestream[position + 1] == until:
            return position, markers
        markers.add(codestream[position + 1])
        if position + 4 > end:
            return None, markers
        (length,) = struct.unpack_from(">H", codestream, position + 2)
        if length < 2 or position + 2 + length > end:
            return None, markers
        position += 2 + length
    return None, markers


def _tile_part_end(codestream: bytes, position: int, length: int, data_end: int) -> int | None:
    """Where the tile-part at ``position`` ends: by its Psot, or (Psot 0) at the end-of-codestream marker, else
    at ``data_end`` (where padding starts); None where its Psot runs past the data or is shorter than SOT and SOD."""
    if length == 0:
        return data_end - 2 if codestream[data_end - 2 : data_end] == b"\xff\xd9" else data_end
    if length < 14 or position + length > len(codestream):
        return None
    return position + length


def _tile_part_problem(codestream: bytes, position: int, end: int, tile: int, tiles: int, *, scan: bool) -> str | None:
    """What is wrong with the tile-part from ``position`` to ``end``: its tile index, its header (marker segments
    up to SOD), or (where ``scan``) a marker code inside its compressed data."""
    if tile >= tiles:
        return f"the tile-part at byte {position:,} is for tile {tile + 1}, but the image has {tiles} tile(s)"
    start, _ = _skip_segments(codestream, position + 12, end, until=SOD)
    if start is None:
        return f"the header of the tile-part at byte {position:,} does not lead to its data (SOD marker)"
    marker = _marker_inside(codestream[start + 2 : end]) if scan else None
    if marker is not None:
        offset, code = marker
        return (
            f"a marker code (FF {code:02X}) lies inside the compressed data of tile {tile + 1}, at byte "
            f"{start + 2 + offset:,}, where no encoder writes one"
        )
    return None


def _marker_inside(data: bytes) -> tuple[int, int] | None:
    """The first (offset, second byte) of a marker code 0xFF90 to 0xFFFF in a tile's compressed data, but SOP and
    EPH (and a SOP marker's own Lsop and Nsop bytes); None where there is none."""
    values = np.frombuffer(data, dtype=np.uint8)
    hits = np.flatnonzero((values[:-1] == 0xFF) & (values[1:] >= 0x90))
    skip_to = 0
    for offset in hits.tolist():
        if offset < skip_to:
            continue
        code = int(values[offset + 1])
        if code not in IN_DATA_MARKERS:
            return offset, code
        skip_to = offset + IN_DATA_MARKERS[code]
    return None


def _missing_parts(parts: Counter[int], declared: dict[int, int], tiles: int) -> str | None:
    """A tile with none, or fewer than it declares, of its tile-parts, in words; None when all are there."""
    for tile in range(tiles):
        if not parts[tile]:
            return f"it holds no data for tile {tile + 1} of its {tiles}"
        if parts[tile] < declared.get(tile, 0):
            return f"tile {tile + 1} has {parts[tile]} of the {declared[tile]} tile-parts it declares"
    return None


def _jpeg2000_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, highest precision) from the SIZ marker of a codestream, bare or in JP2 boxes."""
    codestream = data if data[:4] == b"\xff\x4f\xff\x51" else _jp2_codestream(data)
    if codestream is None or codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 42:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4L", codestream, 8)
    (components,) = struct.unpack_from(">H", codestream, 40)
    sizes = codestream[42 : 42 + 3 * components : 3]
    if components == 0 or len(sizes) != components:
        return None
    return xsiz - xosiz, ysiz - yosiz, components, max((size & 0x7F) + 1 for size in sizes)


def jpeg2000_sign(dataset: Dataset) -> tuple[bool, int] | None:
    """Whether the first JPEG 2000 frame of ``dataset`` says its samples are signed, and their precision (bits);
    None for another transfer syntax, or a frame whose SIZ marker cannot be read."""
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if KINDS.get(syntax) != "JPEG 2000" or "PixelData" not in dataset:
        return None
    try:
        frame = next(iter(_frames(dataset, int(dataset.get("NumberOfFrames") or 1))))
    except (StopIteration, ValueError, KeyError, TypeError, struct.error):
        return None
    codestream = frame if frame[:4] == b"\xff\x4f\xff\x51" else _jp2_codestream(frame)
    if codestream is None or len(codestream) < 43:
        return None
    return bool(codestream[42] & 0x80), (codestream[42] & 0x7F) + 1


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contiguous codestream box ('jp2c') of a JP2 (or JPH) file; None if it is not one."""
    if data[4:8] != b"jP  ":
        return None
    position = 0
    for _ in range(MAX_MARKER_SEGMENTS):
        if position + 8 > len(data):
            return None
        length, box = struct.unpack_from(">L4s", data, position)
        header = 8
        if length == 1:
            if position + 16 > len(data):
                return None
            (length,) = struct.unpack_from(">Q", data, position + 8)
            header = 16
        elif length == 0:
            length = len(data) - position
        if box == b"jp2c":
            return data[position + header : position + length]
        if length < header:
            return None
        position += length
    return None


def _jpeg_frame_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, precision) from the first frame header (SOFn or SOF55) after SOI."""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    for _ in range(MAX_MARKER_SEGMENTS):
        if position >= len(data) or data[position] != 0xFF:
            return None
        while position < len(data) and data[position] == 0xFF:  # a marker may follow fill bytes
            position += 1
        if position >= len(data):
            return None
        marker = data[position]
        position += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0xD9, 0xDA) or position + 2 > len(data):  # EOI or SOS before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, position)
        if marker in JPEG_FRAME_MARKERS:
            if length < 8 or position + 8 > len(data):
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, position + 2)
            return width, height, components, precision
        if length < 2:
            return None
        position += length
    return None


def _rle_problem(frame: bytes, rows: int, columns: int, samples: int, bits_allocated: int) -> str | None:
    """What in an RLE frame's header or length no RLE encoding of this image can have; None if nothing."""
    if len(frame) < 64:
        return f"is {len(frame)} bytes, shorter than the 64-byte RLE header"
    count, *offsets = struct.unpack_from("<16L", frame)
    expected = samples * ((bits_allocated + 7) // 8)
    allowed = min(expected, MAX_RLE_SEGMENTS)
    if not 1 <= count <= allowed:
        return f"has {count} segment(s), where SamplesPerPixel {samples} and BitsAllocated {bits_allocated} allow 1 to {allowed}"
    bounds = [*offsets[:count], len(frame)]
    if bounds[0] < 64 or any(end <= start for start, end in pairwise(bounds)):
        return f"has segment offsets {offsets[:count]} that do not increase inside its {len(frame)} bytes"
    longest = 2 * rows * columns + 1  # a literal run per byte, and the padding to an even length
    for number, (start, end) in enumerate(pairwise(bounds), start=1):
        if end - start > longest:
            return (
                f"has a segment of {end - start:,} bytes (segment {number}), longer than any RLE encoding of "
                f"{columns} x {rows} pixels can be ({longest:,} bytes)"
            )
    return None
