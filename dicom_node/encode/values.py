"""Whether a text value keeps to the rules of its VR, at a data set's top level and inside the items of its
sequences.

The results copy patient and study attributes from a source image, sequences with their items included; a value
that breaks its VR (a 23-character code value, a UID component with a leading zero, a line break in a code meaning)
makes validators (dciodvfy) and some PACS refuse the result. Only pydicom is needed here: admission checks the
identity sequences with the same rules before a series is queued.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom import config
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

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
    "UI": "a UID (numbers joined by dots, none with a leading zero)",
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
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
MULTI_LINE_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
"""Characters no decoded text value may hold (in LT, ST and UT TAB, LF, FF and CR aside). ESC too: pydicom takes a
character set's switches out as it decodes, and the results are written in UTF-8, so an ESC left in decoded text
switches nothing and would reach the results as a terminal's command (``\x1b[2J``)."""
TEXT_VRS = frozenset({*MAXIMUM_LENGTHS, "UC", "UR", "UT"})
INTEGER_RANGE = (-(2**31), 2**31 - 1)
MAXIMUM_SEQUENCE_DEPTH = 6
"""Nesting levels of sequences inside a copied sequence that are checked (patient and study sequences nest two or
three deep); an item nesting deeper is treated as invalid."""
MAXIMUM_SEQUENCE_VALUES = 10_000
"""Elements of one copied sequence (all its items and theirs) that are checked; the items beyond are treated as
invalid, so a sequence sent to exhaust the node costs a bounded time."""
ItemRequirements = Mapping[tuple[str, ...], Mapping[str, str]]
"""What an item of a sequence must hold, by the sequence's path of keywords from the top level: each attribute's
type there ("1": present with a value, "2": present, "1C": only read to recognise a code item)."""
CODE_VALUE_KEYWORDS = ("CodeValue", "LongCodeValue", "URNCodeValue")
"""One of these holds a code item's value (the Code Sequence Macro)."""


def value_problem(keyword: str, element: DataElement) -> str | None:
    """Why ``element``'s value breaks its VR (or the attribute's values), as the end of a sentence; None when valid.

    Checked: the number of values, control characters, length, a person name's component groups and components,
    enumerated values, and the form of AE, AS, CS, DA, DS, DT, IS, TM and UI values (DS finite, IS 32-bit).
    ``keyword`` is empty for a private attribute: its number of values is not checked."""
    if element.VR not in TEXT_VRS or element.value is None or element.value == "":
        return None
    values = list(element.value) if isinstance(element.value, (MultiValue, list, tuple)) else [element.value]
    if keyword and dictionary_VM(keyword) == "1" and len(values) > 1:
        return f"has {len(values)} values where one is allowed"
    for value in values:
        problem = _text_problem(keyword, element.VR, _as_written(value))
        if problem is not None:
            return problem
    return None


@dataclass(frozen=True)
class SequenceCheck:
    """The items of a sequence holding a value that breaks its VR (0-based indices), and the first such problem
    as the end of a sentence that names the attribute and its item ("CodeValue in item 1 is 23 characters long,
    more than the 16 DICOM allows")."""

    invalid_items: tuple[int, ...]
    first_problem: str | None

    @property
    def valid(self) -> bool:
        """Whether every item's values keep to their VRs."""
        return not self.invalid_items


def sequence_check(element: DataElement, requirements: ItemRequirements | None = None) -> SequenceCheck:
    """Check each item of the sequence ``element`` with :func:`value_problem`, nested items included, down to
    :data:`MAXIMUM_SEQUENCE_DEPTH` levels and :data:`MAXIMUM_SEQUENCE_VALUES` elements in all.

    With ``requirements``, an item that lacks an attribute DICOM requires in it is invalid too
    (:func:`missing_attribute`)."""
    items = list(element.value or [])
    budget = [MAXIMUM_SEQUENCE_VALUES]
    invalid: list[int] = []
    first: str | None = None
    path = (element.keyword,)
    for index, item in enumerate(items):
        problem = _item_problem(item, 1, budget, path, requirements or {})
        if problem is not None:
            invalid.append(index)
            first = first or f"{problem[0]} in item {index + 1} {problem[1]}"
    return SequenceCheck(tuple(invalid), first)


