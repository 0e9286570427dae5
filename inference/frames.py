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

libjpeg (GDCM and Pillow decode JPEG with it) reads through a JPEG frame cut short, overwritten or missing bytes
inside with only a message on the console, and gives an image. So :func:`jpeg_damage` checks a JPEG frame's
marker segments, restart markers and end-of-image marker, and walks its Huffman-coded data code by code (lossless
of one component, as CT is stored; baseline and extended sequential): the codes must make exactly the samples or
8 x 8 blocks the frame header says, and end where the data ends. Progressive and arithmetic-coded scans, and
JPEG-LS, are checked for their markers only.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    """The first JPEG 2000 or JPEG frame of ``dataset`` whose structure shows damage (:func:`jpeg2000_damage`,
    :func:`jpeg_damage`), as a sentence naming it (``name`` is the image); None when none does, or for another
    transfer syntax. Meant for frames that decoded: a decoder's own refusal says more."""
    meta = getattr(dataset, "file_meta", None)
    kind = KINDS.get(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    check = {"JPEG 2000": jpeg2000_damage, "JPEG": jpeg_damage}.get(kind or "")
    if check is None or "PixelData" not in dataset:
        return None
    number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    try:
        for index, frame in enumerate(_frames(dataset, number_of_frames), start=1):
            damage = check(frame)
            if damage is not None:
                where = f"frame {index} of {name}" if number_of_frames > 1 else name
                return (
                    f"the {kind} data of {where} is damaged: {damage}; a decoder reads through such damage "
                    "without an error, so its pixel values cannot be trusted: send the image again from the "
                    "scanner or archive"
                )
    except (ValueError, KeyError, TypeError, struct.error):
        return f"the {kind} data of {name} cannot be split into its {number_of_frames} frame(s)"
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
    found = _jpeg_segment(data, JPEG_FRAME_MARKERS)
    if found is None:
        return None
    _marker, position = found
    (length,) = struct.unpack_from(">H", data, position)
    if length < 8 or position + 8 > len(data):
        return None
    precision, height, width, components = struct.unpack_from(">BHHB", data, position + 2)
    return width, height, components, precision


def _jpeg_segment(data: bytes, wanted: frozenset[int]) -> tuple[int, int] | None:
    """(marker, offset of its length field) of the first marker segment after SOI that is one of ``wanted``;
    None where the frame has no SOI, ends or turns unreadable first, or (unless SOS is wanted) a scan or EOI
    comes first."""
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
        if position + 2 > len(data):
            return None
        if marker in wanted:
            return marker, position
        if marker in (0xD9, 0xDA):  # EOI, or a scan before any wanted segment
            return None
        (length,) = struct.unpack_from(">H", data, position)
        if length < 2:
            return None
        position += length
    return None


# --- Lossless transfer syntaxes: frames that are lossy all the same --------------------------------------------

JPEG_LOSSLESS_SYNTAXES = {
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (first-order prediction)",
}
JPEG_LS_LOSSLESS_SYNTAX = "1.2.840.10008.1.2.4.80"
JPEG2000_LOSSLESS_SYNTAXES = {
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (lossless only)",
    "1.2.840.10008.1.2.4.201": "HTJ2K (lossless only)",
    "1.2.840.10008.1.2.4.202": "HTJ2K with RPCL options (lossless only)",
}
_JPEG_LOSSLESS_FRAMES = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_DCT_FRAMES = JPEG_FRAME_MARKERS - _JPEG_LOSSLESS_FRAMES - {0xF7}


def lossy_in_lossless_syntax(dataset: Dataset, name: str) -> str | None:
    """The first frame of ``dataset`` whose data is lossy although its transfer syntax allows lossless data only
    (a DCT frame under JPEG Lossless, a near-lossless scan under JPEG-LS Lossless, the irreversible wavelet under
    JPEG 2000 or HTJ2K lossless), as a sentence naming it; None otherwise. Such a frame decodes, and the results
    would say their source was never lossy compressed."""
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    described = {**JPEG_LOSSLESS_SYNTAXES, **JPEG2000_LOSSLESS_SYNTAXES, JPEG_LS_LOSSLESS_SYNTAX: "JPEG-LS Lossless"}
    if syntax not in described or "PixelData" not in dataset:
        return None
    number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    try:
        for index, frame in enumerate(_frames(dataset, number_of_frames), start=1):
            lossy = _lossy_frame(frame, syntax)
            if lossy is not None:
                where = f"frame {index} of {name}" if number_of_frames > 1 else name
                return (
                    f"the pixel data of {where} {lossy}, but its transfer syntax, {described[syntax]}, allows "
                    "lossless data only; it is not used: send the image again from the scanner or archive"
                )
    except (ValueError, KeyError, TypeError, struct.error):
        return None  # refused by encapsulated_problem, which reads the same frames first
    return None


def _lossy_frame(frame: bytes, syntax: str) -> str | None:
    """How one frame is lossy under the lossless ``syntax``, as words that follow 'the pixel data of <image>'."""
    if syntax in JPEG_LOSSLESS_SYNTAXES:
        found = _jpeg_segment(frame, JPEG_FRAME_MARKERS)
        if found is not None and found[0] in _DCT_FRAMES:
            return f"is lossy JPEG (DCT-based, frame marker SOF{found[0] - 0xC0})"
        if found is not None and found[0] == 0xF7:
            return "is JPEG-LS, not JPEG"
        return None
    if syntax == JPEG_LS_LOSSLESS_SYNTAX:
        scan = _jpeg_segment(frame, frozenset({0xDA}))
        if scan is None:
            return None
        position = scan[1]
        components = frame[position + 2] if position + 2 < len(frame) else 0
        near_at = position + 3 + 2 * components
        near = frame[near_at] if near_at < len(frame) else 0
        return f"is near-lossless JPEG-LS (NEAR {near})" if near else None
    transform = cod_transform(frame)
    return "uses the irreversible (9-7) wavelet transform, which is lossy" if transform == 0 else None


def cod_transform(frame: bytes) -> int | None:
    """The wavelet transform byte of a JPEG 2000 codestream's main-header COD segment (0: irreversible 9-7,
    1: reversible 5-3); None where it has none that can be read."""
    codestream = frame if frame[:4] == b"\xff\x4f\xff\x51" else _jp2_codestream(frame)
    if codestream is None:
        return None
    position = 2  # past SOC, to SIZ and the segments after it
    for _ in range(MAX_MARKER_SEGMENTS):
        if position + 4 > len(codestream) or codestream[position] != 0xFF:
            return None
        marker = codestream[position + 1]
        (length,) = struct.unpack_from(">H", codestream, position + 2)
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4 bytes), then levels, block sizes, style, transform
            return codestream[position + 13] if position + 13 < len(codestream) else None
        if marker == 0x90 or length < 2:  # the first tile begins: no COD in the main header
            return None
        position += 2 + length
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


