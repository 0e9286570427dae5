"""How many elements and sequence items a received data set holds, counted on its bytes before pydicom reads it.

pydicom builds a Python object for every item of an undefined-length sequence as it reads a data
set, and for every item of any sequence once that sequence is used (admission reads the per-frame
functional groups). A few megabytes of empty items would so cost gigabytes of memory and minutes
of CPU in the receiver, admission and the worker. This walk allocates nothing: it follows element
and item headers up to the pixel data, descending into every sequence, and refuses a data set with
more elements or items than any real image needs for its number of frames (an image, one with pixel
data, fewer elements than a report or a structure set may hold).

The same walk refuses a data set cut short: an element, item or compressed fragment whose declared length runs
past the bytes received, a data set ending inside an element header, or a sequence (or encapsulated pixel data) of
undefined length never closed. pydicom reads a short last value without a word, and a cut-off UID is still a
valid UID: the slice would be stored as whole in a series of its own. Past the pixel data it follows only the
fragments of encapsulated pixel data and the elements after them, never the pixel bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag

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


class CutShort(Exception):
    """The data set ends before a value, item or sequence it declares does; the message says where."""


@dataclass
class Structure:
    """What the walk found before the pixel data."""

    elements: int = 0
    items: int = 0
    frames: int = 1
    series_uid_value: bytes | None = None
    """The value of the top-level SeriesInstanceUID, where the walk passed one of at most :data:`UID_BYTES`, whole."""
    pixel_data: int | None = None
    """Where the top-level Pixel Data (7FE0,0010) element starts, once the walk has reached it."""
    pixel_data_encapsulated: bool | None = None
    """Whether that element has an undefined length (compressed fragments follow); None before the walk reached it."""
    pixel_data_overrun: tuple[int, int] | None = None
    """(declared, received) bytes of a top-level Pixel Data value of defined length that runs past the end: judged
    by the caller, who knows how long an uncompressed image's pixels must be."""
    judged: bool = False
    """Whether the walk followed the data set to its end (or to an overrun of its Pixel Data), so ``pixel_data``
    None means it has none; False for the head of an inflated data set, whose rest the walk never sees."""
    out_of_step: bool = False
    """Whether the walk ran past the end after elements that do not read as a data set (tags not ascending, a VR
    that is none): junk, or a wrong length earlier. Left for the reader to name (not a data set), else damaged."""


@dataclass(frozen=True)
class StructureRefusal:
    """Why a data set is refused unread, and the series it names, so the refusal counts with that series."""

    reason: str
    series_uid_text: str | None
    """The top-level SeriesInstanceUID the walk passed before refusing, as text: unchecked, the caller must check
    it is a valid UID before using it (None where the walk had passed none, or its bytes are not ASCII)."""


@dataclass(frozen=True)
class Walked:
    """What :func:`walk_structure` found: why the data set is refused, if it is, and what it holds."""

    refusal: StructureRefusal | None
    structure: Structure


def walk_structure(encoded: bytes, *, implicit: bool, little_endian: bool, whole: bool = True) -> Walked:
    """Walk ``encoded`` (a data set without its file meta): refused when it holds too many elements or items to be
    read, or is cut short (:class:`CutShort`). ``whole``: False when ``encoded`` is only the head of the data set
    (an inflated Deflate data set), so its end is no cut."""
    found = Structure()
    order = "<" if little_endian else ">"
    try:
        _walk(encoded, order, implicit, found, whole)
    except CutShort as exc:
        if not _in_step(encoded, order, implicit):
            found.out_of_step = True
            return Walked(None, found)
        return Walked(StructureRefusal(str(exc), uid_text(found.series_uid_value)), found)
    except TooManyParts as exc:
        return Walked(StructureRefusal(str(exc), uid_text(found.series_uid_value)), found)
    except struct.error:  # not expected: every read is bounded; the reader that follows judges the bytes
        found.judged = False
    return Walked(None, found)


def structure_refusal(encoded: bytes, *, implicit: bool, little_endian: bool) -> StructureRefusal | None:
    """Why ``encoded`` (a whole data set without its file meta) holds too many elements or items to be read, or is
    cut short; None if neither (:func:`walk_structure`)."""
    return walk_structure(encoded, implicit=implicit, little_endian=little_endian).refusal


def structure_problem(encoded: bytes, *, implicit: bool, little_endian: bool) -> str | None:
    """The reason of :func:`structure_refusal`, or None."""
    refusal = structure_refusal(encoded, implicit=implicit, little_endian=little_endian)
    return None if refusal is None else refusal.reason


def uid_text(value: bytes | None) -> str | None:
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
"""On the stack of open values: encapsulated pixel data (the image's own, or an icon's inside a sequence), whose
items are compressed fragments, skipped by their length, never read as elements nor counted as items."""
_OPEN = UNDEFINED + 2
"""On the stack of open values, plus its tag: a sequence or item of undefined length (the tag names one never
closed). Every entry from UNDEFINED up is open until its delimiter; those below are where a defined length ends."""


