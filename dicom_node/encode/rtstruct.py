"""RT Structure Set from a label map, for planning systems that do not read DICOM-SEG.

One ROI per structure, CLOSED_PLANAR contours per slice (traced at the half-voxel
boundary with marching squares, simplified within a quarter of a pixel), every
contour referencing its CT image. Decimal strings are written at fixed precision
so none exceeds the 16 characters DS allows, and every Type 1 and 2 attribute of
the RT Structure Set IOD is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage import measure

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode.codes import structure_codes
from dicom_node.encode.seg import Algorithm
from dicom_node.receive.storage import IMPLEMENTATION_CLASS_UID
from inference.volume import Volume

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SIMPLIFY_TOLERANCE_PIXELS = 0.25
MINIMUM_CONTOUR_POINTS = 3
MINIMUM_CONTOUR_AREA_PIXELS = 1.0  # speckle below one pixel is not a structure a planner can use
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


def encode_rtstruct(
    volume: Volume,
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    classes: dict[int, str],
    algorithm: Algorithm,
    *,
    series_number: int = 9703,
    series_description: str | None = None,
) -> Dataset:
    """An RT Structure Set for ``labels`` (``[slice, row, column]``, slices as ``volume.slices``)."""
    first = source_images[0]
    now = datetime.now()
    dataset = _file_dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(dataset, keyword, first.get(keyword, ""))
    dataset.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    dataset.FrameOfReferenceUID = first.FrameOfReferenceUID
    dataset.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    dataset.Modality = "RTSTRUCT"
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SeriesNumber = series_number
    baseline = " (baseline)" if algorithm.is_baseline else ""
    dataset.SeriesDescription = (series_description or f"Structures {algorithm.name}{baseline}")[:64]
    dataset.OperatorsName = ""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = "dicom-node"
    dataset.SoftwareVersions = __version__
    dataset.InstanceNumber = 1
    dataset.InstanceCreationDate = dataset.StructureSetDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = dataset.StructureSetTime = now.strftime("%H%M%S")
    dataset.StructureSetLabel = "AUTOSEG"
    dataset.StructureSetName = algorithm.name[:64]
    dataset.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_of_reference(first, source_images)])
    present = [int(v) for v in np.unique(labels) if v != 0 and int(v) in classes]
    frame_of_reference = str(first.FrameOfReferenceUID)
    dataset.StructureSetROISequence = DicomSequence()
    dataset.ROIContourSequence = DicomSequence()
    dataset.RTROIObservationsSequence = DicomSequence()
    for number, label in enumerate(present, start=1):
        name = classes[label]
        dataset.StructureSetROISequence.append(_roi(number, name, frame_of_reference, algorithm))
        dataset.ROIContourSequence.append(_roi_contours(number, name, labels == label, volume, source_images))
        dataset.RTROIObservationsSequence.append(_observation(number))
    return dataset


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


def _frame_of_reference(first: Dataset, source_images: Sequence[Dataset]) -> Dataset:
    images = DicomSequence()
    for image in source_images:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = images
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
    roi.ROIName = name[:64]
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


def _roi_contours(number: int, name: str, mask: np.ndarray, volume: Volume, source_images: Sequence[Dataset]) -> Dataset:
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(structure_codes(name).rgb)
    item.ContourSequence = DicomSequence()
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        for points in slice_contours(mask[k]):
            indices = np.column_stack([points[:, 1], points[:, 0], np.full(len(points), k)])
            patient = volume.origin + (indices * volume.spacing) @ volume.direction.T
            contour = Dataset()
            image = Dataset()
            image.ReferencedSOPClassUID = source_images[k].SOPClassUID
            image.ReferencedSOPInstanceUID = source_images[k].SOPInstanceUID
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(patient)
            contour.ContourData = [f"{value:.3f}" for value in patient.ravel()]
            item.ContourSequence.append(contour)
    return item


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D mask as (row, column) points, without the repeated closing point."""
    padded = np.pad(mask.astype(np.uint8), 1)
    contours = []
    for contour in measure.find_contours(padded, 0.5):
        simplified = measure.approximate_polygon(contour, SIMPLIFY_TOLERANCE_PIXELS)[:-1] - 1.0
        if len(simplified) >= MINIMUM_CONTOUR_POINTS and _area(simplified) >= MINIMUM_CONTOUR_AREA_PIXELS:
            contours.append(simplified)
    return contours


def _area(points: np.ndarray) -> float:
    rows, columns = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(rows, np.roll(columns, 1)) - np.dot(columns, np.roll(rows, 1))))
