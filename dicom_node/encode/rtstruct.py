"""RT Structure Set from a label map, for planning systems that do not read DICOM-SEG.

One ROI per structure, CLOSED_PLANAR contours per slice (traced at the half-voxel
boundary with marching squares inside the structure's bounding box, simplified
within a quarter of a pixel by Douglas-Peucker run on all of a slice's contours at
once), every contour referencing its CT image (or, for a multi-frame source such as
Enhanced CT, its image and frame number). No voxel of the label map is left out: an
island or hole of one pixel (traced as a diamond of half a pixel's area) is written as
that pixel's square, so the RTSTRUCT holds what the SEG holds. Text is written in UTF-8
(``ISO_IR 192``).
Decimal strings are written at fixed precision, already encoded, so none exceeds the
16 characters DS allows and pydicom does not parse millions of them back; every Type 1
and 2 attribute of the RT Structure Set IOD is present.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from skimage import measure

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode.codes import display_label, structure_codes
from dicom_node.encode.copied import checked_source
from dicom_node.encode.seg import Algorithm
from dicom_node.encode.sources import RESULT_CHARACTER_SET
from dicom_node.receive.storage import IMPLEMENTATION_CLASS_UID
from inference.volume import SliceRef, Volume

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
CONTOUR_DATA = Tag(0x3006, 0x0050)
SIMPLIFY_TOLERANCE_PIXELS = 0.25
MAXIMUM_TOLERANCE_PIXELS = 4.0  # a structure over budget is simplified up to this, never dropped
BYTES_PER_POINT = 27  # three decimal strings ("-123.456") and their separators
BYTES_PER_CONTOUR = 170  # a contour item's own elements and its image reference (two UIDs), without points
MINIMUM_CONTOUR_POINTS = 3
MINIMUM_CONTOUR_AREA_PIXELS = 1.0  # a contour simplified below this is drawn finer, never left out
PIXEL_SQUARE = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5], [0.5, -0.5]])  # a pixel's outline, around its centre
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContourBudget:
    """How many contour points an RTSTRUCT may hold, per structure and in all.

    A structure over its budget is simplified with a larger tolerance (doubling from a
    quarter pixel up to :data:`MAXIMUM_TOLERANCE_PIXELS`), never dropped. Each
    structure may hold ``points_per_structure`` points and its even share of ``megabytes``,
    counted as :data:`BYTES_PER_POINT` a point and :data:`BYTES_PER_CONTOUR` a contour (a
    structure in many small islands costs mostly contours).
    """

    points_per_structure: int = 100_000
    megabytes: float = 40.0

    def per_structure(self, structures: int) -> int:
        """The points one of ``structures`` structures may hold (its share of the bytes, all as points)."""
        return max(min(self.points_per_structure, self.bytes_per_structure(structures) // BYTES_PER_POINT), 1)

    def bytes_per_structure(self, structures: int) -> int:
        """One structure's even share of ``megabytes``, in bytes."""
        return int(self.megabytes * 1_000_000 / max(structures, 1))

    def allows(self, contours: list[np.ndarray], structures: int) -> bool:
        """Whether ``contours`` fit one structure's budget, in points and in bytes."""
        points = sum(len(c) for c in contours)
        return points <= self.per_structure(structures) and encoded_bytes(contours) <= self.bytes_per_structure(
            structures
        )


def encoded_bytes(contours: list[np.ndarray]) -> int:
    """About how many bytes ``contours`` take in the RTSTRUCT (points and each contour's item)."""
    return sum(len(c) for c in contours) * BYTES_PER_POINT + len(contours) * BYTES_PER_CONTOUR


PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


