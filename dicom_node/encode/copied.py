"""The source header the results copy patient, study and frame of reference attributes from, with invalid values
taken out.

The SEG and SR (highdicom) copy every attribute of the source's Patient, Clinical Trial Subject, General Study,
Patient Study and Clinical Trial Study modules, and its Frame of Reference; the RTSTRUCT copies a subset of the
same. A value the sender wrote against its VR (a 215-character StudyDescription, PatientWeight "abc", PatientAge
"ABCD", a name of seven components, ImageLaterality "X") would reach every result as it is, and validators
(dciodvfy) refuse it. :func:`checked_source` gives the encoders a copy of the source header in which such a value
of an optional (Type 3) attribute is left out and one of a Type 2 attribute is empty, each with a sentence for the
job's warnings. Identity attributes are never changed: admission refuses a series whose identity cannot label a
result, and a result never names another patient or study than its source.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence

from highdicom._standard_utils import get_module_attribute_map  # highdicom's own tables of the modules it copies
from pydicom import config
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

COPIED_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
    "frame-of-reference",
)
"""The modules whose top-level attributes the results copy from the source (highdicom's module keys)."""
COPIED_TYPES: dict[str, str] = {
    item["keyword"]: item["type"]
    for module in COPIED_MODULES
    for item in get_module_attribute_map()[module]
    if not item["path"]
} | {"ImageLaterality": "3"}  # the SEG's laterality, from the source image where it states one
"""Each copied attribute's type in its module: "1", "1C", "2", "2C" or "3"."""
IDENTITY_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "FrameOfReferenceUID",
    }
)
"""Never changed: who and which study a result belongs to, and the geometry it references (admission and the
receiver refuse what cannot label or place a result)."""
MAXIMUM_LENGTHS = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
"""The most characters a value of each VR may hold (for PN, each component group)."""
VALUE_FORMS = {
    "AE": "an application entity title",
    "AS": "an age in the DICOM form nnnD, nnnW, nnnM or nnnY (such as 045Y)",
    "CS": "a code string (capital letters, digits, spaces and underscores)",
    "DA": "a date in the DICOM form YYYYMMDD",
    "DS": "a decimal number",
    "DT": "a date and time in the DICOM form YYYYMMDDHHMMSS",
    "IS": "a whole number",
    "TM": "a time in the DICOM form HHMMSS.FFFFFF",
    "UI": "a UID",
}
"""What a value of each VR with a form must be, as a warning says it."""
ENUMERATED_VALUES = {
    "ImageLaterality": ("R", "L", "U", "B"),
    "QualityControlSubject": ("YES", "NO"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "SmokingStatus": ("YES", "NO", "UNKNOWN"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
}
"""Copied code strings whose values the standard enumerates."""
MULTI_LINE_VRS = frozenset({"LT", "ST", "UT"})
"""Text VRs that may hold line breaks, tabs and form feeds."""
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
MULTI_LINE_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
"""Characters no text value may hold (ESC, for character set switches, aside; in LT, ST and UT also TAB, LF, FF,
CR)."""
TEXT_VRS = frozenset({*MAXIMUM_LENGTHS, "UC", "UR", "UT"})
INTEGER_RANGE = (-(2**31), 2**31 - 1)


def checked_source(header: Dataset, notes: list[str] | None = None) -> Dataset:
    """The source header the results copy from: ``header`` itself when every copied value is valid, else a copy
    (``header`` is left as it is) without the invalid values: a Type 3 attribute's left out, a Type 2 one's empty.

    Each adds a sentence to ``notes`` naming the attribute (once: the SEG, SR and RTSTRUCT of a job share the list).
    Identity attributes (:data:`IDENTITY_KEYWORDS`) and Type 1 ones are copied as they are.
    """
    checked = header
    for keyword, usage in COPIED_TYPES.items():
        if keyword in IDENTITY_KEYWORDS or usage not in ("2", "2C", "3") or keyword not in header:
            continue
        problem = _readable_problem(header, keyword)
        if problem is None:
            continue
        if checked is header:
            checked = copy.copy(header)
            checked._dict = dict(header._dict)  # its own elements: what is changed here stays out of ``header``
        if usage == "3":
            del checked[keyword]
            outcome = "left out of the results"
        else:
            checked[keyword] = DataElement(header[keyword].tag, header[keyword].VR, None)
            outcome = "written empty in the results"
        sentence = f"{keyword} of the source images {problem}: {outcome}"
        if notes is not None and sentence not in notes:
            notes.append(sentence)
    return checked


def _readable_problem(header: Dataset, keyword: str) -> str | None:
    try:
        element = header[keyword]
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a value it cannot convert
        return "cannot be read"
    return value_problem(keyword, element)


def value_problem(keyword: str, element: DataElement) -> str | None:
    """Why ``element``'s value breaks its VR (or the attribute's values), as the end of a sentence; None when valid.

    Checked: the number of values, control characters, length, a person name's component groups and components,
    enumerated values, and the form of AE, AS, CS, DA, DS, DT, IS, TM and UI values (DS finite, IS 32-bit)."""
    if element.VR not in TEXT_VRS or element.value is None or element.value == "":
        return None
    values = list(element.value) if isinstance(element.value, (MultiValue, list, tuple)) else [element.value]
    if dictionary_VM(keyword) == "1" and len(values) > 1:
        return f"has {len(values)} values where one is allowed"
    for value in values:
        problem = _text_problem(keyword, element.VR, _as_written(value))
        if problem is not None:
            return problem
    return None


def _as_written(value: object) -> str:
    """A value's text as it is written: a number as the source wrote it, not as Python prints it."""
    original = getattr(value, "original_string", None)
    return str(original if original is not None else value).rstrip(" ")


def _text_problem(keyword: str, vr: str, text: str) -> str | None:
    control = MULTI_LINE_CONTROL_CHARACTERS if vr in MULTI_LINE_VRS else CONTROL_CHARACTERS
    if control.search(text):
        return "holds a control character (a tab, line break or similar)"
    if vr == "PN":
        return _name_problem(text)
    limit = MAXIMUM_LENGTHS.get(vr)
    if limit is not None and len(text) > limit:
        return f"is {len(text)} characters long, more than the {limit} DICOM allows"
    allowed = ENUMERATED_VALUES.get(keyword)
    if allowed is not None and text not in allowed:
        return f"is not one of {', '.join(allowed[:-1])} or {allowed[-1]}"
    if vr in VALUE_FORMS and not _valid_form(vr, text):
        return f"is not {VALUE_FORMS[vr]}"
    return None


def _name_problem(text: str) -> str | None:
    groups = text.split("=")
    if len(groups) > 3:
        return f"has {len(groups)} component groups, more than the 3 a person name may have"
    if any(len(group) > MAXIMUM_LENGTHS["PN"] for group in groups):
        return f"has a component group longer than the {MAXIMUM_LENGTHS['PN']} characters DICOM allows"
    if any(len(group.split("^")) > 5 for group in groups):
        return "has more than the 5 components a person name may have"
    return None


def _valid_form(vr: str, text: str) -> bool:
    try:
        validate_value(vr, text, config.RAISE)
    except (ValueError, TypeError):
        return False
    if vr == "DS":
        return math.isfinite(float(text))
    if vr == "IS":
        return INTEGER_RANGE[0] <= int(text) <= INTEGER_RANGE[1]
    return True


def checked_sources(sources: Sequence[Dataset], notes: list[str] | None = None) -> list[Dataset]:
    """``sources`` with the first, the one the results copy from, checked (:func:`checked_source`)."""
    return [checked_source(sources[0], notes), *sources[1:]] if sources else []
