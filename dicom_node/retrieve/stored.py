"""Stored instances as pynetdicom sends them: top-level elements kept raw, nested data never parsed.

``pydicom.dcmread`` parses every undefined-length sequence it meets, however
deep, and pydicom then re-encodes it on sending. Here the data set's
top-level elements are located by walking the bytes (an undefined-length
element is skipped by counting item and sequence delimiters, without
recursion or allocation), and each becomes a ``RawDataElement`` that pydicom
writes back byte for byte. Only the File Meta Information and the SOP Class
and Instance UIDs are ever decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pynetdicom.dsutils import split_dataset

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def read_stored(path: str | Path) -> Dataset:
    """The stored data set, ready for ``send_c_store``, without decoding what lies below the top level.

    Deflated files are read with ``dcmread`` (their bytes cannot be walked).

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If its data set is not well-formed (an element runs past the end).
    """
    file_meta, offset = split_dataset(Path(path))
    syntax = file_meta.TransferSyntaxUID
    if syntax.is_deflated:
        return dcmread(path)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    with open(path, "rb") as stream:
        stream.seek(offset)
        data = stream.read()
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset(file_meta)
    for tag, vr, length, start, stop in top_level_elements(data, implicit=implicit, little_endian=little):
        dataset[tag] = RawDataElement(Tag(tag), vr, length, data[start:stop], start, implicit, little)
    # the same encoding and character set as read: pydicom then writes raw elements as they are
    dataset.set_original_encoding(implicit, little, dataset._character_set)
    return dataset


def top_level_elements(
    data: bytes, *, implicit: bool, little_endian: bool
) -> Iterator[tuple[int, str | None, int, int, int]]:
    """(tag, VR, length, value start, value end) of each top-level element.

    For an undefined-length element the value ends before its Sequence
    Delimitation Item, which pydicom writes back itself.
    """
    order = "<" if little_endian else ">"
    position = 0
    while position < len(data):
        tag, vr, length, header = _header(data, position, order, implicit)
        start = position + header
        if length == UNDEFINED:
            stop = _end_of_undefined(data, start, order, implicit)
            yield tag, vr, length, start, stop
            position = stop + 8
        else:
            stop = start + length
            if stop > len(data):
                raise ValueError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data set")
            yield tag, vr, length, start, stop
            position = stop


def _header(data: bytes, position: int, order: str, implicit: bool) -> tuple[int, str | None, int, int]:
    """Tag, VR, value length and header size of the element (or item) at ``position``."""
    if position + 8 > len(data):
        raise ValueError("the data set ends inside an element header")
    group, element = struct.unpack_from(order + "HH", data, position)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, None, struct.unpack_from(order + "L", data, position + 4)[0], 8
    vr = data[position + 4 : position + 6].decode("ascii", "replace")
    if vr in LONG_LENGTH_VRS:
        if position + 12 > len(data):
            raise ValueError("the data set ends inside an element header")
        return tag, vr, struct.unpack_from(order + "L", data, position + 8)[0], 12
    return tag, vr, struct.unpack_from(order + "H", data, position + 6)[0], 8


def _end_of_undefined(data: bytes, position: int, order: str, implicit: bool) -> int:
    """Offset of the Sequence Delimitation Item that closes the undefined-length value starting at ``position``."""
    depth = 0  # open undefined-length items and sequences inside ours
    while position < len(data):
        tag, _, length, header = _header(data, position, order, implicit)
        if tag == SEQUENCE_DELIMITER:
            if depth == 0:
                return position
            depth -= 1
            position += 8
        elif tag == ITEM_DELIMITER:
            depth -= 1
            position += 8
        elif length == UNDEFINED:
            depth += 1
            position += header
        else:
            position += header + length
    raise ValueError("an undefined-length sequence has no end")