# --- JPEG (baseline, extended, lossless): a frame's structure, and its Huffman-coded data walked code by code ----

SOF0, SOF1, SOF3, DHT, DRI, SOS, EOI = 0xC0, 0xC1, 0xC3, 0xC4, 0xDD, 0xDA, 0xD9
RESTART_MARKERS = range(0xD0, 0xD8)
LOSSLESS_FRAME_MARKERS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
MAX_HUFFMAN_CODE_BITS = 16
LOSSLESS_MAGNITUDE_BITS = 16
"""In the lossless process a difference category (SSSS) of 16 has no extra bits; one of 0 to 15 has that many."""
BLOCK_COEFFICIENTS = 64
ZERO_RUN = 0xF0
"""An AC code of 16 zero coefficients (ZRL); an AC code whose low four bits are 0, but this one, ends the block."""

HuffmanLookup = tuple[list[int], list[int]]
"""For every 16-bit window of the data, the length of the Huffman code it starts with (0: no such code) and its value
(:func:`_huffman_lookup`, as lists)."""


@dataclass
class _JpegScan:
    """What the marker segments before a scan say: frame header, Huffman tables, restart interval, scan header."""

    process: int = 0
    width: int = 0
    height: int = 0
    sampling: dict[int, tuple[int, int]] = field(default_factory=dict)
    tables: dict[tuple[int, int], tuple[bytes, bytes]] = field(default_factory=dict)  # (class, number): table
    restart_interval: int = 0
    components: list[tuple[int, int, int]] = field(default_factory=list)  # (id, DC table, AC table), scan order


