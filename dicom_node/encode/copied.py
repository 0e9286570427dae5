"""The source header the results copy patient, study, frame of reference and equipment attributes from, with invalid
values taken out.

The SEG and SR (highdicom) copy every attribute of the source's Patient, Clinical Trial Subject, General Study,
Patient Study and Clinical Trial Study modules, and its Frame of Reference; the RTSTRUCT copies a subset of the
same. The SEG and SR also describe the scanner that made the source images, in their ContributingEquipmentSequence,
from the source's General Equipment attributes (:data:`EQUIPMENT_KEYWORDS`); the RTSTRUCT names only this node. A
value the sender wrote against its VR (a 215-character StudyDescription, PatientWeight "abc", PatientAge "ABCD", a
name of seven components, ImageLaterality "X", a 23-character CodeValue in a ProcedureCodeSequence item, a bell
character in InstitutionName) would reach every result as it is, and validators (dciodvfy) refuse it.
:func:`checked_source` gives the encoders a copy of the source header in which such a value of an optional (Type 3)
attribute is left out and one of a Type 2 attribute is empty, and a sequence item holding one is left out, each with
a sentence for the job's warnings.
Identity attributes are never changed: admission refuses a series whose identity cannot label a result, and a result
never names another patient or study than its source. Only an item of an identity sequence that lacks an attribute
DICOM requires in it (an OtherPatientIDsSequence item without TypeOfPatientID) is left out, with its sentence.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

from highdicom import ContributingEquipment
from highdicom._standard_utils import get_module_attribute_map  # highdicom's own tables of the modules it copies
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_node.encode.values import sequence_check, value_problem

__all__ = [
    "EQUIPMENT_KEYWORDS",
    "IDENTITY_KEYWORDS",
    "checked_source",
    "checked_sources",
    "copied_types",
    "value_problem",
]

COPIED_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
    "frame-of-reference",
)
"""The modules whose top-level attributes the results copy from the source (highdicom's module keys)."""


@functools.cache
def copied_types() -> dict[str, str]:
    """Each copied attribute's type in its module: "1", "1C", "2", "2C" or "3" (read from highdicom's tables at
    first use: a process that encodes nothing, such as `serve` or a receiving process, never reads them)."""
    return {
        item["keyword"]: item["type"]
        for module in COPIED_MODULES
        for item in get_module_attribute_map()[module]
        if not item["path"]
    } | {"ImageLaterality": "3"}  # the SEG's laterality, from the source image where it states one


EQUIPMENT_PARAMETERS = {
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model_name",
    "SoftwareVersions": "software_versions",
    "DeviceSerialNumber": "device_serial_number",
    "InstitutionName": "institution_name",
    "InstitutionAddress": "institution_address",
    "InstitutionalDepartmentName": "institutional_department_name",
    "StationName": "station_name",
    "AcquisitionDateTime": "contribution_datetime",
}
"""The source's attributes highdicom describes the acquisition equipment with, and its parameter for each."""
EQUIPMENT_KEYWORDS = tuple(EQUIPMENT_PARAMETERS)
"""What highdicom copies from the source into the SEG's and SR's item for the acquisition equipment
(ContributingEquipmentSequence; AcquisitionDateTime as its ContributionDateTime). highdicom leaves that whole item out,
silently, when a value breaks its rules or Manufacturer is missing."""
LEFT_OUT = "left out of the results"
MANUFACTURER_FOR_CHECKS = "checked"  # stands in for the manufacturer while another equipment value is checked
ACQUISITION_EQUIPMENT_LEFT_OUT = "the acquisition equipment of the source images is left out of the results"


@functools.cache
def item_requirements() -> dict[tuple[str, ...], dict[str, str]]:
    """What items of the copied sequences must hold, by sequence path (highdicom's tables; Type 3 left out)."""
    requirements: dict[tuple[str, ...], dict[str, str]] = {}
    for module in COPIED_MODULES:
        for item in get_module_attribute_map()[module]:
            if item["path"] and item["type"] in ("1", "1C", "2"):
                requirements.setdefault(tuple(item["path"]), {})[item["keyword"]] = item["type"]
    return requirements


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
receiver refuse what cannot label or place a result). The identity sequences (OtherPatientIDsSequence,
IssuerOfPatientIDQualifiersSequence) are checked as any copied sequence: admission refuses a series whose items hold
an invalid value, but not one whose items lack an attribute DICOM requires in them (an other patient ID without its
TypeOfPatientID), and such an item is left out of the results while the other items are kept."""


def checked_source(header: Dataset, notes: list[str] | None = None) -> Dataset:
    """The source header the results copy from: ``header`` itself when every copied value is valid, else a copy
    (``header`` is left as it is) without the invalid values: a Type 3 attribute's left out, a Type 2 one's empty.

    A sequence is checked item by item, nested items included (:func:`~dicom_node.encode.values.sequence_check`):
    its items with an invalid value, or without an attribute DICOM requires in them, are left out, and the sequence
    itself when none is left (a Type 2 one is then written empty); the identity sequences too. An invalid
    equipment value (:data:`EQUIPMENT_KEYWORDS`) is left out of the acquisition equipment's item, and an invalid
    Manufacturer leaves the whole item out, as does anything else highdicom refuses in it. Each change adds a
    sentence to ``notes`` naming the attribute (once: the SEG, SR and RTSTRUCT of a job share the list). Identity
    attributes (:data:`IDENTITY_KEYWORDS`) and Type 1 ones are copied as they are.
    """
    checked = header
    for keyword, change in _changes(header):
        element, sentence = change
        if checked is header:
            checked = copy.copy(header)
            checked._dict = dict(header._dict)  # its own elements: what is changed here stays out of ``header``
        if element is None:
            del checked[keyword]
        else:
            checked[keyword] = element
        if notes is not None and sentence not in notes:
            notes.append(sentence)
    return checked


def _changes(header: Dataset) -> list[tuple[str, tuple[DataElement | None, str]]]:
    """Each copied attribute of ``header`` that changes in the results, with its change (:func:`_change`)."""
    changes = []
    for keyword, usage in copied_types().items():
        if keyword in IDENTITY_KEYWORDS or usage not in ("2", "2C", "3") or keyword not in header:
            continue
        change = _change(header, keyword, usage)
        if change is not None:
            changes.append((keyword, change))
    for keyword in EQUIPMENT_KEYWORDS:
        change = _equipment_change(header, keyword) if keyword in header else None
        if change is not None and keyword == "Manufacturer":  # the item needs it: without it none is written
            change = None, change[1].replace(LEFT_OUT, ACQUISITION_EQUIPMENT_LEFT_OUT)
        if change is not None:
            changes.append((keyword, change))
    if not any(keyword == "Manufacturer" for keyword, _ in changes) and not _equipment_describable(header, changes):
        sentence = (
            "The acquisition equipment of the source images cannot be described in DICOM's terms: it is left out of "
            "the results"
        )
        changes.append(("Manufacturer", (None, sentence)))
    return changes


def _equipment_change(header: Dataset, keyword: str) -> tuple[None, str] | None:
    """An equipment value's change (:func:`_change`), also where it keeps to its VR but highdicom refuses it in the
    acquisition equipment's item (a backslash in InstitutionAddress): then it is left out as well."""
    change = _change(header, keyword, "3")
    if change is not None:
        return None, change[1]
    value = header.get(keyword)
    if value is None or value == "":
        return None
    others = {} if keyword == "Manufacturer" else {"manufacturer": MANUFACTURER_FOR_CHECKS}
    try:
        ContributingEquipment(
            purpose_of_reference=codes.DCM.AcquisitionEquipment, **others, **{EQUIPMENT_PARAMETERS[keyword]: value}
        )
    except Exception:  # noqa: BLE001 - highdicom raises many kinds on a value it refuses
        return (
            None,
            f"{keyword} of the source images cannot be written in the acquisition equipment's description: {LEFT_OUT}",
        )
    return None


