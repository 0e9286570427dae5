"""Write a dataset as pydicom does, byte for byte, with one large sequence pre-encoded.

pydicom's ``dcmwrite`` encodes every nested dataset on its own: a SEG's Per-frame
Functional Groups Sequence of 5,871 frames is about 48,000 datasets, and highdicom
shares many of them between frames (a plane's position and source items, the
derivation code). ``save_preencoded`` encodes that sequence itself in explicit VR
little endian, memoising nested datasets and sequences by object identity, writes
leaf elements with pydicom's own ``write_data_element``, and hands the bytes to
``dcmwrite`` as a raw element. Anything the encoder does not reproduce exactly
(another transfer syntax, an ambiguous VR inside the sequence) falls back to plain
``save_as``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, correct_ambiguous_vr_element, write_data_element
from pydicom.tag import BaseTag, ItemDelimiterTag, ItemTag, SequenceDelimiterTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, VR

Encodings = str | list[str]
EXPLICIT_LE = (False, True)  # (implicit VR, little endian)


class Unsupported(Exception):
    """The encoder cannot guarantee pydicom's bytes for this dataset; write it plainly."""


def save_preencoded(dataset: Dataset, path: str | os.PathLike[str] | BinaryIO, tag: int) -> bool:
    """``dataset.save_as(path)`` with sequence ``tag`` pre-encoded; the same bytes.

    The dataset is left as it was (the sequence and the original encoding are put back),
    except for the ambiguous VRs resolved at its top level, as ``save_as`` would.
    Returns whether the fast path was taken.
    """
    tag = BaseTag(tag)
    if not _handled(dataset) or tag not in dataset or dataset.get_item(tag).is_raw:  # raw: pydicom copies it as is
        dataset.save_as(path)
        return False
    try:
        value = SequenceEncoder().encode(dataset[tag].value, dataset.get("SpecificCharacterSet", default_encoding))
    except Unsupported:
        dataset.save_as(path)
        return False
    original = dataset.get_item(tag)
    implicit, little = dataset.original_encoding
    charset = dataset.original_character_set
    if not _is_original(dataset):  # otherwise dcmwrite leaves the top level as it is
        _prepare_top_level(dataset, skip=tag)
    try:
        dataset._dict[tag] = RawDataElement(
            tag, "SQ", len(value), value, 0, is_implicit_VR=False, is_little_endian=True
        )
        dataset.set_original_encoding(False, True, dataset._character_set)  # dcmwrite keeps raw elements raw
        dataset.save_as(path)
    finally:
        dataset._dict[tag] = original
        dataset.set_original_encoding(implicit, little, charset)
    return True