def jpeg_damage(frame: bytes) -> str | None:
    """What in a JPEG frame's structure shows damage, as words that end a sentence; None when it is intact. Its
    marker segments must lie inside the frame, its scans' entropy-coded data must hold only stuffed bytes and
    restart markers in order (as many as its restart interval makes), an end-of-image marker must end it with only
    padding after it. Where it is Huffman coded (lossless, of one component; baseline and extended), its
    entropy-coded data must decode into exactly the samples or blocks the image has, ending where the data ends:
    libjpeg reads through both kinds of damage with a message on the console only."""
    if frame[:2] != b"\xff\xd8":
        return None  # refused by its header check before decoding
    header = _JpegScan()
    position = 2
    for _ in range(MAX_MARKER_SEGMENTS):
        while frame[position : position + 2] == b"\xff\xff":
            position += 1  # fill bytes before a marker
        if position + 2 > len(frame):
            return "it ends without its end-of-image marker: it was cut short"
        if frame[position] != 0xFF:
            return f"at byte {position:,}, where a marker must come, there is none"
        marker = frame[position + 1]
        if marker == EOI:
            return _after_end_of_image(frame, position + 2)
        if marker == 0x01 or marker in RESTART_MARKERS:  # TEM, or a restart marker outside a scan: no length
            position += 2
            continue
        if position + 4 > len(frame):
            return "it ends without its end-of-image marker: it was cut short"
        (length,) = struct.unpack_from(">H", frame, position + 2)
        if length < 2 or position + 2 + length > len(frame):
            return f"its marker segment FF {marker:02X} at byte {position:,} says it is {length:,} bytes, past the end of the data"
        problem = _read_segment(header, marker, frame[position + 4 : position + 2 + length])
        if problem is not None:
            return problem
        position += 2 + length
        if marker == SOS:
            position, problem = _scan_data_problem(frame, position, header)
            if problem is not None:
                return problem
    return None


def _read_segment(header: _JpegScan, marker: int, segment: bytes) -> str | None:
    """Note in ``header`` what a frame header, Huffman table, restart interval or scan header says; a sentence
    where one cannot be read."""
    try:
        if marker in JPEG_FRAME_MARKERS:
            _, header.height, header.width, count = struct.unpack_from(">BHHB", segment)
            header.process = marker
            header.sampling = {
                segment[6 + 3 * index]: (segment[7 + 3 * index] >> 4, segment[7 + 3 * index] & 0x0F)
                for index in range(count)
            }
        elif marker == DHT:
            _read_huffman_tables(header, segment)
        elif marker == DRI:
            (header.restart_interval,) = struct.unpack_from(">H", segment)
        elif marker == SOS:
            header.components = [
                (segment[1 + 2 * index], segment[2 + 2 * index] >> 4, segment[2 + 2 * index] & 0x0F)
                for index in range(segment[0])
            ]
            if not header.process:
                return "its scan (SOS marker) comes before its frame header"
    except (IndexError, struct.error):
        return f"its marker segment FF {marker:02X} is shorter than what it must hold"
    return None


def _read_huffman_tables(header: _JpegScan, segment: bytes) -> None:
    """Keep the Huffman tables of a DHT segment by class and number, as (code counts, values)."""
    position = 0
    while position < len(segment):
        kind, number = segment[position] >> 4, segment[position] & 0x0F
        counts = segment[position + 1 : position + 17]
        values = segment[position + 17 : position + 17 + sum(counts)]
        if len(counts) != MAX_HUFFMAN_CODE_BITS or len(values) != sum(counts):
            raise IndexError
        header.tables[kind, number] = (counts, values)
        position += 17 + len(values)


def _after_end_of_image(frame: bytes, end: int) -> str | None:
    """Bytes after the end-of-image marker other than padding (zeros or fill bytes), in words; None if none."""
    extra = len(frame[end:].rstrip(b"\x00\xff"))
    if extra:
        return f"{_bytes(extra)} of data follow its end-of-image marker (at byte {end - 2:,}), where none belong"
    return None


def _bytes(count: int) -> str:
    return f"{count:,} byte{'' if count == 1 else 's'}"