PATIENT_OPTIONAL_KEYWORDS = (
    "IssuerOfPatientID",  # the PatientID alone may name another patient at another hospital
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
"""Patient and Patient Study attributes copied from the source where it has them."""


def encode_rtstruct(
    volume: Volume,
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    classes: dict[int, str],
    algorithm: Algorithm,
    *,
    series_number: int = 9703,
    series_description: str | None = None,
    budget: ContourBudget | None = None,
    notes: list[str] | None = None,
) -> Dataset:
    """An RT Structure Set for ``labels`` (``[slice, row, column]``, slices as ``volume.slices``).

    ``source_images`` give the patient, study and frame of reference (their first item);
    the contours reference the images and frames ``volume.slices`` name. Every structure present gets
    an ROI, with a contour around each of its islands and holes, down to a single voxel. Structures over
    ``budget`` are simplified further; each such structure adds a sentence to ``notes``, as does each patient, study
    or frame of reference value of the source that breaks its VR, which is not copied as it is
    (:func:`~dicom_node.encode.copied.checked_source`).
    """
    budget = budget or ContourBudget()
    first = checked_source(source_images[0], notes)
    now = datetime.now()
    dataset = _file_dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(dataset, keyword, first.get(keyword, ""))
    for keyword in PATIENT_OPTIONAL_KEYWORDS:  # as the SEG and SR carry them: the same identity in every result
        if first.get(keyword):
            dataset[keyword] = deepcopy(first[keyword])
    dataset.SpecificCharacterSet = RESULT_CHARACTER_SET
    dataset.FrameOfReferenceUID = first.FrameOfReferenceUID
    dataset.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    dataset.Modality = "RTSTRUCT"
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SeriesNumber = series_number
    dataset.SeriesDescription = (series_description or algorithm.series_description("Structures"))[:64]
    dataset.OperatorsName = ""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = "dicom-node"
    dataset.SoftwareVersions = __version__
    dataset.InstanceNumber = 1
    dataset.InstanceCreationDate = dataset.StructureSetDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = dataset.StructureSetTime = now.strftime("%H%M%S")
    dataset.StructureSetLabel = "AUTOSEG"
    dataset.StructureSetName = algorithm.name[:64]
    dataset.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_of_reference(first, volume.slices)])
    boxes = ndimage.find_objects(labels)  # one pass: each label's bounding box, or None when absent
    present = [label for label in sorted(classes) if 0 < label <= len(boxes) and boxes[label - 1] is not None]
    frame_of_reference = str(first.FrameOfReferenceUID)
    dataset.StructureSetROISequence = DicomSequence()
    dataset.ROIContourSequence = DicomSequence()
    dataset.RTROIObservationsSequence = DicomSequence()
    allowed = budget.per_structure(len(present))
    total_contours = total_points = total_bytes = 0
    simplified: list[str] = []
    for number, label in enumerate(present, start=1):
        name = classes[label]
        box = boxes[label - 1]
        item, tolerance, kept = _roi_contours(number, name, labels[box] == label, box, volume, budget, len(present))
        points, size = sum(len(c) for c in kept), encoded_bytes(kept)
        dataset.StructureSetROISequence.append(_roi(number, name, frame_of_reference, algorithm))
        dataset.ROIContourSequence.append(item)
        dataset.RTROIObservationsSequence.append(_observation(number))
        total_contours += len(item.ContourSequence)
        total_points += points
        total_bytes += size
        if tolerance > SIMPLIFY_TOLERANCE_PIXELS:  # said in the RTSTRUCT too: a planning system may read it alone
            dataset.StructureSetROISequence[-1].ROIDescription = simplified_description(tolerance)
            simplified.append(display_label(name))
            LOG.info(
                "rtstruct.simplified",
                extra={
                    "event_fields": {
                        "structure": name,
                        "tolerance_pixels": tolerance,
                        "points": points,
                        "contours": len(kept),
                        "budget": allowed,
                        "budget_bytes": budget.bytes_per_structure(len(present)),
                    }
                },
            )
            if notes is not None:
                share = _megabytes(budget.bytes_per_structure(len(present)))
                over = (
                    ""
                    if budget.allows(kept, len(present))
                    else f"; still over its budget of {allowed} points or {share} "
                    f"(fragmented: {len(kept)} contours, about {_megabytes(size)})"
                )
                notes.append(
                    f"RTSTRUCT: {display_label(name)} simplified to within {tolerance:g} pixel(s) "
                    f"({points} points) to fit the size budget{over}"
                )
    if simplified:
        dataset.StructureSetDescription = (
            f"{len(simplified)} structure(s) simplified to fit the size budget, their contours within a few pixels "
            f"of the segmentation (the SEG is exact): {', '.join(simplified)}"
        )[:1024]
    LOG.info(
        "rtstruct.encoded",
        extra={
            "event_fields": {
                "structures": len(present),
                "contours": total_contours,
                "points": total_points,
                "approximate_megabytes": round(total_bytes / 1e6, 1),
            }
        },
    )
    for roi in dataset.ROIContourSequence:
        for contour in roi.ContourSequence:
            # Already in the file's encoding: pydicom then writes the raw ContourData as is, unparsed.
            contour.set_original_encoding(False, True, contour._character_set)
    return dataset