def _equipment_describable(header: Dataset, changes: Sequence[tuple[str, object]]) -> bool:
    """Whether highdicom makes the acquisition equipment's item from ``header`` once ``changes`` are made, so that
    it never leaves the item out unsaid; True as well where the source names no manufacturer (there is none to
    make)."""
    if not header.get("Manufacturer"):
        return True
    described = copy.copy(header)
    described._dict = dict(header._dict)
    for keyword, _ in changes:
        if keyword in EQUIPMENT_KEYWORDS:
            del described[keyword]
    try:
        ContributingEquipment.for_image_acquisition(described)
    except Exception:  # noqa: BLE001 - highdicom raises many kinds on a value it refuses, and drops the item
        return False
    return True


def _change(header: Dataset, keyword: str, usage: str) -> tuple[DataElement | None, str] | None:
    """How a copied attribute changes in the results (its new element, None to leave it out) and the sentence
    saying so; None when it is copied as it is."""
    empty = None if usage == "3" else DataElement(keyword, dictionary_VR(keyword), None)
    outcome = "left out of the results" if usage == "3" else "written empty in the results"
    try:
        element = header[keyword]
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a value it cannot convert
        return empty, f"{keyword} of the source images cannot be read: {outcome}"
    if element.VR != "SQ":
        problem = value_problem(keyword, element)
        return None if problem is None else (empty, f"{keyword} of the source images {problem}: {outcome}")
    check = sequence_check(element, item_requirements())
    if check.valid:
        return None
    invalid = set(check.invalid_items)
    kept = [item for index, item in enumerate(element.value) if index not in invalid]
    if kept:
        left_out = len(check.invalid_items)
        what = f"{left_out} of its {len(element.value)} items {'is' if left_out == 1 else 'are'} left out"
        return DataElement(element.tag, "SQ", DicomSequence(kept)), (
            f"{keyword} of the source images: {check.first_problem}; {what} of the results"
        )
    if usage != "3":
        empty = DataElement(element.tag, "SQ", DicomSequence())
    return empty, f"{keyword} of the source images: {check.first_problem}; the sequence is {outcome}"


def checked_sources(sources: Sequence[Dataset], notes: list[str] | None = None) -> list[Dataset]:
    """``sources`` with the first, the one the results copy from, checked (:func:`checked_source`)."""
    return [checked_source(sources[0], notes), *sources[1:]] if sources else []
