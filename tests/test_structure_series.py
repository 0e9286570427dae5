"""A data set refused by the structure walk names its series, so the refusal counts with it (and marks it PARTIAL).

Only the top-level SeriesInstanceUID the walk has passed, and only a valid UID: one in a sequence item (a referenced
series) is another series, and a malformed value must never become a series key.
"""

from __future__ import annotations

import struct

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.receive.header import InvalidInstance, read_header
from dicom_node.receive.structure import ITEMS_ALLOWED, MAX_NESTING, structure_refusal

SERIES = "1.2.826.0.1.3680043.8.498.12345678901234567890"
OTHER = "1.2.826.0.1.3680043.8.498.99999"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
UNDEFINED = 0xFFFFFFFF


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode()
    return encoded + b"\0" if len(encoded) % 2 else encoded


def _item(content: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _identity() -> bytes:
    return _element(0x0008, 0x0016, b"UI", _uid(CT_IMAGE)) + _element(0x0008, 0x0018, b"UI", _uid("1.2.3.4"))


def _series(value: bytes) -> bytes:
    return _element(0x0020, 0x000E, b"UI", value)


def _private_elements(group: int, count: int) -> bytes:
    return b"".join(_element(group, 0x1000 + n, b"LO", b"x ") for n in range(count))


PIXELS = _element(0x7FE0, 0x0010, b"OB", bytes(64))
TOO_MANY_ELEMENTS = _private_elements(0x0009, 6_000)  # group 0009: before the series UID (counted at the pixel data)


def _too_deep() -> bytes:
    nested = b""
    for _ in range(MAX_NESTING + 2):
        nested = _element(0x0029, 0x1010, b"SQ", _item(nested))
    return _element(0x0029, 0x0010, b"LO", b"DEEP") + nested


def _too_many_items() -> bytes:
    return _element(0x0029, 0x0010, b"LO", b"MANY") + _element(0x0029, 0x1010, b"SQ", _item(b"") * (ITEMS_ALLOWED + 1))


def _too_large() -> bytes:
    return _element(0x0029, 0x0010, b"LO", b"HUGE") + _element(0x0029, 0x1010, b"OB", bytes(9 * 1024**2))


def _refused(encoded: bytes, syntax=ExplicitVRLittleEndian) -> InvalidInstance:
    with pytest.raises(InvalidInstance) as refused:
        read_header(encoded, syntax)
    return refused.value


@pytest.mark.parametrize(
    ("after_series", "reason"),
    [
        (b"", "6,003 elements before its pixel data"),
        (_too_deep(), "nests sequences too deeply"),
        (_too_many_items(), f"more than {ITEMS_ALLOWED:,} sequence items"),
        (_too_large(), "MB before its pixel data"),
    ],
    ids=["elements", "nesting", "items", "header bytes"],
)
def test_a_structure_refusal_after_the_series_uid_names_the_series(after_series, reason):
    extra = TOO_MANY_ELEMENTS if not after_series else b""
    encoded = _identity() + extra + _series(_uid(SERIES)) + after_series + PIXELS

    refusal = _refused(encoded)

    assert reason in str(refusal) and refusal.series_instance_uid == SERIES


def test_a_structure_refusal_in_implicit_vr_names_the_series():
    encoded = (
        _implicit(0x0008, 0x0018, _uid("1.2.3.4"))
        + b"".join(_implicit(0x0009, 0x1000 + n, b"x ") for n in range(6_000))
        + _implicit(0x0020, 0x000E, _uid(SERIES) + b" ")  # padded with a space: stripped as pydicom does
        + _implicit(0x7FE0, 0x0010, bytes(64))
    )

    assert _refused(encoded, ImplicitVRLittleEndian).series_instance_uid == SERIES


def _sequences_holding_another_series(group: int, element: int) -> list[bytes]:
    """A sequence whose item names another series (as ReferencedSeriesSequence does): of defined length, and of
    undefined length with an undefined-length item."""
    defined = _element(group, element, b"SQ", _item(_series(_uid(OTHER))))
    undefined = (
        struct.pack("<HH2sHI", group, element, b"SQ", 0, UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
        + _series(_uid(OTHER))
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    return [defined, undefined]


@pytest.mark.parametrize("form", ["defined length", "undefined length"])
def test_a_series_uid_inside_a_sequence_item_is_not_taken(form):
    index = ["defined length", "undefined length"].index(form)
    referenced = _sequences_holding_another_series(0x0008, 0x1115)[index]  # ReferencedSeriesSequence
    assert _refused(_identity() + referenced + TOO_MANY_ELEMENTS + PIXELS).series_instance_uid is None

    after = _sequences_holding_another_series(0x0040, 0x0275)[index]  # RequestAttributesSequence, after the series
    own_then_other = _identity() + TOO_MANY_ELEMENTS + _series(_uid(SERIES)) + after + PIXELS
    assert _refused(own_then_other).series_instance_uid == SERIES


@pytest.mark.parametrize(
    "value",
    [
        _uid("1.2.abc.4"),
        _uid("01.2.3"),  # a leading zero in a component
        _uid("1.2.3\\1.2.4"),  # two values
        _uid("1." + "2" * 70),  # longer than a UID may be
        "1.2.\u00e93".encode("latin-1") + b"\0",  # not ASCII
        b"",
        b"  ",
    ],
)
def test_an_invalid_series_uid_is_not_attached_to_a_structure_refusal(value):
    encoded = _identity() + TOO_MANY_ELEMENTS + _series(value) + PIXELS

    refusal = _refused(encoded)

    assert "elements before its pixel data" in str(refusal) and refusal.series_instance_uid is None


def test_a_later_invalid_series_uid_leaves_none_as_pydicom_would_read_the_last():
    encoded = _identity() + TOO_MANY_ELEMENTS + _series(_uid(SERIES)) + _series(_uid("1.2.x")) + PIXELS

    assert _refused(encoded).series_instance_uid is None


def test_a_refusal_before_the_walk_reaches_the_series_uid_names_no_series():
    """Too many items in a group before 0020 are refused where they are: the series UID is never read (reading on
    would cost what the limit saves)."""
    many = _element(0x0009, 0x0010, b"LO", b"MANY") + _element(0x0009, 0x1010, b"SQ", _item(b"") * (ITEMS_ALLOWED + 1))
    encoded = _identity() + many + _series(_uid(SERIES)) + PIXELS

    refusal = structure_refusal(encoded, implicit=False, little_endian=True)

    assert refusal is not None and refusal.series_uid_text is None


def test_an_accepted_image_is_unaffected():
    encoded = _identity() + _series(_uid(SERIES)) + PIXELS

    assert structure_refusal(encoded, implicit=False, little_endian=True) is None