def _item_problem(
    item: Dataset, depth: int, budget: list[int], path: tuple[str, ...], requirements: ItemRequirements
) -> tuple[str, str] | None:
    """The first invalid value of ``item``, or a required attribute it lacks: (the attribute, with its path inside
    the item; why), or None.

    ``budget`` holds how many more elements may be checked (shared by all the items of one sequence); ``path`` is the
    item's sequence's keywords from the top level, where ``requirements`` are looked up."""
    if depth > MAXIMUM_SEQUENCE_DEPTH:
        return "a sequence", f"nests deeper than the {MAXIMUM_SEQUENCE_DEPTH} levels that are checked"
    for tag in list(item.keys()):
        budget[0] -= 1
        if budget[0] < 0:
            return "a value", f"is beyond the first {MAXIMUM_SEQUENCE_VALUES} values of the sequence, which are checked"
        try:
            element = item[tag]
        except Exception:  # noqa: BLE001 - pydicom raises many kinds on a value it cannot convert
            return f"attribute {tag}", "cannot be read"
        name = element.keyword or f"attribute {element.tag}"
        if element.VR == "SQ":
            for index, nested in enumerate(element.value or []):
                problem = _item_problem(nested, depth + 1, budget, (*path, element.keyword), requirements)
                if problem is not None:
                    return f"{problem[0]} in item {index + 1} of {name}", problem[1]
            continue
        reason = value_problem(element.keyword, element)
        if reason is not None:
            return name, reason
    missing = missing_attribute(item, requirements.get(path, {}))
    return None if missing is None else (missing, "is missing or empty, where DICOM requires it")


def missing_attribute(item: Dataset, required: Mapping[str, str]) -> str | None:
    """The first attribute ``item`` lacks that DICOM requires in it, or None: a Type 1 one present with a value, a
    Type 2 one present; in a code item (the Code Sequence Macro) a code value, and with a CodeValue or LongCodeValue
    its CodingSchemeDesignator; in an item naming an issuer (the HL7v2 Hierarchic Designator Macro) a local or a
    universal ID, and with a UniversalEntityID its UniversalEntityIDType. Other conditions (Type 1C) are not
    evaluated."""
    for keyword, usage in required.items():
        if (usage == "1" and not _has_value(item, keyword)) or (usage == "2" and keyword not in item):
            return keyword
    issuer = _missing_issuer_attribute(item, required)
    if issuer is not None:
        return issuer
    if "CodeMeaning" in required and "CodeValue" in required:
        if not any(_has_value(item, keyword) for keyword in CODE_VALUE_KEYWORDS):
            return "CodeValue"
        if (_has_value(item, "CodeValue") or _has_value(item, "LongCodeValue")) and not _has_value(
            item, "CodingSchemeDesignator"
        ):
            return "CodingSchemeDesignator"
    return None


def _missing_issuer_attribute(item: Dataset, required: Mapping[str, str]) -> str | None:
    """What an item naming an issuer lacks (see :func:`missing_attribute`), or None: where its sequence holds a
    LocalNamespaceEntityID or UniversalEntityID by condition, one of them; where it holds a UniversalEntityIDType by
    condition, that type once a UniversalEntityID is given."""
    designators = ("LocalNamespaceEntityID", "UniversalEntityID")
    if all(keyword in required for keyword in designators) and not any(_has_value(item, k) for k in designators):
        return "LocalNamespaceEntityID or UniversalEntityID"
    typed = "UniversalEntityIDType" in required and _has_value(item, "UniversalEntityID")
    return "UniversalEntityIDType" if typed and not _has_value(item, "UniversalEntityIDType") else None


def _has_value(item: Dataset, keyword: str) -> bool:
    if keyword not in item:
        return False
    try:
        value = item[keyword].value
    except Exception:  # noqa: BLE001 - an unreadable value is reported by the value checks, not as missing
        return True
    return value is not None and value != "" and not (isinstance(value, (list, MultiValue)) and len(value) == 0)


def _as_written(value: object) -> str:
    """A value's text as it is written: a number as the source wrote it, not as Python prints it."""
    original = getattr(value, "original_string", None)
    return str(original if original is not None else value).rstrip(" ")


def _text_problem(keyword: str, vr: str, text: str) -> str | None:
    control = MULTI_LINE_CONTROL_CHARACTERS if vr in MULTI_LINE_VRS else CONTROL_CHARACTERS
    if control.search(text):
        return "holds a control character (a tab, line break or similar)"
    if vr == "PN":
        return person_name_problem(text)
    limit = MAXIMUM_LENGTHS.get(vr)
    if limit is not None and len(text) > limit:
        return f"is {len(text)} characters long, more than the {limit} DICOM allows"
    allowed = ENUMERATED_VALUES.get(keyword)
    if allowed is not None and text not in allowed:
        return f"is not one of {', '.join(allowed[:-1])} or {allowed[-1]}"
    if vr in VALUE_FORMS and not _valid_form(vr, text):
        return f"is not {VALUE_FORMS[vr]}"
    return None


def person_name_problem(name: str) -> str | None:
    """Why a person name breaks DICOM's form (at most 3 component groups of 5 components, each group up to 64
    characters), as the end of a sentence; None when it keeps to it. Admission refuses a PatientName so written."""
    groups = name.split("=")
    if len(groups) > 3:
        return f"has {len(groups)} component groups (=), where a name has at most 3"
    for group in groups:
        components = group.split("^")
        if len(components) > 5:
            return (
                f"has {len(components)} components (^), where a name has at most 5 (family, given, middle, prefix, "
                "suffix)"
            )
        if len(group) > MAXIMUM_LENGTHS["PN"]:
            return (
                f"has a component group of {len(group)} characters, where at most {MAXIMUM_LENGTHS['PN']} are allowed"
            )
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
