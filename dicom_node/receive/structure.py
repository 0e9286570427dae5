"""How many elements and sequence items a received data set holds, counted on its bytes before pydicom reads it.

pydicom builds a Python object for every item of an undefined-length sequence as it reads a data
set, and for every item of any sequence once that sequence is used (admission reads the per-frame
functional groups). A few megabytes of empty items would so cost gigabytes of memory and minutes
of CPU in the receiver, admission and the worker. This walk allocates nothing: it follows element
and item headers up to the pixel data, descending into every sequence, and refuses a data set with
more elements or items than any real image needs for its number of frames (an image, one with pixel
data, fewer elements than a report or a structure set may hold).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicom_node.retrieve.stored import ITEM, LONG_LENGTH_VRS, UNDEFINED

PIXEL_DATA = 0x7FE00010
NUMBER_OF_FRAMES = 0x00280008
SERIES_INSTANCE_UID = 0x0020000E
UID_BYTES = 64
"""Longest UID value (64 characters; one of 63 is padded to 64)."""
ITEMS_ALLOWED = 10_000
"""Sequence items any data set may hold: a CT image has tens; a dose report or a private sequence a few hundred."""
ITEMS_PER_FRAME = 24
"""More items per frame of a multi-frame image: an Enhanced CT frame's functional groups take about ten."""
ELEMENTS_ALLOWED = 100_000
"""Elements any data set may hold: a structured report or an RT structure set (no pixel data) may hold tens of
thousands."""
ELEMENTS_PER_FRAME = 128
"""More elements per frame: an Enhanced CT frame's functional groups hold some tens."""
IMAGE_ELEMENTS_ALLOWED = 5_000
"""Elements an image (a data set with pixel data) may hold before it, plus :data:`ELEMENTS_PER_FRAME` per further
frame: a CT slice holds a few hundred, the node's own segmentation of 117 structures about 3,500. Admission reads
every image of a series in one thread, about 1 µs per element: images of 100,000 elements each held up every other
sender's series for a minute."""
HEADER_BYTES_ALLOWED = 8 * 1024**2
"""Bytes before the pixel data: a CT header is a few kilobytes, a scanner's private blocks add some hundreds.
Every header is read whole by admission, the worker and the encoder, once per image of the series."""
HEADER_BYTES_PER_FRAME = 16 * 1024
MAX_NESTING = 64
"""Sequences inside sequences: real images nest a few levels (pydicom itself gives up at a few hundred)."""
FRAMES_COUNTED = 5_000
"""At most this many frames raise the allowances (NumberOfFrames is the sender's word; admission limits it)."""


class TooManyParts(Exception):
    """The data set holds more elements or items than its frames allow; the message says which."""


@dataclass
class Structure:
    """What the walk found before the pixel data."""

    elements: int = 0
    items: int = 0
    frames: int = 1
    series_uid_value: bytes | None = None
    """The value of the top-level SeriesInstanceUID, where the walk passed one of at most :data:`UID_BYTES`."""


@dataclass(frozen=True)
class StructureRefusal:
    """Why a data set is refused unread, and the series it names, so the refusal counts with that series."""

    reason: str
    series_uid_text: str | None
    """The top-level SeriesInstanceUID the walk passed before refusing, as text: unchecked, the caller must check
    it is a valid UID before using it (None where the walk had passed none, or its bytes are not ASCII)."""


def structure_refusal(encoded: bytes, *, implicit: bool, little_endian: bool) -> StructureRefusal | None:
    """Why ``encoded`` (a data set without its file meta) holds too many elements or items to be read; None if
    it does not. Bytes that do not walk as a data set are left for pydicom to refuse with its own reason."""
    found = Structure()
    try:
        _walk(encoded, "<" if little_endian else ">", implicit, found)
    except TooManyParts as exc:
        return StructureRefusal(str(exc), _uid_text(found.series_uid_value))
    except (ValueError, struct.error):
        pass  # malformed: the reader that follows refuses it
    return None


def structure_problem(encoded: bytes, *, implicit: bool, little_endian: bool) -> str | None:
    """The reason of :func:`structure_refusal`, or None."""
    refusal = structure_refusal(encoded, implicit=implicit, little_endian=little_endian)
    return None if refusal is None else refusal.reason


def _uid_text(value: bytes | None) -> str | None:
    """A UI value as pydicom and the header check read it (trailing padding stripped); None if not ASCII."""
    if value is None:
        return None
    try:
        return value.decode("ascii").strip().strip("\x00")
    except UnicodeDecodeError:
        return None


_LONG_LENGTH_VR_BYTES = frozenset(vr.encode() for vr in LONG_LENGTH_VRS)
_ITEM_GROUP = 0xFFFE
_FRAGMENTS = UNDEFINED + 1
"""On the stack of open values: encapsulated pixel data (an icon's, inside a sequence), whose items are
compressed fragments, skipped by their length, never read as elements."""
_OPEN_UNTIL_DELIMITER = (UNDEFINED, _FRAGMENTS)