class SequenceEncoder:
    """Explicit VR little endian bytes of sequence items, as pydicom writes them, memoised by identity.

    Memo keys are (object id, id of the item encodings list); the objects and the
    lists are kept alive in the memo, so an id cannot be reused while encoding.
    """

    def __init__(self) -> None:
        self.memo: dict[tuple[int, int], tuple[object, bytes]] = {}
        self.charsets: dict[object, list[str]] = {}

    def encode(self, items: Iterable[Dataset], parent_encodings: Encodings | None) -> bytes:
        """The value of a sequence element whose dataset's character set is ``parent_encodings``."""
        return self._sequence(items, self._item_encodings(parent_encodings))

    def _sequence(self, items: Iterable[Dataset], encodings: list[str]) -> bytes:
        key = (id(items), id(encodings))
        if key not in self.memo:
            out = bytearray()
            for item in items:
                body = self._dataset(item, encodings)
                undefined = getattr(item, "is_undefined_length_sequence_item", False)
                out += _header(ItemTag, 0xFFFFFFFF if undefined else len(body)) + body
                if undefined:
                    out += _header(ItemDelimiterTag, 0)
            self.memo[key] = (items, bytes(out))
        return self.memo[key][1]

    def _dataset(self, dataset: Dataset, parent_encodings: list[str]) -> bytes:
        """One item's elements in tag order, as ``pydicom.filewriter.write_dataset`` writes them."""
        key = (id(dataset), id(parent_encodings))
        if key in self.memo:
            return self.memo[key][1]
        get = dataset.get_item if _is_original(dataset) else dataset.__getitem__  # pydicom re-encodes raw elements
        encodings = dataset.get("SpecificCharacterSet", parent_encodings)
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = EXPLICIT_LE
        for tag in sorted(dataset.keys()):
            if tag.element == 0 and tag.group > 6:  # retired group lengths are not written
                continue
            element = get(tag)
            if element.VR in AMBIGUOUS_VR:  # pydicom resolves these with the ancestors in view
                raise Unsupported(f"ambiguous VR {element.VR} of {tag} inside the sequence")
            if isinstance(element, DataElement) and element.VR == VR.SQ:
                fp.write(self._sequence_element(element, self._item_encodings(encodings)))
            else:
                write_data_element(fp, element, encodings)
        self.memo[key] = (dataset, fp.getvalue())
        return self.memo[key][1]

    def _sequence_element(self, element: DataElement, encodings: list[str]) -> bytes:
        """A nested SQ element: tag, VR, length (or undefined length and delimiter), items."""
        value = self._sequence(element.value, encodings)
        undefined = element.is_undefined_length
        tag = element.tag
        head = tag.group.to_bytes(2, "little") + tag.element.to_bytes(2, "little") + b"SQ\x00\x00"
        length = (0xFFFFFFFF if undefined else len(value)).to_bytes(4, "little")
        return head + length + value + (_header(SequenceDelimiterTag, 0) if undefined else b"")

    def _item_encodings(self, encodings: Encodings | None) -> list[str]:
        """What ``write_data_element`` passes on to a sequence's items; one list per value."""
        key = encodings if isinstance(encodings, str) or encodings is None else tuple(encodings)
        if key not in self.charsets:
            self.charsets[key] = convert_encodings(encodings or [default_encoding])
        return self.charsets[key]


def _header(tag: BaseTag, length: int) -> bytes:
    """An item or delimiter tag with its 4-byte length."""
    return tag.group.to_bytes(2, "little") + tag.element.to_bytes(2, "little") + length.to_bytes(4, "little")


def _is_original(dataset: Dataset) -> bool:
    """Whether ``write_dataset`` writes ``dataset`` as read (no VR correction, raw elements kept)."""
    return dataset.original_encoding == EXPLICIT_LE and dataset.original_character_set == dataset._character_set


def _handled(dataset: Dataset) -> bool:
    """Whether the file's transfer syntax is explicit VR little endian, not deflated."""
    syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
    return (
        syntax is not None
        and syntax.is_transfer_syntax
        and not syntax.is_implicit_VR
        and syntax.is_little_endian
        and syntax != DeflatedExplicitVRLittleEndian
    )


def _prepare_top_level(dataset: Dataset, skip: BaseTag) -> None:
    """What ``dcmwrite`` does to the top level before writing, except for sequence ``skip``.

    Once the dataset is marked as explicit VR LE, ``dcmwrite`` neither resolves
    ambiguous VRs nor re-encodes raw elements, so that is done here: Pixel Data's
    undefined length as ``dcmwrite`` sets it, then the VR corrections of every other
    element and nested item, and raw elements parsed as ``__getitem__`` would.
    """
    if "PixelData" in dataset:
        dataset["PixelData"].is_undefined_length = dataset.file_meta.TransferSyntaxUID.is_compressed
    for tag in sorted(dataset.keys()):
        if tag == skip:
            continue
        element = dataset[tag]  # parses a raw element, as dcmwrite's __getitem__ would
        if element.VR == VR.SQ:
            for item in element.value:
                correct_ambiguous_vr(item, True, [item, dataset])
        elif element.VR in AMBIGUOUS_VR:
            correct_ambiguous_vr_element(element, dataset, True, [dataset])
