"""Whether the results derive from images that went through lossy compression, and how they say so.

DICOM requires an object derived from lossy compressed images to keep LossyImageCompression "01", with the
methods (LossyImageCompressionMethod) and ratios (LossyImageCompressionRatio) where they are known (PS3.3
C.7.6.1.1.5). highdicom copies the flag of the first source only; a series whose other images were lossy (or that
arrived in a lossy transfer syntax without saying so) would give a SEG claiming "00". :func:`mark_lossy` sets them
from every source: its flag, methods and ratios, and the transfer syntax it was stored in (the receiver stores each
instance as it arrived).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.frames import cod_transform

JPEG_LOSSY = "ISO_10918_1"
JPEG_LS_NEAR_LOSSLESS = "ISO_14495_1"
JPEG_2000_IRREVERSIBLE = "ISO_15444_1"
HTJ2K = "ISO_15444_15"
JPEG_XL = "ISO_18181_1"
MPEG2 = "ISO_13818_2"
H264 = "ISO_14496_10"
HEVC = "ISO_23008_2"
_JPEG_PROCESSES = (50, 51, 52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)  # lossy JPEG processes, retired ones too
LOSSY_TRANSFER_SYNTAXES: dict[str, str] = {
    **{f"1.2.840.10008.1.2.4.{process}": JPEG_LOSSY for process in _JPEG_PROCESSES},
    "1.2.840.10008.1.2.4.81": JPEG_LS_NEAR_LOSSLESS,
    "1.2.840.10008.1.2.4.100": MPEG2,
    "1.2.840.10008.1.2.4.100.1": MPEG2,
    "1.2.840.10008.1.2.4.101": MPEG2,
    "1.2.840.10008.1.2.4.101.1": MPEG2,
    **{f"1.2.840.10008.1.2.4.{number}": H264 for number in ("102", "103", "104", "105", "106")},
    **{f"1.2.840.10008.1.2.4.{number}.1": H264 for number in ("102", "103", "104", "105", "106")},
    "1.2.840.10008.1.2.4.107": HEVC,
    "1.2.840.10008.1.2.4.108": HEVC,
    "1.2.840.10008.1.2.4.111": JPEG_LOSSY,  # JPEG XL recompression of a JPEG image: the JPEG's losses remain
}
"""Transfer syntaxes whose pixel data is always lossy, with the compression method each implies."""
MAYBE_LOSSY_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.91": JPEG_2000_IRREVERSIBLE,
    "1.2.840.10008.1.2.4.93": JPEG_2000_IRREVERSIBLE,
    "1.2.840.10008.1.2.4.203": HTJ2K,
    "1.2.840.10008.1.2.4.112": JPEG_XL,
}
"""Transfer syntaxes that allow lossy or lossless pixel data: counted lossy unless the image says "00" and (JPEG 2000
and HTJ2K) its codestream uses the reversible wavelet transform."""
JPEG_2000_FAMILY = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"})
LOSSLESS_ONLY_JPEG_2000: dict[str, str] = {
    "1.2.840.10008.1.2.4.90": JPEG_2000_IRREVERSIBLE,
    "1.2.840.10008.1.2.4.201": HTJ2K,
    "1.2.840.10008.1.2.4.202": HTJ2K,
}
"""JPEG 2000 and HTJ2K transfer syntaxes that allow lossless data only: a codestream under one that uses the
irreversible transform all the same (a misconfigured encoder or archive) is lossy, whatever the syntax claims."""
CODESTREAM_START = b"\xff\x4f\xff\x51"  # SOC followed by SIZ
CODESTREAM_BYTES = 65536
"""How much of the pixel data is read to find the first codestream's COD segment (after any offset table)."""


@dataclass(frozen=True)
class LossyHistory:
    """The lossy compressions the sources went through: each method once, in the order first applied, and one
    ratio per method where every method's ratio is known (the largest any source gives), else None."""

    methods: tuple[str, ...]
    ratios: tuple[str, ...] | None


def lossy_history(sources: Iterable[Dataset]) -> LossyHistory | None:
    """What lossy compression ``sources`` went through, from each one's LossyImageCompression, its methods and
    ratios, and the transfer syntax it was stored in; None when none of them is lossy."""
    ratios: dict[str, list[float]] = {}
    unknown: set[str] = set()
    lossy = False
    for source in sources:
        steps = _source_steps(source)
        if steps is None:
            continue
        lossy = True
        for method, ratio in steps:
            if method is None:
                continue
            ratios.setdefault(method, [])
            if ratio is None:
                unknown.add(method)
            else:
                ratios[method].append(ratio)
    if not lossy:
        return None
    methods = tuple(ratios)
    known = bool(methods) and not unknown and all(ratios[m] for m in methods)
    return LossyHistory(methods, tuple(_ds(max(ratios[m])) for m in methods) if known else None)


