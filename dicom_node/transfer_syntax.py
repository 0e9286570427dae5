"""Which transfer syntaxes the node offers a peer it sends to, and the lossless conversions between them.

DICOM asks every sender that offers a presentation context to offer Implicit VR Little Endian too (PS3.5 10.1),
unless it offers only compressed syntaxes. The dispatcher and the C-MOVE sub-association therefore offer, for each
SOP class, the syntax an instance was stored in, then Explicit VR Little Endian, then Implicit VR Little Endian; a
C-GET requestor proposes its own. An instance goes out as stored where the peer accepts that, else converted to the
first uncompressed syntax the peer accepted: re-encoded (Big Endian byte order swapped, Deflate undone), or
decompressed. Nothing is ever compressed again, and an image decompressed from a lossy syntax keeps saying it was
lossy compressed (LossyImageCompression "01", with its methods and ratios: :mod:`dicom_node.encode.lossy`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.pixels.utils import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.encode.lossy import LossyHistory, lossy_history

UNCOMPRESSED_FALLBACKS: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""What the node offers beside an instance's stored syntax, in order of preference."""

SWAPPED_VRS = frozenset({"OW", "OF", "OD", "OL", "OV", "UN"})
"""Values held as raw bytes whose byte order depends on the transfer syntax (OB is a byte stream: no order)."""


class NotConverted(ValueError):
    """A stored instance the node does not convert for a peer; the message says why."""


def syntaxes_offered(stored_syntax: str) -> list[str]:
    """The transfer syntaxes offered for an instance stored in ``stored_syntax``: it first, then the fallbacks."""
    return list(dict.fromkeys([str(stored_syntax), *map(str, UNCOMPRESSED_FALLBACKS)]))


def offered_pairs(instances: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs to offer for instances given as (SOP class, stored syntax)."""
    return {(sop_class, syntax) for sop_class, stored in instances for syntax in syntaxes_offered(stored)}


def syntax_to_send(sop_class: str, stored_syntax: str, accepted: set[tuple[str, str]]) -> str | None:
    """The syntax to send an instance in: as stored when the peer accepts that, else the first fallback it
    accepted; None when it accepts none of them for this SOP class."""
    for syntax in syntaxes_offered(stored_syntax):
        if (str(sop_class), syntax) in accepted:
            return syntax
    return None


def uid_name(uid: object) -> str:
    """A UID's name where the standard gives one (``CT Image Storage``), else the UID itself."""
    name = UID(str(uid)).name if uid else ""
    return name if name and name != str(uid) else str(uid or "an unnamed SOP class")


def converted(dataset: Dataset, target: str, name: str) -> Dataset:
    """``dataset`` (read whole, as stored) made ready to go out in the uncompressed ``target`` syntax.

    A compressed image is decompressed, keeping its SOP Instance UID and, where it was lossy, LossyImageCompression
    "01" with its methods and ratios; a Big Endian one has its pixel data's byte order swapped. ``name`` says which
    instance, for the refusal.

    Raises
    ------
    NotConverted
        If a Big Endian instance holds other byte-ordered binary values (which the node does not swap).
    """
    source = UID(str(dataset.file_meta.TransferSyntaxUID))
    if source.is_compressed:
        history = lossy_history([dataset])  # before decompressing: it reads the stored syntax
        dataset.decompress(generate_instance_uid=False)
        if int(dataset.get("BitsAllocated") or 0) == 1:
            _pack_single_bits(dataset)
        if history is not None:
            keep_lossy_marking(dataset, history)
    elif not source.is_little_endian:
        _pixels_to_little_endian(dataset, name)
    _encode_as(dataset, UID(target))
    return dataset


def _encode_as(dataset: Dataset, target: UID) -> None:
    """Make ``dataset`` one encoded in ``target`` (as pynetdicom requires of what it sends in that syntax).

    Its top-level elements are decoded from the stored encoding first, their ambiguous VRs resolved (Implicit VR
    gives "US or SS", "OB or OW"); items of sequences keep their own encoding, which pydicom converts as it writes.
    """
    for _ in dataset:  # decoding each element replaces its stored bytes
        pass
    correct_ambiguous_vr(dataset, is_little_endian=True)
    dataset.file_meta.TransferSyntaxUID = target
    dataset.set_original_encoding(target.is_implicit_VR, True, dataset.original_character_set)


def keep_lossy_marking(dataset: Dataset, history: LossyHistory) -> None:
    """Say in ``dataset`` that its pixels went through lossy compression: "01", the methods, and the ratios where
    all are known (else the ratios it already gave are left as they are)."""
    dataset.LossyImageCompression = "01"
    if history.methods:
        dataset.LossyImageCompressionMethod = list(history.methods)
    if history.ratios:
        dataset.LossyImageCompressionRatio = list(history.ratios)


def _pack_single_bits(dataset: Dataset) -> None:
    """Pack a decompressed 1-bit image (a BINARY SEG) eight pixels a byte, as BitsAllocated 1 says: the decoders
    give a byte per pixel."""
    pixels = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("NumberOfFrames") or 1)
    pixels *= int(dataset.get("SamplesPerPixel") or 1)
    values = np.frombuffer(dataset.PixelData, dtype=np.uint8)
    if len(values) in (pixels, pixels + 1):  # a byte per pixel (and a padding byte); else already packed
        dataset.PixelData = pack_bits(values[:pixels])
        dataset["PixelData"].VR = "OB"


def _pixels_to_little_endian(dataset: Dataset, name: str) -> None:
    """Swap the byte order of a Big Endian instance's Pixel Data words; refuse one with other such values."""
    others = sorted(
        {element.keyword or str(element.tag) for element in dataset.iterall() if element.VR in SWAPPED_VRS}
        - {"PixelData"}
    )
    if others:
        raise NotConverted(
            f"{name} is stored in Explicit VR Big Endian with binary values the node does not convert to little "
            f"endian ({', '.join(others[:5])}); it is sent only to peers that accept Big Endian"
        )
    if "PixelData" not in dataset or dataset["PixelData"].VR == "OB":  # a byte stream: no byte order
        return
    width = max(int(dataset.get("BitsAllocated") or 16), 16) // 8  # OW: words of 16 bits, or the pixel's size
    words = np.frombuffer(dataset.PixelData, dtype=f">u{width}")
    dataset.PixelData = words.astype(f"<u{width}").tobytes()