def simplified_description(tolerance: float) -> str:
    """The ROIDescription of a structure simplified to within ``tolerance`` pixels (at most 64 characters)."""
    return f"simplified to within {tolerance:g} px to fit the size budget; SEG exact"[:64]


def _file_dataset() -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return dataset


def _frame_of_reference(first: Dataset, slices: Sequence[SliceRef]) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([_image_reference(ref) for ref in slices])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as RT requires
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    reference = Dataset()
    reference.FrameOfReferenceUID = first.FrameOfReferenceUID
    reference.RTReferencedStudySequence = DicomSequence([study])
    return reference


def _roi(number: int, name: str, frame_of_reference: str, algorithm: Algorithm) -> Dataset:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = frame_of_reference
    roi.ROIName = display_label(name)
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm.name} {algorithm.version}"[:64]
    return roi


def _observation(number: int) -> Dataset:
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    return observation


def _roi_contours(
    number: int,
    name: str,
    mask: np.ndarray,
    box: tuple[slice, ...],
    volume: Volume,
    budget: ContourBudget,
    structures: int,
) -> tuple[Dataset, float, list[np.ndarray]]:
    """Contours of ``mask``, the structure within its bounding ``box`` of the label map.

    Returns the ROI Contour item, the simplification tolerance used (pixels) and the
    contours kept: the tolerance doubles from a quarter pixel while they exceed one of
    ``structures`` structures' ``budget``, up to :data:`MAXIMUM_TOLERANCE_PIXELS`.
    """
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(structure_codes(name).rgb)
    item.ContourSequence = DicomSequence()
    offset = np.array([box[1].start, box[2].start], dtype=float)
    slices = [int(index) for index in np.flatnonzero(mask.any(axis=(1, 2)))]
    owners, traced = _trace([mask[index] for index in slices], slices)
    tolerance = SIMPLIFY_TOLERANCE_PIXELS
    finest = kept = _simplify(traced, tolerance)
    while not budget.allows(kept, structures) and tolerance < MAXIMUM_TOLERANCE_PIXELS:
        tolerance *= 2
        kept = _simplify(traced, tolerance, finest)
    for index, points in zip(owners, kept, strict=True):
        k = box[0].start + index
        rows_columns = points + offset
        # On the referenced image's own plane: from its ImagePositionPatient, along its rows and columns.
        in_plane = np.column_stack([rows_columns[:, 1], rows_columns[:, 0]]) * volume.spacing[:2]
        patient = volume.slice_origin(k) + in_plane @ volume.direction[:, :2].T
        item.ContourSequence.append(_contour(patient, volume.slices[k]))
    return item, tolerance, kept


def _image_reference(ref: SliceRef) -> Dataset:
    """A Contour Image Sequence item: the image, and its frame number for a multi-frame image."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = ref.sop_class_uid
    reference.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        reference.ReferencedFrameNumber = ref.frame_number
    return reference


def _contour(patient: np.ndarray, image: SliceRef) -> Dataset:
    """One CLOSED_PLANAR contour item (points in patient mm) on ``image`` (a slice of the volume)."""
    contour = Dataset()
    contour.ContourImageSequence = DicomSequence([_image_reference(image)])
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = len(patient)
    contour[CONTOUR_DATA] = _decimal_strings(CONTOUR_DATA, patient.ravel())
    return contour


def _decimal_strings(tag: BaseTag, values: np.ndarray) -> RawDataElement:
    """A DS element already encoded (explicit VR little endian), at 3 decimals: at most 16 characters each."""
    text = "\\".join(f"{value:.3f}" for value in values.tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(tag, "DS", len(text), text, 0, False, True)


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D mask as (row, column) points, without the repeated closing point."""
    return _simplify(_trace([mask], [0])[1], SIMPLIFY_TOLERANCE_PIXELS)