def mark_lossy(dataset: Dataset, sources: Sequence[Dataset]) -> None:
    """Set the SEG ``dataset``'s LossyImageCompression from ``sources`` (:func:`lossy_history`): "01" with the
    methods and ratios that are known when any source is lossy, else "00". (The SR and RTSTRUCT IODs do not define
    the attribute: validators flag it there, so they do not carry it.)"""
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in dataset:
            del dataset[keyword]
    history = lossy_history(sources)
    if history is None:
        dataset.LossyImageCompression = "00"
        return
    dataset.LossyImageCompression = "01"
    if history.ratios:
        dataset.LossyImageCompressionRatio = list(history.ratios)
    if history.methods:
        dataset.LossyImageCompressionMethod = list(history.methods)


def _source_steps(source: Dataset) -> list[tuple[str | None, float | None]] | None:
    """One source's lossy compressions (method, ratio; None where not known), or None when it is not lossy.

    Its flag, methods and ratios, and what its transfer syntax implies; a JPEG 2000 or HTJ2K codestream that uses the
    irreversible transform is lossy under any of their transfer syntaxes, a lossless-only one too."""
    flag = str(source.get("LossyImageCompression") or "").strip()
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    implied = LOSSY_TRANSFER_SYNTAXES.get(syntax)
    if syntax in MAYBE_LOSSY_TRANSFER_SYNTAXES and _maybe_lossy_is_lossy(source, syntax, flag):
        implied = MAYBE_LOSSY_TRANSFER_SYNTAXES[syntax]
    elif syntax in LOSSLESS_ONLY_JPEG_2000 and _irreversible(source):
        implied = LOSSLESS_ONLY_JPEG_2000[syntax]
    if flag != "01" and implied is None:
        return None
    methods = [str(m).strip() for m in _values(source.get("LossyImageCompressionMethod")) if str(m).strip()]
    ratios = [_ratio(r) for r in _values(source.get("LossyImageCompressionRatio"))]
    steps: list[tuple[str | None, float | None]] = [
        (method, ratios[index] if len(ratios) == len(methods) else None) for index, method in enumerate(methods)
    ]
    if implied is not None and implied not in methods:
        steps.append((implied, ratios[-1] if len(ratios) == len(methods) + 1 else None))
    return steps


def _maybe_lossy_is_lossy(source: Dataset, syntax: str, flag: str) -> bool:
    """A transfer syntax that allows both is counted lossy unless the image says "00" and, for JPEG 2000 and HTJ2K,
    its codestream does not use the irreversible transform (which always loses information)."""
    return flag != "00" or (syntax in JPEG_2000_FAMILY and _irreversible(source))


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def _ratio(value: object) -> float | None:
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _ds(number: float) -> str:
    """A ratio as a decimal string (at most 16 characters)."""
    return f"{number:.6g}"


def _irreversible(source: Dataset) -> bool:
    """Whether the source's first JPEG 2000 (or HTJ2K) codestream uses the irreversible (9-7) wavelet transform,
    which always loses information; False where the file or its COD segment cannot be read."""
    path = getattr(source, "filename", None)
    if not isinstance(path, (str, Path)):
        return False
    try:
        status = os.stat(path)
    except OSError:
        return False
    return _irreversible_file(str(path), status.st_mtime_ns, status.st_size)


@lru_cache(maxsize=8192)
def _irreversible_file(path: str, modified_ns: int, size: int) -> bool:
    """:func:`_irreversible` of one file version: ``modified_ns`` and ``size`` tell a replaced file from the one
    read before (the SEG, SR and RTSTRUCT of a job each ask of every source)."""
    try:
        with open(path, "rb") as file:
            dcmread(file, stop_before_pixels=True)  # leaves the file at the Pixel Data element
            data = file.read(CODESTREAM_BYTES)
    except Exception:  # noqa: BLE001 - an unreadable file says nothing about its compression
        return False
    return _cod_transform(data) == 0


def _cod_transform(data: bytes) -> int | None:
    """The wavelet transform byte of the first codestream's COD segment (0: irreversible 9-7, 1: reversible 5-3)."""
    position = data.find(CODESTREAM_START)
    return None if position < 0 else cod_transform(data[position:])
