"""SNOMED CT codes and display colours per structure, from TotalSegmentator's own mapping.

TotalSegmentator ships ``resources/totalsegmentator_snomed_mapping.csv`` with the
category, type, laterality modifier, anatomic region and colour of every structure.
Its own SEG writer passes only category and type; we keep the modifiers, so left
and right kidney differ in codes, not only in labels. The baseline model's classes
(not in that file) are coded here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from pydicom.sr.coding import Code

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")


@dataclass(frozen=True)
class StructureCodes:
    category: Code
    type: Code
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None
    rgb: tuple[int, int, int] = (255, 255, 0)


TISSUE = Code("85756007", "SCT", "Tissue")
BASELINE_CODES = {
    # The baseline's "body" is what is left of the body once its lungs and bone are labelled: soft tissue in the
    # entire body, not the entire body (a label map gives each voxel one structure).
    "body": StructureCodes(
        TISSUE,
        Code("87784001", "SCT", "Soft tissue"),
        anatomic_region=Code("38266002", "SCT", "Entire body"),
        rgb=(177, 122, 101),
    ),
    "lung_left": StructureCodes(ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung"), LEFT, rgb=(71, 232, 244)),
    "lung_right": StructureCodes(ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung"), RIGHT, rgb=(49, 186, 196)),
    "skeleton": StructureCodes(ANATOMICAL_STRUCTURE, Code("272673000", "SCT", "Bone"), rgb=(241, 214, 145)),
}


SIDES = {"left": "Left", "right": "Right"}
BASELINE_LABELS = {"body": "Body without lungs and bone"}
"""Labels that say more than the class name: the baseline's body holds neither its lungs nor its bone."""


def display_label(name: str) -> str:
    """A structure's class name as words a radiologist reads, laterality first.

    ``adrenal_gland_right`` -> ``Right adrenal gland``, ``rib_left_3`` -> ``Left rib 3``,
    ``vertebrae_L1`` -> ``Vertebrae L1``, ``lung_upper_lobe_left`` -> ``Left lung upper lobe``.
    Words holding digits or capitals (L1, T12, IVC) keep their spelling.
    """
    if name in BASELINE_LABELS:
        return BASELINE_LABELS[name]
    words = name.replace("-", "_").split("_")
    sides = [SIDES[w] for w in words if w in SIDES]
    rest = [w for w in words if w not in SIDES and w]
    text = " ".join(sides[:1] + [w if any(c.isdigit() or c.isupper() for c in w) else w.lower() for w in rest])
    return (text[:1].upper() + text[1:])[:64] if text else name[:64]


class UnknownStructure(KeyError):
    """A structure name with no codes: the encoder refuses rather than invent codes."""


def structure_codes(name: str) -> StructureCodes:
    """Codes for a structure of the baseline or of a TotalSegmentator task."""
    if name in BASELINE_CODES:
        return BASELINE_CODES[name]
    table = _totalsegmentator_table()
    if name not in table:
        raise UnknownStructure(f"no SNOMED codes for structure {name!r}")
    return table[name]


@lru_cache(maxsize=1)
def _totalsegmentator_table() -> dict[str, StructureCodes]:
    try:
        source = resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
        text = source.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return {}
    table = {}
    for row in csv.DictReader(text.splitlines()):
        red, green, blue = (int(v) for v in row["DicomRGBColor"].split(","))
        table[row["Structure"]] = StructureCodes(
            category=_code(row, "SegmentedPropertyCategoryCodeSequence"),
            type=_code(row, "SegmentedPropertyTypeCodeSequence"),
            type_modifier=_optional_code(row, "SegmentedPropertyTypeModifierCodeSequence"),
            anatomic_region=_optional_code(row, "AnatomicRegionSequence"),
            anatomic_region_modifier=_optional_code(row, "AnatomicRegionModifierSequence"),
            rgb=(red, green, blue),
        )
    return table


def _code(row: dict[str, str], sequence: str) -> Code:
    return Code(row[f"{sequence}.CodeValue"], row[f"{sequence}.CodingSchemeDesignator"], row[f"{sequence}.CodeMeaning"])


def _optional_code(row: dict[str, str], sequence: str) -> Code | None:
    return _code(row, sequence) if row.get(f"{sequence}.CodeValue") else None
