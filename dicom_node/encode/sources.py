"""Source headers for the results: read once, their text decoded, re-declared as UTF-8.

A source series may declare any Specific Character Set (ISO 2022 code extensions for
Japanese, Korean or Chinese names, a single-byte Latin set, or a value DICOM does not
define). The results copy patient and study names from it, so their text is decoded
here with pydicom's character set handling and the results are written in UTF-8
(``ISO_IR 192``), which represents every name. An undefined value is read as pydicom
reads it (a misspelling such as ``ISO-IR 126`` as what it means, anything else as Latin-1) and text that does not decode keeps replacement characters; both
are logged as warnings naming the instance, never the text itself. Neither changes whom the results name:
admission refuses a series whose patient or study identity does not decode strictly (text beyond plain ASCII under
no, the default or an undefined character set included), so only other text (descriptions, the referring
physician's name) can be read so.
"""

from __future__ import annotations

import codecs
import logging
import re
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.charset import decode_bytes, default_encoding, python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from dicom_node.logs import log_event

LOG = logging.getLogger(__name__)
PYDICOM_LOG = logging.getLogger("pydicom")

RESULT_CHARACTER_SET = "ISO_IR 192"
"""Specific Character Set of every result (UTF-8): it represents any name a source carries."""


def read_source_header(path: Path) -> Dataset:
    """The header of a source instance (no pixel data), its text decoded, declared ``ISO_IR 192``."""
    return text_in_utf8(dcmread(path, stop_before_pixels=True))


def text_in_utf8(header: Dataset) -> Dataset:
    """``header`` itself, its text decoded with its Specific Character Set and re-declared ``ISO_IR 192``.

    Only the source the results copy patient, study and equipment text from needs
    this (the first one: highdicom and the RTSTRUCT read names from it); decoding
    every element of every slice's header would cost tens of milliseconds a slice.

    Parameters
    ----------
    header
        A source header as read (text still in the source's encoding).

    Returns
    -------
    pydicom.dataset.Dataset
        The same data set: every text value a ``str`` (person names rebuilt from
        their decoded components), so a result re-encodes them in UTF-8.
    """
    held = _HeldRecords()
    declared = _declared_character_sets(header)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PYDICOM_LOG.addFilter(held)  # pydicom logs its own decoding complaints too: this module's warnings replace them
        try:
            header.decode()
        finally:
            PYDICOM_LOG.removeFilter(held)
    uid = str(header.get("SOPInstanceUID", ""))
    for value in (v for v in declared if v not in python_encoding):
        log_event(
            LOG,
            logging.WARNING,
            "source.character_set_undefined",
            sop_instance_uid=uid,
            specific_character_set="\\".join(declared),
            detail=f"Specific Character Set '{value}' is not one DICOM defines: its text was read as "
            f"{_read_as(value)}; the results are written in UTF-8 (ISO_IR 192)",
        )
    if any("decode" in message for message in [*(str(w.message) for w in caught), *held.messages]):
        log_event(
            LOG,
            logging.WARNING,
            "source.text_not_decodable",
            sop_instance_uid=uid,
            specific_character_set="\\".join(declared),
            detail="some text does not decode in the declared Specific Character Set: "
            "the characters that do not were replaced in the results",
        )
    header.walk(_rebuild_person_name)
    header.SpecificCharacterSet = RESULT_CHARACTER_SET
    for keyword in TYPE_2_COPIED:  # absent in the source: present and empty in the results, as their IODs need
        if keyword not in header:
            setattr(header, keyword, None)
    return header


TYPE_2_COPIED = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Patient and study attributes the results must carry (type 2) and copy from the source: a source without
one of them (an anonymised series, a modality that leaves them out) gets them empty, never fails the job."""


class _HeldRecords(logging.Filter):
    """Keeps pydicom's log records of one read back (their messages are kept here) instead of logging them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


def _declared_character_sets(header: Dataset) -> list[str]:
    value = header.get("SpecificCharacterSet")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip() for v in values]


def _read_as(value: str) -> str:
    """The character set pydicom reads an undefined Specific Character Set value as (its spelling fixes, else Latin-1)."""
    read_as = character_set_read_as(value)
    if read_as is None:
        return "Latin-1 (ISO_IR 100)"
    return read_as if read_as in python_encoding else f"the encoding named '{value}'"


def character_set_read_as(value: str) -> str | None:
    """What pydicom reads one Specific Character Set value as: the value itself where DICOM defines it, the term a
    common misspelling means (``ISO-IR 126`` as ``ISO_IR 126``), or the value where it names an encoding Python
    knows (``UTF-8``); None where it is none of these (pydicom then reads the text as Latin-1, which never fails;
    admission reads it as plain ASCII)."""
    if value in python_encoding:
        return value
    if re.match("^ISO[^_]IR", value):
        return f"ISO_IR{value[6:]}" if f"ISO_IR{value[6:]}" in python_encoding else None
    if re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", value):
        return f"ISO 2022 IR {value[12:]}" if f"ISO 2022 IR {value[12:]}" in python_encoding else None
    try:
        codecs.lookup(value)
    except LookupError:
        return None
    return value


PERSON_NAME_DELIMITERS = {0x3D, 0x5E}
"""``=`` and ``^``: before each, PS3.5 6.2.1.2 switches the text back to the first character set."""


def _rebuild_person_name(dataset: Dataset, element: DataElement) -> None:
    """A person name from its decoded text only: written in the results' character set, not the source's bytes."""
    if element.VR != "PN" or element.value is None:
        return
    if element.VM > 1:
        element.value = [PersonName(_whole_name(name)) for name in element.value]
    elif element.value != "":
        element.value = PersonName(_whole_name(element.value))


def _whole_name(name: PersonName | str) -> str:
    """The name's text, its encoded bytes decoded as one value, escape sequences followed from start to end.

    pydicom splits a name's bytes at every ``=`` byte before decoding its groups, but under ISO 2022 IR 87 (JIS X
    0208 kanji, as Japanese names are written) a character's two bytes may include 0x3D: 住 is ``ESC $ B 0x3D
    0x3B``. ``Sumita^Shun=住田^俊`` then read ``Sumita^Shun==;ED^=S``, and the results named another patient.
    """
    encoded = getattr(name, "original_string", None)
    if not isinstance(encoded, bytes):
        return str(name)
    encodings = getattr(name, "encodings", None) or [default_encoding]
    return decode_bytes(encoded.rstrip(b" \x00"), list(encodings), PERSON_NAME_DELIMITERS)