def _walk(data: bytes, order: str, implicit: bool, found: Structure, whole: bool) -> None:
    """Count elements and items up to the top-level pixel data, then follow what is left without counting the
    pixels, refusing a value that runs past the end (a tight loop: it runs on every received image)."""
    tag_and_length = struct.Struct(order + "HHL")
    explicit_short = struct.Struct(order + "HH2sH")
    long_length = struct.Struct(order + "L")
    item_tag = struct.pack(order + "HH", _ITEM_GROUP, ITEM & 0xFFFF)
    ends: list[int] = []  # where each open defined-length value ends; _FRAGMENTS or _OPEN + tag for undefined ones
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
                    if not whole:
                        return
                    raise CutShort(_ends_in_header(size - position))
                length = long_length.unpack_from(data, position + 8)[0]
                header = 12
        tag = group << 16 | element
        start = position + header
        if group == _ITEM_GROUP:
            if tag != ITEM:  # an item or sequence delimiter
                if ends and ends[-1] >= UNDEFINED:
                    ends.pop()
                    encodings.pop()
                    implicit = encodings[-1] if encodings else base_implicit
                position += 8
                continue
            if ends and ends[-1] == _FRAGMENTS:  # a compressed fragment: bytes, not elements
                if length == UNDEFINED or start + length > size:
                    if not whole:
                        return
                    raise CutShort(_overrun("a compressed fragment of Pixel Data", length, size - start))
                position = start + length
                continue
            found.items += 1
            if found.items > items_allowed:
                raise TooManyParts(_too_many("sequence items", items_allowed, found.frames))
        else:
            if tag == PIXEL_DATA and not ends and found.pixel_data is None:
                _check_header_bytes(position, found.frames)
                _check_image_elements(found)
                found.pixel_data = position
                found.pixel_data_encapsulated = length == UNDEFINED
                if not whole:
                    return  # the rest of the data set is not here to follow
                if length == UNDEFINED:  # encapsulated: its fragments follow, then its sequence delimiter
                    ends.append(_FRAGMENTS)
                    encodings.append(implicit)
                    position = start
                elif start + length > size:
                    found.pixel_data_overrun = (length, size - start)
                    found.judged = True
                    return
                else:
                    position = start + length
                continue
            found.elements += 1
            if found.elements > elements_allowed:
                raise TooManyParts(_too_many("elements", elements_allowed, found.frames))
            if tag == NUMBER_OF_FRAMES and not ends and length <= 12:
                found.frames = _frames(data[start : start + length])
                items_allowed, elements_allowed = _allowances(found.frames)
            elif tag == SERIES_INSTANCE_UID and not ends:  # the last one, as pydicom keeps; never one in an item
                found.series_uid_value = data[start : start + length] if length <= UID_BYTES else None
        if length != UNDEFINED:
            if start + length > size:
                if not whole:
                    return
                if tag == SERIES_INSTANCE_UID and not ends:
                    found.series_uid_value = None  # cut off: it names a series that does not exist
                raise CutShort(_overrun(_element_name(tag), length, size - start))
            if not ends and start + length > HEADER_BYTES_ALLOWED and found.pixel_data is None:
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
                ends.append(_OPEN + tag)
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
    if not whole:
        return
    if position < size:
        raise CutShort(_ends_in_header(size - position))
    for end in ends:
        if end >= UNDEFINED:  # the outermost value never closed
            what = "Pixel Data (7FE0,0010), encapsulated," if end == _FRAGMENTS else _element_name(end - _OPEN)
            raise CutShort(
                f"the data set is cut short: {what} of undefined length is never closed (its delimiter is missing); "
                f"{_SEND_AGAIN}"
            )
    found.judged = True


_SEND_AGAIN = "the image was refused, ask the sender to send it again"
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def _in_step(data: bytes, order: str, implicit: bool) -> bool:
    """Whether the top-level elements before the first of undefined length (or the end) read as a data set: tags
    ascending, none of group 0000 (a command's), each explicit VR a VR. Judged only for a data set found cut short,
    as junk (a text file, random bytes) walks as a value past the end too and is better named not a data set."""
    tag_and_length = struct.Struct(order + "HHL")
    explicit_short = struct.Struct(order + "HH2sH")
    long_length = struct.Struct(order + "L")
    previous = -1
    position, size = 0, len(data)
    while position + 8 <= size:
        if implicit:
            group, element, length = tag_and_length.unpack_from(data, position)
            header = 8
        else:
            group, element, vr, length = explicit_short.unpack_from(data, position)
            header = 8
            if group == _ITEM_GROUP:
                return True  # a delimiter after the pixel data: nothing more to judge
            if vr not in _VRS:
                return False
            if vr in _LONG_LENGTH_VR_BYTES:
                if position + 12 > size:
                    break
                length = long_length.unpack_from(data, position + 8)[0]
                header = 12
        tag = group << 16 | element
        if group == 0 or tag <= previous:
            return False
        if length == UNDEFINED:
            break
        previous = tag
        position += header + length
    return True


def _element_name(tag: int) -> str:
    """``element (0020,000E) SeriesInstanceUID``, as an admin can look it up (a private one says so)."""
    group, element = tag >> 16, tag & 0xFFFF
    if tag == ITEM:
        return "an item of a sequence"
    keyword = keyword_for_tag(tag) if group % 2 == 0 else ""
    named = f" {keyword}" if keyword else (" (private)" if group % 2 else "")
    return f"element ({group:04X},{element:04X}){named}"


def cut_short_reason(tag: int, declared: int, remaining: int) -> str:
    """Why a data set is refused whose element ``tag`` declares ``declared`` bytes where ``remaining`` are left."""
    return _overrun(_element_name(tag), declared, remaining)


def _overrun(what: str, declared: int, remaining: int) -> str:
    return (
        f"the data set is cut short: {what} declares {declared:,} bytes and {max(remaining, 0):,} remain; {_SEND_AGAIN}"
    )


def _ends_in_header(remaining: int) -> str:
    return f"the data set is cut short: it ends {remaining} byte(s) into the header of an element; {_SEND_AGAIN}"


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