def _scan_data_problem(frame: bytes, start: int, header: _JpegScan) -> tuple[int, str | None]:
    """Where the entropy-coded data from ``start`` ends (at its first marker but restart markers, and fill bytes
    before it), and what in it shows damage: restart markers out of order, too few or too many, or intervals that
    do not decode into their samples or blocks."""
    values = np.frombuffer(frame, dtype=np.uint8, offset=start)
    markers = np.flatnonzero((values[:-1] == 0xFF) & (values[1:] != 0x00) & (values[1:] != 0xFF)).tolist()
    intervals: list[tuple[int, int]] = []
    begin = 0
    for found in markers:
        code, offset = int(values[found + 1]), found
        while offset > begin and values[offset - 1] == 0xFF:  # fill bytes before the marker (data 0xFF is stuffed)
            offset -= 1
        intervals.append((begin, offset))
        if code not in RESTART_MARKERS:
            break
        expected = 0xD0 + (len(intervals) - 1) % 8
        if code != expected:
            return start, (
                f"its restart marker at byte {start + found:,} is RST{code - 0xD0} where RST{expected - 0xD0} must "
                "come: the data between them was lost"
            )
        begin = found + 2
    else:
        return len(frame), "its compressed data ends without its end-of-image marker: it was cut short"
    problem = _restart_count_problem(header, len(intervals))
    if problem is None:
        problem = _entropy_problem(frame, start, intervals, header)
    return start + intervals[-1][1], problem


