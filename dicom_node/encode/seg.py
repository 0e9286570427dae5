"""DICOM Segmentation (highdicom) from a label map on the source CT's grid.

Two encodings, chosen per destination:

- ``BINARY``: Segmentation Storage, one frame per segment and slice (widest viewer support);
- ``LABELMAP``: Label Map Segmentation Storage (DICOM Sup 243), one frame per slice.

One segment per structure present, with TotalSegmentator's SNOMED CT codes including
laterality and anatomic region modifiers, a recommended display colour, and the
algorithm's identification. The SEG is in the source's Frame of Reference and
references every source instance.

Save with ``write_segmentation`` (pydicom's bytes, several times faster for many
frames); a worker calls ``warm_up`` once at start-up so that its first job does not
pay highdicom's one-off loading of the DICOM standard's tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode.codes import display_label, structure_codes
from dicom_node.encode.copied import checked_sources
from dicom_node.encode.fast_write import save_preencoded
from dicom_node.encode.lossy import mark_lossy
from dicom_node.encode.sources import RESULT_CHARACTER_SET
from inference.volume import orthonormal_directions

SegmentationType = Literal["BINARY", "LABELMAP"]
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # algorithm family (CID 7162) of a trained model
HISTOGRAM_ANALYSIS = codes.cid7162.HistogramAnalysis  # the baseline's: thresholds on HU, no training
COMPRESSION = {"BINARY": JPEG2000Lossless, "LABELMAP": RLELossless}
PER_FRAME_FUNCTIONAL_GROUPS = 0x52009230
SMALL_UNSIGNED = (np.uint8, np.uint16)  # label dtypes counted with np.bincount


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str  # for trained models the weights' identity: dataset ids and SHA-256
    is_baseline: bool
    test_weights: bool = False  # synthetic/untrained weights: every description says so
    parameters: tuple[tuple[str, str], ...] = ()  # how it ran: (("device", "cpu"), ("precision", "bf16"), ...)

    def series_description(
        self, what: str, attempt: int = 1, *, partial: bool = False, source_series: str | None = None
    ) -> str:
        """E.g. "Segmentation <name> (baseline) of series 3 PARTIAL (re-run 2)", within 64 characters.

        ``partial``: the result covers less than the whole series; ``attempt``: the run
        of the job that made it (a run after the first replaces the earlier result);
        ``source_series``: the SeriesNumber of the series it segments, so the results of two
        series of one study (arterial and venous) are told apart in a PACS. The name is
        shortened, never the markers: first its trailing parenthesis goes, then words from its end.
        """
        markers = f" of series {source_series[:12]}" if source_series else ""
        markers += " TEST WEIGHTS" if self.test_weights else ""
        markers += " PARTIAL" if partial else ""
        markers += f" (re-run {attempt})" if attempt > 1 else ""
        whole = f"{what} {self.name}"
        if len(whole) + len(markers) <= 64 and (not self.is_baseline or "baseline" in self.name):
            return whole + markers
        suffix = (" (baseline)" if self.is_baseline else "") + markers  # a shortened name may lose "baseline"
        if len(what) + len(suffix) > 64:
            suffix = markers  # the baseline tag gives way to what the object is and its markers
        room = 64 - len(suffix)
        head = whole
        if len(head) > room and " (" in self.name:
            head = f"{what} {self.name.split(' (')[0]}"
        if len(head) > room:  # whole words of the name, or none of it: never a word cut in two
            words = head[: room + 1].rsplit(" ", 1)[0]
            head = words if len(words) > len(what) else what[:room]
        return head + suffix


@dataclass(frozen=True)
class EncodedSegmentation:
    dataset: hd.seg.Segmentation
    segment_classes: dict[int, int]  # segment number -> label value in the label map


def segment_descriptions(
    classes: dict[int, str],
    present: Sequence[int],
    algorithm: Algorithm,
    tracking_uids: Mapping[int, str] | None = None,
) -> list[hd.seg.SegmentDescription]:
    """One description per present label value, numbered 1..N in label order.

    ``tracking_uids`` (label value -> Tracking UID) give a structure the same UID in every object of a run
    (:func:`tracking_uids`); a label without one gets a new UID."""
    tracking_uids = tracking_uids or {}
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        version=algorithm.version[:64],
        family=HISTOGRAM_ANALYSIS if algorithm.is_baseline else ARTIFICIAL_INTELLIGENCE,
        parameters=dict(algorithm.parameters) or None,  # AlgorithmParameters: device=cpu,backend=...,precision=...
    )
    descriptions = []
    for number, label in enumerate(present, start=1):
        name = classes[label]
        coded = structure_codes(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=display_label(name),
            segmented_property_category=coded.category,
            segmented_property_type=coded.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=tracking_uids.get(label) or hd.UID(),
            tracking_id=name[:64],
            anatomic_regions=[coded.anatomic_region] if coded.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*coded.rgb),
        )
        if coded.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
                [
                    hd.sr.CodedConcept(
                        coded.type_modifier.value, coded.type_modifier.scheme_designator, coded.type_modifier.meaning
                    )
                ]
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
    tracking_uids: Mapping[int, str] | None = None,
    notes: list[str] | None = None,
) -> EncodedSegmentation:
    """Build the SEG for ``labels`` (``[slice, row, column]``, slices in ``source_images`` order).

    ``source_images`` are single-frame images, one per slice, or exactly one multi-frame
    image (Enhanced or Legacy Converted Enhanced CT) with one slice of ``labels`` per
    frame, in frame order: each SEG frame then references its source frame
    (DerivationImageSequence, ReferencedFrameNumber). The SEG's text is in UTF-8
    (``ISO_IR 192``): the sources' names are copied as decoded text. ``tracking_uids`` (label value ->
    Tracking UID, :func:`tracking_uids`) are the structures' UIDs in every result of the run; without them
    each segment gets a new one. A patient, study, frame of reference or equipment value of the sources that breaks
    its VR is not copied as it is (:func:`~dicom_node.encode.copied.checked_source`; the equipment describes the
    source's scanner in ContributingEquipmentSequence): each adds a sentence to ``notes``.
    LossyImageCompression is "01" when any source went through lossy compression
    (:func:`~dicom_node.encode.lossy.mark_lossy`), with the methods and ratios known.

    Raises
    ------
    ValueError
        If the label map does not match the source images, or no structure is present.
    """
    if source_frame_count(source_images) != labels.shape[0] or any(
        (int(ds.Rows), int(ds.Columns)) != labels.shape[1:] for ds in source_images
    ):
        raise ValueError(
            f"the label map's {labels.shape[0]} slices of {labels.shape[1]} x {labels.shape[2]} pixels do not match "
            f"the {source_frame_count(source_images)} source image frames"
        )
    values = label_values(labels)
    present = [int(v) for v in values if v != 0 and int(v) in classes]
    if not present:
        raise ValueError("the label map holds no structure: nothing to encode")
    segments = _segment_numbers(labels, present, int(values[-1]))
    source_images = checked_sources(source_images, notes)
    description = series_description or algorithm.series_description("Segmentation")
    dataset = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=segments,
        segmentation_type=segmentation_type,
        segment_descriptions=segment_descriptions(classes, present, algorithm, tracking_uids),
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
        specific_character_set=RESULT_CHARACTER_SET,
    )
    dataset.SeriesDescription = description[:64]
    mark_lossy(dataset, source_images)  # from every source: highdicom copies the first one's flag only
    write_unit_orientation(dataset)
    # Laterality (General Series, Type 2C) is needed when no Image Laterality says it: the segments
    # cover structures of both sides ("B") unless the source image states its own laterality.
    dataset.ImageLaterality = source_images[0].get("ImageLaterality") or "B"
    if segmentation_type == "LABELMAP":
        _drop_background_segment(dataset)
    return EncodedSegmentation(dataset, dict(enumerate(present, start=1)))


def write_unit_orientation(dataset: Dataset) -> None:
    """Each ImageOrientationPatient of the SEG's functional groups as unit direction cosines at right angles.

    highdicom copies the sources' values, which admission lets be slightly off (0.9995, rounded by a scanner);
    the SEG then fails validation. The volume and the RTSTRUCT's contours use the same directions
    (:func:`inference.volume.orthonormal_directions`), so every result places its voxels and contours alike."""
    groups = list(dataset.get("SharedFunctionalGroupsSequence") or [])
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and "PlaneOrientationSequence" in per_frame[0]:
        groups += list(per_frame)
    for group in groups:
        for plane in group.get("PlaneOrientationSequence") or []:
            if "ImageOrientationPatient" in plane:
                plane.ImageOrientationPatient = unit_orientation(plane.ImageOrientationPatient)


def unit_orientation(values: Sequence[float]) -> list[str]:
    """ImageOrientationPatient as unit row and column directions at right angles, each a decimal string of at
    most 16 characters (ten decimals: unit length to within 1e-9)."""
    row, column = orthonormal_directions([float(v) for v in values])
    texts = [f"{float(v):.10f}".rstrip("0").rstrip(".") for v in (*row, *column)]
    return ["0" if text == "-0" else text for text in texts]


def tracking_uids(classes: Mapping[int, str]) -> dict[int, str]:
    """A new Tracking UID per structure (label value; 0 is background), made once per run, so a structure is
    one finding in the BINARY and LABELMAP SEGs and in the SRs on them."""
    return {label: str(hd.UID()) for label in classes if label}


def _drop_background_segment(dataset: Dataset) -> None:
    """A label map's background is value 0, which Pixel Padding Value already says (Sup 243, final text).

    highdicom inserts a "Background" segment numbered 0; readers that expect segment numbers
    to count from one (3D Slicer via dcmqi before 1.5.5) shift every segment's metadata by one.
    """
    kept = [item for item in dataset.SegmentSequence if int(item.SegmentNumber) != 0]
    if len(kept) != len(dataset.SegmentSequence):
        dataset.SegmentSequence = DicomSequence(kept)


def source_frame_count(source_images: Sequence[Dataset]) -> int:
    """Frames of the sources: one per single-frame image, NumberOfFrames of one multi-frame image."""
    if len(source_images) == 1 and "NumberOfFrames" in source_images[0]:
        return int(source_images[0].NumberOfFrames)
    return len(source_images)


def label_values(labels: np.ndarray) -> np.ndarray:
    """The distinct values in ``labels``, sorted (``np.unique``'s values).

    uint8 and uint16 maps are counted slice by slice with ``np.bincount``: several times
    faster than sorting, without a full-volume int64 copy.
    """
    if labels.dtype not in SMALL_UNSIGNED or labels.ndim < 2:
        return np.unique(labels)
    counts = np.zeros(np.iinfo(labels.dtype).max + 1, dtype=np.int64)
    for plane in labels:
        counts += np.bincount(plane.ravel(), minlength=counts.size)
    return np.flatnonzero(counts)


def _segment_numbers(labels: np.ndarray, present: Sequence[int], largest: int) -> np.ndarray:
    """``labels`` with each present label value replaced by its segment number 1..N, others by 0.

    When that is the identity (all of 1..N present, dtype already the segments' dtype)
    ``labels`` itself is returned: highdicom does not modify it.
    """
    lookup = np.zeros(largest + 1, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, label in enumerate(present, start=1):
        lookup[label] = number
    if labels.dtype == lookup.dtype and np.array_equal(lookup, np.arange(lookup.size)):
        return labels
    return lookup[labels]


def write_segmentation(dataset: Dataset, path: str | os.PathLike[str] | BinaryIO) -> None:
    """Write a SEG, byte for byte as ``dataset.save_as(path)`` does, faster for many frames.

    The Per-frame Functional Groups Sequence is pre-encoded (``fast_write``); other
    transfer syntaxes than explicit VR little endian fall back to ``save_as``.
    """
    save_preencoded(dataset, path, PER_FRAME_FUNCTIONAL_GROUPS)


def warm_up() -> float:
    """Encode and write a 2-slice dummy SEG in memory; returns the seconds it took.

    highdicom loads the DICOM standard's tables (JSON) on first use, about 0.5 s; a
    worker calls this once at start-up so that no job pays it.
    """
    start = time.perf_counter()
    sources = _dummy_ct_series(2)
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[:, 1:3, 1:3] = 1
    algorithm = Algorithm("warm-up", "0", is_baseline=True)
    for kind in ("BINARY", "LABELMAP"):
        encoded = encode_segmentation(sources, labels, {1: "body"}, algorithm, segmentation_type=kind)
        write_segmentation(encoded.dataset, BytesIO())
    return time.perf_counter() - start


def _dummy_ct_series(slices: int) -> list[Dataset]:
    """Headers of a tiny axial CT series (4 x 4 pixels), enough for ``hd.seg.Segmentation``."""
    study, series, frame_of_reference = hd.UID(), hd.UID(), hd.UID()
    headers = []
    for index in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, hd.UID(), "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "WARMUP", "Warm^Up", "", "O"
        ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "1", "", "20260101", "000000"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, index + 1
        ds.Rows = ds.Columns = 4
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        headers.append(ds)
    return headers
