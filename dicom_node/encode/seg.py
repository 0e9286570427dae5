"""DICOM Segmentation (highdicom) from a label map on the source CT's grid.

Two encodings, chosen per destination:

- ``BINARY``: Segmentation Storage, one frame per segment and slice (widest viewer support);
- ``LABELMAP``: Label Map Segmentation Storage (DICOM Sup 243), one frame per slice.

One segment per structure present, with TotalSegmentator's SNOMED CT codes including
laterality and anatomic region modifiers, a recommended display colour, and the
algorithm's identification. The SEG is in the source's Frame of Reference and
references every source instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode.codes import structure_codes

SegmentationType = Literal["BINARY", "LABELMAP"]
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # algorithm family (CID 7162)
COMPRESSION = {"BINARY": JPEG2000Lossless, "LABELMAP": RLELossless}


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str
    is_baseline: bool


@dataclass(frozen=True)
class EncodedSegmentation:
    dataset: hd.seg.Segmentation
    segment_classes: dict[int, int]  # segment number -> label value in the label map


def segment_descriptions(classes: dict[int, str], present: Sequence[int], algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    """One description per present label value, numbered 1..N in label order."""
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        version=algorithm.version[:64],
        family=ARTIFICIAL_INTELLIGENCE,
    )
    descriptions = []
    for number, label in enumerate(present, start=1):
        name = classes[label]
        coded = structure_codes(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=coded.category,
            segmented_property_type=coded.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=hd.UID(),
            tracking_id=name[:64],
            anatomic_regions=[coded.anatomic_region] if coded.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*coded.rgb),
        )
        if coded.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
                [hd.sr.CodedConcept(coded.type_modifier.value, coded.type_modifier.scheme_designator, coded.type_modifier.meaning)]
            )
        if coded.anatomic_region is not None and coded.anatomic_region_modifier is not None:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = DicomSequence(
                [
                    hd.sr.CodedConcept(
                        coded.anatomic_region_modifier.value,
                        coded.anatomic_region_modifier.scheme_designator,
                        coded.anatomic_region_modifier.meaning,
                    )
                ]
            )
        descriptions.append(description)
    return descriptions


def encode_segmentation(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    classes: dict[int, str],
    algorithm: Algorithm,
    *,
    segmentation_type: SegmentationType = "LABELMAP",
    series_number: int = 9701,
    series_description: str | None = None,
    compress: bool = False,
) -> EncodedSegmentation:
    """Build the SEG for ``labels`` (``[slice, row, column]``, slices in ``source_images`` order).

    Raises
    ------
    ValueError
        If the label map does not match the source images, or no structure is present.
    """
    if len(source_images) != labels.shape[0] or any(
        (int(ds.Rows), int(ds.Columns)) != labels.shape[1:] for ds in source_images
    ):
        raise ValueError(f"label map {labels.shape} does not match the {len(source_images)} source images")
    present = [int(v) for v in np.unique(labels) if v != 0 and int(v) in classes]
    if not present:
        raise ValueError("the label map holds no structure: nothing to encode")
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, label in enumerate(present, start=1):
        lookup[label] = number
    segments = lookup[labels]
    baseline = " (baseline)" if algorithm.is_baseline else ""
    description = series_description or f"Segmentation {algorithm.name}{baseline}"
    dataset = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=segments,
        segmentation_type=segmentation_type,
        segment_descriptions=segment_descriptions(classes, present, algorithm),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="dicom-node",
        software_versions=__version__,
        device_serial_number="0",
        content_description=description[:64],
        content_label="SEGMENTATION",
        transfer_syntax_uid=COMPRESSION[segmentation_type] if compress else ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    dataset.SeriesDescription = description[:64]
    return EncodedSegmentation(dataset, {number: label for number, label in enumerate(present, start=1)})