def _walk(data: bytes, order: str, implicit: bool, found: Structure) -> None:
    """Count elements and items up to the top-level pixel data (a tight loop: it runs on every received image)."""
    tag_and_length = struct.Struct(order + "HHL")
    explicit_short = struct.Struct(order + "HH2sH")
    long_length = struct.Struct(order + "L")
    item_tag = struct.pack(order + "HH", _ITEM_GROUP, ITEM & 0xFFFF)
    ends: list[int] = []  # where each open defined-length value ends; UNDEFINED for undefined-length ones
    encodings: list[bool] = []  # whether each open value is implicit VR (an undefined-length UN value is)
    base_implicit = implicit
    items_allowed, elements_allowed = _allowances(found.frames)
    size = len(data)
    position = 0
    while position + 8 <= size:
        while ends and ends[-1] < UNDEFINED and position >= ends[-1]:
            ends.pop()
            encodings.pop()
            implicit = encodings[-1] if encodings else base_implicit
        vr = b""
        if implicit:
            group, element, length = tag_and_length.unpack_from(data, position)
            header = 8
        else:
            group, element, vr, length = explicit_short.unpack_from(data, position)
            header = 8
            if group == _ITEM_GROUP:
                length = tag_and_length.unpack_from(data, position)[2]
            elif vr in _LONG_LENGTH_VR_BYTES:
                if position + 12 > size:
                    raise ValueError("the data set ends inside an element header")
                length = long_length.unpack_from(data, position + 8)[0]
                header = 12
        tag = group << 16 | element
        if group == _ITEM_GROUP:
            if tag != ITEM:  # an item or sequence delimiter
                if ends and ends[-1] in _OPEN_UNTIL_DELIMITER:
                    ends.pop()
                    encodings.pop()
                    implicit = encodings[-1] if encodings else base_implicit
                position += 8
                continue
            found.items += 1
            if found.items > items_allowed:
                raise TooManyParts(_too_many("sequence items", items_allowed, found.frames))
            if ends and ends[-1] == _FRAGMENTS:
                position += header + length  # a compressed fragment: bytes, not elements
                continue
        else:
            if tag == PIXEL_DATA and not ends:
                _check_header_bytes(position, found.frames)
                _check_image_elements(found)
                return
            found.elements += 1
            if found.elements > elements_allowed:
                raise TooManyParts(_too_many("elements", elements_allowed, found.frames))
            if tag == NUMBER_OF_FRAMES and not ends and length <= 12:
                found.frames = _frames(data[position + header : position + header + length])
                items_allowed, elements_allowed = _allowances(found.frames)
            elif tag == SERIES_INSTANCE_UID and not ends:  # the last one, as pydicom keeps; never one in an item
                found.series_uid_value = (
                    data[position + header : position + header + length] if length <= UID_BYTES else None
                )
        start = position + header
        if not ends and length != UNDEFINED and start + length > HEADER_BYTES_ALLOWED:
            _check_header_bytes(start + length, found.frames)  # a large value before the pixel data
        if len(ends) >= MAX_NESTING and (length == UNDEFINED or tag == ITEM or vr == b"SQ"):
            raise TooManyParts(
                f"data set nests sequences too deeply to be read (more than {MAX_NESTING} levels; real images use "
                "a few)"
            )
        if length == UNDEFINED:
            if tag == PIXEL_DATA or vr in (b"OB", b"OW"):
                ends.append(_FRAGMENTS)  # encapsulated pixel data below the top level (an icon)
            else:
                implicit = implicit or vr == b"UN"  # a sequence written as UN is implicit VR inside
                ends.append(UNDEFINED)
            encodings.append(implicit)
            position = start
        elif tag == ITEM or vr == b"SQ" or ((implicit or vr == b"UN") and data[start : start + 4] == item_tag):
            # An item, a sequence, or a value that starts as a sequence does where no VR says so (implicit VR,
            # UN): pydicom reads those as sequences when it knows the tag, also a private one.
            implicit = implicit or vr == b"UN"
            ends.append(start + length)
            encodings.append(implicit)
            position = start
        else:
            position = start + length


def _check_header_bytes(offset: int, frames: int) -> None:
    allowed = HEADER_BYTES_ALLOWED + HEADER_BYTES_PER_FRAME * (frames - 1)
    if offset > allowed:
        raise TooManyParts(
            f"the data set holds {offset / 1024**2:,.1f} MB before its pixel data, more than the header of an image "
            f"of {frames} frame(s) needs ({allowed / 1024**2:,.1f} MB at most); refused unread, as every copy of "
            "it would be held in memory"
        )


def _check_image_elements(found: Structure) -> None:
    allowed = IMAGE_ELEMENTS_ALLOWED + ELEMENTS_PER_FRAME * (found.frames - 1)
    if found.elements > allowed:
        raise TooManyParts(
            f"the data set holds {found.elements:,} elements before its pixel data, more than an image of "
            f"{found.frames} frame(s) needs ({allowed:,} at most); refused unread, as reading such images would hold "
            "up the series of every other sender"
        )


def _allowances(frames: int) -> tuple[int, int]:
    """(items, elements) a data set of ``frames`` frames may hold before its pixel data."""
    extra = frames - 1
    return ITEMS_ALLOWED + ITEMS_PER_FRAME * extra, ELEMENTS_ALLOWED + ELEMENTS_PER_FRAME * extra


def _too_many(what: str, allowed: int, frames: int) -> str:
    return (
        f"the data set holds more than {allowed:,} {what} before its pixel data, more than an image of {frames} "
        "frame(s) needs; refused unread, as reading it would take gigabytes of memory"
    )


def _frames(value: bytes) -> int:
    text = value.decode("ascii", "replace").strip(" \0")
    return min(int(text), FRAMES_COUNTED) if text.isdigit() and int(text) > 0 else 1