def _mcu_count(header: _JpegScan) -> int | None:
    """How many minimum coded units (lossless process: samples of each component) the scan has; None where the
    frame header leaves it open."""
    try:
        sampling = [header.sampling[component] for component, _, _ in header.components]
    except KeyError:
        return None
    widest = max((h for h, _ in header.sampling.values()), default=0)
    tallest = max((v for _, v in header.sampling.values()), default=0)
    if not widest or not tallest or not sampling or not all(h and v for h, v in sampling):
        return None
    block = 1 if header.process in LOSSLESS_FRAME_MARKERS else 8
    if len(sampling) > 1:
        return -(-header.width // (block * widest)) * -(-header.height // (block * tallest))
    h, v = sampling[0]
    columns, rows = -(-header.width * h // widest), -(-header.height * v // tallest)
    return -(-columns // block) * -(-rows // block)


def _restart_count_problem(header: _JpegScan, intervals: int) -> str | None:
    """Restart intervals that do not add up to the scan's units, in words; None where they do (or no interval)."""
    units = _mcu_count(header)
    if not header.restart_interval or not units:
        return None
    expected = -(-units // header.restart_interval)
    if intervals != expected:
        return (
            f"its compressed data holds {intervals:,} restart interval(s), but its restart interval "
            f"({header.restart_interval:,}) and size make {expected:,}: data was lost or added"
        )
    return None


def _entropy_problem(frame: bytes, start: int, intervals: list[tuple[int, int]], header: _JpegScan) -> str | None:
    """Where a Huffman-coded scan (lossless of one component; baseline or extended sequential) does not decode
    into its units, interval by interval, in words; None where every interval does (other scans are not walked)."""
    units = _mcu_count(header)
    blocks = _scan_tables(header) if units else None
    if not units or blocks is None:
        return None
    lossless = header.process == SOF3
    lengths, symbols = (np.array(table, dtype=np.int32) for table in blocks[0][0])
    per_interval = header.restart_interval or units
    for index, (begin, end) in enumerate(intervals):
        count = min(per_interval, units - index * per_interval)
        data = _unstuffed(frame[start + begin : start + end])
        if lossless and len(data) <= MAX_JUMPED_BYTES:
            outcome = _jump_lossless(data, count, lengths, symbols)
        elif lossless:
            outcome = _walk_lossless(_Bits(data), count, blocks[0][0])
        else:
            outcome = _walk_blocks(_Bits(data), count, blocks)
        if outcome is not None:
            where = f" (restart interval {index + 1:,} of {len(intervals):,})" if len(intervals) > 1 else ""
            return f"its compressed data{where} {outcome}"
    return None


def _scan_tables(header: _JpegScan) -> list[tuple[HuffmanLookup, HuffmanLookup]] | None:
    """The (DC, AC) Huffman lookups of each block (lossless: each sample, DC only) of one unit of the scan; None
    for a scan that is not walked (progressive, arithmetic coded, lossless of several components) or that names a
    Huffman table it does not have."""
    lossless = header.process == SOF3
    if not (lossless and len(header.components) == 1) and header.process not in (SOF0, SOF1):
        return None
    lookups: dict[tuple[int, int], HuffmanLookup] = {}
    blocks: list[tuple[HuffmanLookup, HuffmanLookup]] = []
    for component, dc, ac in header.components:
        for key in ((0, dc),) if lossless else ((0, dc), (1, ac)):
            if key not in header.tables:
                return None
            lookups.setdefault(key, _huffman_lookup(*header.tables[key]))
        h, v = header.sampling[component] if len(header.components) > 1 else (1, 1)
        blocks += [(lookups[0, dc], lookups.get((1, ac), lookups[0, dc]))] * (h * v)
    return blocks


def _unstuffed(data: bytes) -> np.ndarray:
    """Entropy-coded bytes without the 0x00 stuffed after each 0xFF byte."""
    values = np.frombuffer(data, dtype=np.uint8)
    stuffed = np.flatnonzero(values[:-1] == 0xFF) + 1
    return np.delete(values, stuffed[values[stuffed] == 0x00])


def _huffman_lookup(counts: bytes, values: bytes) -> HuffmanLookup:
    """For every 16-bit window, the length of the Huffman code it starts with (0: no code) and that code's value."""
    lengths = np.zeros(1 << MAX_HUFFMAN_CODE_BITS, dtype=np.int32)
    symbols = np.zeros(1 << MAX_HUFFMAN_CODE_BITS, dtype=np.int32)
    code, index = 0, 0
    for bits, count in enumerate(counts, start=1):
        for _ in range(count):
            if code >= 1 << bits:
                return lengths.tolist(), symbols.tolist()  # an over-full table: its remaining codes cannot exist
            low, high = code << (MAX_HUFFMAN_CODE_BITS - bits), (code + 1) << (MAX_HUFFMAN_CODE_BITS - bits)
            lengths[low:high], symbols[low:high] = bits, values[index]
            code, index = code + 1, index + 1
        code <<= 1
    return lengths.tolist(), symbols.tolist()


class _Bits:
    """The bits of entropy-coded data, read as the 16-bit window from any bit position on (1 bits past the end),
    worked out a slice of the data at a time so that a large frame never needs memory for all its windows."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.total = len(data) * 8
        self.start = self.end = 0
        self.windows: list[int] = []

    def window(self, position: int) -> int:
        """The 16 bits from bit ``position`` on (which must be below ``total``), as a number."""
        if not self.start <= position < self.end:
            first = position // 8
            chunk = self.data[first : first + WINDOW_CHUNK_BYTES + 2]
            used = min(WINDOW_CHUNK_BYTES, len(chunk))
            self.windows = _windows(chunk, used).tolist()
            self.start, self.end = first * 8, (first + used) * 8
        return self.windows[position - self.start]


WINDOW_CHUNK_BYTES = 1 << 16
WINDOW_SHIFTS = np.arange(8, 0, -1, dtype=np.int32)
MAX_JUMPED_BYTES = 1 << 20
"""Lossless data up to this size (a 1024 x 1024 CT slice) is walked by doubling jumps from all its bit positions at
once (some 20 bytes of memory a bit); larger data code by code, a slice at a time."""


def _windows(data: np.ndarray, count: int) -> np.ndarray:
    """The 16 bits from each of the first ``count`` bytes' bit positions of ``data`` on, as numbers (1 bits past
    its end)."""
    padded = np.concatenate([data, np.full(3, 0xFF, dtype=np.uint8)]).astype(np.int32)
    three_bytes = (padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]
    return ((three_bytes[:count, None] >> WINDOW_SHIFTS) & 0xFFFF).reshape(-1)


NO_CODE_ADVANCE = 1 << 30
"""The advance :func:`_jump_lossless` gives a window no code starts: beyond any data it walks."""
JUMP_DOUBLINGS = 6
""":func:`_jump_lossless` doubles its table of jumps this often (64 codes a jump), then walks those jumps one by one."""


def _jump_lossless(data: np.ndarray, samples: int, lengths: np.ndarray, symbols: np.ndarray) -> str | None:
    """:func:`_walk_lossless`, with the jump from every bit position worked out at once and doubled (the position
    after 1, 2, 4... codes) until ``samples`` codes are followed: fast, for data of at most MAX_JUMPED_BYTES."""
    windows = _windows(data, len(data))
    total = len(windows)
    past_end, no_code = total + 1, total + 2
    extra = np.where(symbols == LOSSLESS_MAGNITUDE_BITS, 0, symbols)
    advance = np.where(lengths == 0, NO_CODE_ADVANCE, lengths.astype(np.int64) + extra).astype(np.int32)
    single = np.empty(total + 3, dtype=np.int32)  # every position's next, then past_end, past_end, no_code
    np.take(advance, windows, out=single[:total])
    single[:total] += np.arange(total, dtype=np.int32)
    beyond = np.flatnonzero(single[:total] > total)  # past the end, or no code (few, in data that is whole)
    single[beyond] = np.where(single[beyond] >= NO_CODE_ADVANCE, no_code, past_end)
    single[total:] = (past_end, past_end, no_code)
    stride = single
    for _ in range(JUMP_DOUBLINGS):  # the position after 2**JUMP_DOUBLINGS codes, from every position
        stride = stride[stride]
    position = 0
    for _ in range(samples >> JUMP_DOUBLINGS):  # a few thousand steps: cheaper than doubling the whole table on
        position = stride.item(position)
    for _ in range(samples & ((1 << JUMP_DOUBLINGS) - 1)):
        position = single.item(position)
    if position == no_code:
        return NO_CODE
    return _walk_end(position, total, f"{samples:,} samples")


def _walk_lossless(bits: _Bits, samples: int, table: HuffmanLookup) -> str | None:
    """Follow ``samples`` difference codes (each a Huffman code and its extra bits) through ``bits``; what is wrong
    where they do not end in its last byte."""
    lengths, symbols = table
    position, total = 0, bits.total
    windows, start, end = bits.windows, bits.start, bits.end
    for _ in range(samples):
        if not start <= position < end:  # the window of the next slice of the data (inlined: the hot loop)
            if position >= total:
                return _runs_out(f"{samples:,} samples")
            bits.window(position)
            windows, start, end = bits.windows, bits.start, bits.end
        window = windows[position - start]
        if not lengths[window]:
            return NO_CODE
        category = symbols[window]
        position += lengths[window] + (0 if category == LOSSLESS_MAGNITUDE_BITS else category)
    return _walk_end(position, total, f"{samples:,} samples")


def _walk_blocks(bits: _Bits, units: int, blocks: list[tuple[HuffmanLookup, HuffmanLookup]]) -> str | None:
    """Follow ``units`` minimum coded units, each the ``blocks`` (DC and AC tables) of 64 coefficients, code by
    code through ``bits``; what is wrong where they do not end in its last byte."""
    position, total = 0, bits.total
    for _ in range(units):
        for (dc_lengths, dc_values), (ac_lengths, ac_values) in blocks:
            if position >= total:
                return _runs_out(f"{units:,} blocks")
            window = bits.window(position)
            if not dc_lengths[window]:
                return NO_CODE
            position += dc_lengths[window] + dc_values[window]
            coefficient = 1
            while coefficient < BLOCK_COEFFICIENTS:
                if position >= total:
                    return _runs_out(f"{units:,} blocks")
                window = bits.window(position)
                if not ac_lengths[window]:
                    return NO_CODE
                run_size = ac_values[window]
                position += ac_lengths[window] + (run_size & 0x0F)
                if not run_size & 0x0F and run_size != ZERO_RUN:
                    break  # end of block
                coefficient += (run_size >> 4) + 1
            if coefficient > BLOCK_COEFFICIENTS:
                return "holds a block of more than 64 coefficients: bytes in it were changed"
    return _walk_end(position, total, f"{units:,} blocks")


def _runs_out(units: str) -> str:
    return f"runs out before all its {units} are decoded: bytes in it were lost or changed"


NO_CODE = "holds a bit pattern its Huffman table has no code for: bytes in it were changed"


def _walk_end(position: int, total: int, units: str) -> str | None:
    """Why a walk that reached bit ``position`` of ``total`` shows damage, in words; None where it ended in the
    last byte (the rest is padding)."""
    if position > total:
        return _runs_out(units)
    if total - position >= 8:
        return f"holds {_bytes((total - position) // 8)} more than its {units} take: bytes in it were changed or added"
    return None