def _trace(masks: list[np.ndarray], keys: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Closed contours of each 2D mask at the half-pixel boundary, with the key of the mask each came from."""
    owners: list[int] = []
    traced: list[np.ndarray] = []
    for key, mask in zip(keys, masks, strict=True):
        for contour in measure.find_contours(np.pad(mask.astype(np.uint8), 1), 0.5):
            if len(contour) > MINIMUM_CONTOUR_POINTS:
                owners.append(key)
                traced.append(contour - 1.0)
    return owners, traced


def _simplify(traced: list[np.ndarray], tolerance: float, finer: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Douglas-Peucker within ``tolerance`` pixels: one contour for each traced one, none left out.

    A contour the tolerance reduces below a pixel's area is taken from ``finer`` (the same contours as this
    function gave at a smaller tolerance), or, without it, as traced (:func:`_as_traced`).
    """
    return [
        points if _drawable(points) else finer[index] if finer is not None else _as_traced(traced[index])
        for index, points in enumerate(simplify_closed(traced, tolerance))
    ]


def _drawable(points: np.ndarray) -> bool:
    return len(points) >= MINIMUM_CONTOUR_POINTS and _area(points) >= MINIMUM_CONTOUR_AREA_PIXELS


def _as_traced(traced: np.ndarray) -> np.ndarray:
    """A traced contour unsimplified (without its closing point); for an island or hole of one pixel, whose
    traced diamond covers half a pixel's area, that pixel's square."""
    points = traced[:-1]
    return points if _drawable(points) else np.round(points.mean(axis=0)) + PIXEL_SQUARE


def simplify_closed(contours: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker on closed contours (first point repeated last), all at once; closing point dropped.

    Each round splits every segment whose farthest interior point lies more than
    ``tolerance`` from the segment's line, for all segments of all contours in a
    few array operations; the rounds end when no segment needs a split.
    """
    if not contours:
        return []
    points = np.concatenate(contours)
    starts = np.cumsum([0] + [len(c) for c in contours[:-1]])
    ends = starts + np.array([len(c) for c in contours]) - 1
    keep = np.zeros(len(points), dtype=bool)
    keep[starts] = keep[ends] = True
    farthest = np.array(
        [s + int(np.argmax(np.hypot(*(c - c[0]).T))) for s, c in zip(starts, contours, strict=True)]
    )  # a closed contour's chord has no length: split it at the point farthest from its start first
    keep[farthest] = True
    first = np.concatenate([starts, farthest])
    last = np.concatenate([farthest, ends])
    while True:
        wide = last - first >= 2
        first, last = first[wide], last[wide]
        if len(first) == 0:
            break
        split, at = _farthest_interior(points, first, last, tolerance)
        keep[at[split]] = True
        first, last = np.concatenate([first[split], at[split]]), np.concatenate([at[split], last[split]])
    return [points[s:e][keep[s:e]] for s, e in zip(starts, ends, strict=True)]


def _farthest_interior(
    points: np.ndarray, first: np.ndarray, last: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment: whether its farthest interior point is beyond ``tolerance``, and that point's index."""
    counts = last - first - 1
    segment = np.repeat(np.arange(len(first)), counts)
    offsets = np.cumsum(counts) - counts
    interior = first[segment] + 1 + (np.arange(counts.sum()) - offsets[segment])
    a, b, p = points[first[segment]], points[last[segment]], points[interior]
    chord = b - a
    length = np.hypot(chord[:, 0], chord[:, 1])
    cross = np.abs(chord[:, 0] * (p - a)[:, 1] - chord[:, 1] * (p - a)[:, 0])
    distance = np.where(length > 0, cross / np.where(length > 0, length, 1.0), np.hypot(*(p - a).T))
    largest = np.maximum.reduceat(distance, offsets)
    candidates = np.flatnonzero(distance == largest[segment])
    _, first_of_segment = np.unique(segment[candidates], return_index=True)
    return largest > tolerance, interior[candidates[first_of_segment]]


def _area(points: np.ndarray) -> float:
    rows, columns = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(rows, np.roll(columns, 1)) - np.dot(columns, np.roll(rows, 1))))


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size < 10e6 else f"{size / 1e6:.0f} MB"
