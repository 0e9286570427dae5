"""Admission: the header checks a complete series passes before it is queued for inference.

Routing decides *whether* a series should be processed; admission decides whether it
*can* be, from its instance headers alone (never the pixel data), so a series that
would give a wrong result or fail half-way is refused before it costs inference time.
A refusal is one sentence naming the attribute and the instance; an admission may
carry warnings (sentences) that go into ``jobs.warnings``.

Patient identifiers are never part of a reason: reasons are logged at INFO.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import DA, TM
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Series, Study
from db.names import completed_name, other_person
from dicom_node.config import AdmissionSettings, ModelSettings, Settings, TotalSegmentatorModelSettings
from dicom_node.encode.sources import character_set_read_as
from dicom_node.encode.values import person_name_problem, sequence_check
from dicom_node.logs import REORDERING_CHARACTERS, os_error_text, shown
from dicom_node.receive.header import (
    DEFAULT_REPERTOIRE,
    StudyPatient,
    comparable_identity,
    decode_strictly,
    strict_encodings,
    strictly_decoded_text,
)
from dicom_node.routing import CT_IMAGE_SOP_CLASSES, sop_class_name
from inference.volume import (
    ACQUISITION_TIME_KEYWORDS,
    RECONSTRUCTION_KEYWORDS,
    SPACING_DECIMALS,
    VOLUME_SOURCE_KEYWORDS,
    MissingSlices,
    SliceHeader,
    VolumeError,
    acquisition_seconds,
    check_obliquity,
    check_slice_stack,
    differing_orientations,
    one_image_set,
    one_stack_of_blocks,
    padding_problem,
    raw_text,
    reconstruction_values,
    repeats_positions,
    rescale_source,
    several_sources_problem,
    unusable_rescale,
)

IDENTITY_KEYWORDS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "AccessionNumber",
)
"""Attributes every instance of a series must share (the result is labelled with them, copied from one instance)."""
IDENTITY_SEQUENCES = ("IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence")
"""Sequences that say whose the PatientID is, or which other IDs the patient has: the results copy them from one
instance too, so every instance must carry the same items (in any order)."""
IDENTITY_SUBJECT = {"StudyInstanceUID": "study", "AccessionNumber": "study"}
"""What an identity attribute names, where it is not the patient."""
STUDY_DETAIL_KEYWORDS = (
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
"""Study attributes (General Study, Patient Study) the results copy from one instance too: where instances of one study disagree on them,
the job says so (a warning) rather than the results carrying one instance's value silently."""
STUDY_DETAIL_SUFFIX = "; the results carry the value of the first image by position"
STUDY_RECORD_KEYWORDS = {
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyID": "study_id",
    "AccessionNumber": "accession_number",
}
"""Study attributes the study's row keeps from the first instance received of it (keyword, ``studies`` column):
queries for the study answer these, while each series' results carry its own."""
STUDY_RECORD_SUFFIX = "; queries for the study answer that value, while these results carry this series' value"

ORTHONORMAL_TOLERANCE = 0.002
"""How far ImageOrientationPatient's two directions may be from unit length and from a right angle
(length 1 +/- 0.002, cosine of their angle within 0.002: about 0.1 degrees). Values written with three
decimals stay inside it. The SEG keeps the images' own directions while the volume and the RTSTRUCT's
contours use them made exactly perpendicular: at this tolerance the two differ by under a pixel (about 0.5 mm
at the edge of a 500 mm field), at 0.01 they differed by 4.5 mm."""
LONGEST_EXTENT_MM = 3000.0
"""The longest a CT volume may be along any axis (columns x PixelSpacing, rows x PixelSpacing, slices x
step): a head-to-toe scan of the tallest patient is about 2 m. Longer means a PixelSpacing or slice
position that is wrong."""
NARROWEST_FIELD_MM = 80.0
"""The narrowest a CT image may be across its rows or its columns (matrix x PixelSpacing): a temporal
bone or wrist reconstruction is about 80-100 mm wide, a body one 250-500 mm. Narrower means PixelSpacing
is wrong, most often written in centimetres (0.07 for 0.7 mm), which would make every volume in the
report 100 times too small. Judged on matrices of at least :data:`CLINICAL_MATRIX` pixels (a low-dose or
downsampled reconstruction may have 128); smaller images are test objects. At any size, a width far from the
image's own ReconstructionDiameter is refused (:data:`RECONSTRUCTION_DIAMETER_RATIO`)."""
CLINICAL_MATRIX = 128
RECONSTRUCTION_DIAMETER_RATIO = 2.0
"""How far the image's width (columns x PixelSpacing) may be from its ReconstructionDiameter, as a ratio either
way. A scanner writes the two alike (the diameter is the reconstructed field); a PixelSpacing in the wrong unit
or rescaled without its matrix is off by 10 times or more, while a field cropped or padded afterwards stays well
within 2 times."""


@dataclass(frozen=True)
class ModelFootprint:
    """What a model's memory grows with: the grid it resamples to (mm, ``None``: the series' own) and the classes
    it scores at every voxel of that grid (the largest part model's output heads, background included)."""

    spacing_mm: float | None
    classes: int


TASK_FOOTPRINTS = {"total": ModelFootprint(1.5, 27), "total_fast": ModelFootprint(3.0, 118)}
"""TotalSegmentator's tasks: ``total``'s five 1.5 mm part models score 19 to 27 classes each (one at a time),
``total_fast``'s one 3 mm model 118."""
THRESHOLD_FOOTPRINT = ModelFootprint(None, 0)
LARGEST_FOOTPRINT = ModelFootprint(1.5, 118)
"""Where the model is not known: the finest grid and the most classes of any task."""
BYTES_PER_CLASS_VOXEL = 2
"""nnU-Net's FP16 sum of the tiles' logits, per class and voxel of the model's grid (padded to one tile)."""
BYTES_PER_CLASS_TILE = 14 * 128**3
"""nnU-Net's working memory for one tile (a 128 x 128 x 128 patch), per class: the network's FP32 output, its
Gaussian-weighted copy and the FP32 sum of it into the FP16 logits, about 13.4 bytes per patch voxel and class.
Measured with the network's forward pass stubbed (its own layers' memory is not included):
``total_fast`` (118 classes) 167^3 grid 3.61 GB, 100 x 100 x 50 grid (padded to one tile) 2.64 GB; ``total``
(27 classes) 200^3 grid 1.12 GB: each within 2 bytes per class voxel plus this per class."""
TILE_EDGE_VOXELS = 128
"""A grid smaller than one tile is padded to it."""

HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Modality",
    "ImageType",
    "SpecificCharacterSet",
    *IDENTITY_KEYWORDS,
    *IDENTITY_SEQUENCES,
    *STUDY_DETAIL_KEYWORDS,
    *VOLUME_SOURCE_KEYWORDS,
    "PatientBirthTime",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelData",
    "AcquisitionNumber",
    *RECONSTRUCTION_KEYWORDS,  # what tells image sets apart (one_image_set)
    *ACQUISITION_TIME_KEYWORDS,
    "ModalityLUTSequence",  # refused where it stands in for RescaleSlope/RescaleIntercept
    "FloatPixelData",  # refused: CT pixels are integers
    "DoubleFloatPixelData",
)
HEADER_TAGS: list[int] = [Tag(keyword) for keyword in dict.fromkeys(HEADER_KEYWORDS)]
PIXEL_DATA_TAG = Tag("PixelData")
DEFER_BYTES = 1024
"""Values longer than this (the pixel data) are not read, only their length."""

ALLOWED_BITS_ALLOCATED = frozenset({8, 16, 32})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
ORIENTATION_DECIMALS = 3

BYTES_PER_SOURCE_VOXEL = 4 + 8
"""float32 HU volume (4) and the float64 copy the model input is built from (8), per source voxel."""
BYTES_PER_MODEL_VOXEL = 4 + 4 + 1 + 1
"""A resampled float32 copy and the model's float32 input (4 + 4), the label map and its resampled copy
(uint8, 1 + 1): per voxel of the larger of the source grid and the model's grid. The model's classes add
:func:`_class_bytes`."""
BYTES_PER_VOXEL_AFTER_SOURCE = BYTES_PER_SOURCE_VOXEL + BYTES_PER_MODEL_VOXEL
"""Memory per voxel of every processing stage after the stored pixels (bytes), for a series whose
model grid is no larger than its own. The stored pixels add BitsAllocated / 8."""

LARGEST_GROUP_SUFFIX = "images: the largest group with the same matrix and pixel spacing"
ASSUMED_RESCALE_PREFIX = "rescale attributes missing:"


def is_admission_warning(warning: str) -> bool:
    """A warning admission wrote: replaced when the series is admitted again."""
    return warning.startswith(ASSUMED_RESCALE_PREFIX) or warning.endswith(
        (LARGEST_GROUP_SUFFIX, STUDY_DETAIL_SUFFIX, STUDY_RECORD_SUFFIX)
    )


class Refused(Exception):
    """The series cannot be processed; the message is the reason (one sentence)."""


class StorageUnavailable(Exception):
    """A stored file cannot be opened or read now for a reason of this machine, not of its data (too many open
    files, an I/O error, a permission): the series is not refused, it is checked again later. The message says
    which file and why, in words."""


@dataclass(frozen=True)
class InstanceFile:
    """A stored instance of the series, as the database knows it."""

    path: Path
    sop_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    number_of_frames: int | None = None


@dataclass(frozen=True)
class RecordedStudy(StudyPatient):
    """A stored study as :func:`admit` compares a series with it: its patient, and the study details its row keeps
    (:data:`STUDY_RECORD_KEYWORDS`, keyword and value)."""

    details: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class AdmissionResult:
    """The decision: ``refusal`` is None when the series is admitted."""

    refusal: str | None
    warnings: list[str] = field(default_factory=list)
    images: int = 0
    estimated_bytes: int = 0

    @property
    def admitted(self) -> bool:
        return self.refusal is None


@dataclass
class _Frame:
    """The geometry and pixel module of one image (a single-frame instance or one frame)."""

    label: str
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]
    shape: tuple[int, int]
    bytes_per_pixel: int
    localizer: bool
    acquisition: str = ""
    thickness: float | None = None  # SliceThickness, where a positive number
    reconstruction: tuple[str | None, ...] = ()  # what tells its image set (inference.volume.reconstruction_values)
    instance: str = ""  # SOP Instance UID
    instance_number: str = ""
    acquired: float | None = None  # when, in seconds (inference.volume.acquisition_seconds)
    frame: int | None = None  # its number, in a multi-frame instance


def admit(
    files: Sequence[InstanceFile],
    settings: AdmissionSettings,
    modality: str | None = "CT",
    study_patient: StudyPatient | None = None,
    model: ModelFootprint = LARGEST_FOOTPRINT,
) -> AdmissionResult:
    """Check a complete series from its headers; refuse it with a reason, or admit it with warnings.

    Parameters
    ----------
    files
        The stored instances of the series.
    settings
        ``admission`` settings: limits and what to do with mixed series and missing rescale.
    modality
        The series' Modality; rescale is required for CT only.
    study_patient
        The patient recorded for the series' study (its first instance's, :func:`recorded_patient`), if any: a
        series of another patient under that study is refused; one whose study details differ from those recorded
        (a :class:`RecordedStudy`) is admitted with a warning.
    model
        The model the series is for (:func:`model_footprint`): its grid and classes size the memory estimate.

    Returns
    -------
    AdmissionResult
        ``refusal`` is a sentence naming the attribute and instance, or None; ``warnings``
        are sentences for ``jobs.warnings``.
    """
    try:
        return _admit(files, settings, modality, study_patient, model)
    except Refused as refusal:
        return AdmissionResult(refusal=str(refusal))


def recorded_patient(study: Study) -> RecordedStudy | None:
    """The patient a stored study belongs to and its recorded details, as :func:`admit` takes them; None while its
    identity is erased."""
    if study.patient_id is None:
        return None
    return RecordedStudy(
        study.patient_id,
        study.issuer_of_patient_id,
        study.patient_name,
        study.patient_birth_date,
        study.patient_sex,
        study.issuer_universal_entity_id,
        details=tuple((keyword, getattr(study, column)) for keyword, column in STUDY_RECORD_KEYWORDS.items()),
    )


def instance_files(session: Session, series: Series) -> list[InstanceFile]:
    """The stored instances of a series, as admission reads them, in instance order."""
    rows = session.execute(
        select(
            Instance.path,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Instance.instance_number,
            Instance.number_of_frames,
        )
        .where(Instance.series_id == series.id)
        .order_by(Instance.instance_number, Instance.id)
    ).all()
    return [
        InstanceFile(
            path=Path(row.path),
            sop_instance_uid=row.sop_instance_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            instance_number=row.instance_number,
            number_of_frames=row.number_of_frames,
        )
        for row in rows
    ]


def _admit(
    files: Sequence[InstanceFile],
    settings: AdmissionSettings,
    modality: str | None,
    study_patient: StudyPatient | None,
    model: ModelFootprint,
) -> AdmissionResult:
    if not files:
        raise Refused("the series has no stored instances")
    declared = sum(max(f.number_of_frames or 1, 1) for f in files)
    if declared > settings.max_instances:
        raise Refused(
            f"the series has {declared} images; at most {settings.max_instances} are processed "
            "(admission.max_instances)"
        )
    headers = [(label, _read(f, label), f) for label, f in zip(_labels(files), files, strict=True)]
    warnings: list[str] = []
    _check_identity(headers)
    _check_modality(headers, modality)
    _check_sop_classes(headers, modality)
    for label, header, _ in headers:
        _check_dates_and_times(label, header)
        _check_patient_sex(label, header)
    warnings.extend(_study_detail_warnings(headers))
    _check_study_patient(headers[0][1], study_patient, _series_name(headers))
    if isinstance(study_patient, RecordedStudy):
        warnings.extend(_study_record_warnings(headers, study_patient, warnings))
    _check_rescale_everywhere_or_nowhere(headers, modality)
    frames: list[_Frame] = []
    for label, header, file in headers:
        _check_pixel_module(label, header)
        warning = _check_rescale(label, header, modality, settings)
        _check_padding(label, header)
        if warning and warning not in warnings:
            warnings.append(warning)
        _check_pixel_data_length(label, header, file)
        frames.extend(_frames(label, header, file))
    images = [frame for frame in frames if not frame.localizer]
    if not images:
        raise Refused("the series holds only localizer images")
    _check_frame_of_reference([(label, header) for label, header, _ in headers if not _is_localizer(header)])
    _check_orientation(images)
    images = _consistent_matrix(images, settings, warnings)
    rows, columns = images[0].shape
    if max(rows, columns) > settings.max_matrix:
        raise Refused(
            f"images of {rows} x {columns} pixels are larger than a CT reconstruction matrix can be "
            f"({settings.max_matrix} x {settings.max_matrix}, admission.max_matrix)"
        )
    if len(images) < 2:
        raise Refused("the series has a single image; a volume needs at least two slices")
    localizers = [frame.label for frame in frames if frame.localizer]
    if len({frame.acquisition for frame in images}) == 1:
        images = _one_image_set(images)
        _check_one_multiframe_source(images)
        _check_slice_stack(images, localizers)
        _check_step_against_thickness(images)
    else:  # the volume assembler picks or joins acquisitions and checks its stack itself, but not the step
        if len({frame.acquisition for frame in images}) == len(images):  # each slice its own AcquisitionNumber
            _check_slice_stack(images, localizers)  # names the slices
        _check_step_of_each_acquisition(images)
    extent = _extent_mm(images)
    if max(extent) > LONGEST_EXTENT_MM:
        raise Refused(
            f"the volume would measure {extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm, longer than a CT "
            f"scan can be ({LONGEST_EXTENT_MM:.0f} mm along each axis at most); PixelSpacing or "
            "ImagePositionPatient is wrong"
        )
    if max(rows, columns) >= CLINICAL_MATRIX and min(extent[:2]) < NARROWEST_FIELD_MM:
        raise Refused(
            f"the images would be {extent[0]:.0f} x {extent[1]:.0f} mm across (PixelSpacing "
            f"{images[0].spacing[0]:g} x {images[0].spacing[1]:g} mm), narrower than the body regions the models "
            f"segment ({NARROWEST_FIELD_MM:.0f} mm at least): a small field (dental, inner ear) is not for this "
            "node; otherwise PixelSpacing is wrong, perhaps written in centimetres"
        )
    _check_field_against_reconstruction_diameter(images, extent)
    estimate = _memory_estimate(images, extent, model)
    limit = settings.max_memory_gigabytes * 1024**3
    if estimate > limit:
        rows, columns = images[0].shape
        raise Refused(
            f"processing {len(images)} images of {rows} x {columns} pixels needs about {_size(estimate)} "
            f"of memory, over the {_size(limit)} limit (admission.max_memory_gigabytes)"
        )
    return AdmissionResult(refusal=None, warnings=warnings, images=len(images), estimated_bytes=estimate)


def _check_study_patient(header: Dataset, study_patient: StudyPatient | None, series_name: str | None) -> None:
    """The series (whose instances agree on the patient) must be of its study's patient: the same PatientID, and
    the same issuer, name, birth date and sex where both carry one (:meth:`StudyPatient.differing_keyword`),
    each compared as the results would carry it (:func:`_identity_value`); the name as the whole series carries it
    (:func:`_series_name`), so no spelling of it names another person than the study's. AccessionNumber is left out:
    one study may carry several orders."""
    if study_patient is None or not study_patient.patient_id:
        return
    received = StudyPatient(
        _identity_value(header, "PatientID"),
        _identity_value(header, "IssuerOfPatientID"),
        series_name,
        _identity_value(header, "PatientBirthDate"),
        _identity_value(header, "PatientSex"),
        _universal_issuer(header),
    )
    differing = study_patient.differing_keyword(received)
    if differing is not None:
        raise Refused(
            f"the series' study already holds another patient's images (its {differing} differs from the "
            "study's); one study must hold one patient"
        )


def _universal_issuer(header: Dataset) -> str | None:
    """The UniversalEntityID of the first item of IssuerOfPatientIDQualifiersSequence (the issuer of the PatientID
    as an OID or URI), as the receiver records it; None where not sent."""
    items = header.get("IssuerOfPatientIDQualifiersSequence") or []
    if not items:
        return None
    return str(items[0].get("UniversalEntityID", "") or "").strip().strip("\x00") or None


def _size(count: float) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.1f} GB"
    return f"{count / 1024**2:.1f} MB"


def _label(file: InstanceFile, shared_number: bool = False) -> str:
    """How a reason names an instance: by its InstanceNumber, with its SOP Instance UID where other instances of the
    series carry the same number (``shared_number``), by its SOP Instance UID where it has none."""
    if file.instance_number is None:
        return f"instance {file.sop_instance_uid}"
    if shared_number:
        return f"instance {file.instance_number}{UID_SUFFIX.format(file.sop_instance_uid)}"
    return f"instance {file.instance_number}"


UID_SUFFIX = " (SOP Instance UID {})"
"""What :func:`_label` adds to an InstanceNumber that other instances share."""


def _without_uid(label: str, uid: str) -> str:
    """``label`` without the SOP Instance UID :func:`_label` added: the stack check names two copies itself."""
    return label.replace(UID_SUFFIX.format(uid), "")


def _labels(files: Sequence[InstanceFile]) -> list[str]:
    """:func:`_label` of each file: a series whose images all say InstanceNumber 1 names the one meant."""
    numbers = Counter(file.instance_number for file in files)
    return [_label(file, numbers[file.instance_number] > 1) for file in files]


def _read(file: InstanceFile, label: str) -> Dataset:
    try:
        return dcmread(file.path, defer_size=DEFER_BYTES, specific_tags=HEADER_TAGS)
    except FileNotFoundError:
        raise Refused(f"the file of {label} is missing from storage") from None
    except OSError as exc:  # the machine's trouble (no file handle left, a failing disk), not the sender's data
        raise StorageUnavailable(f"the stored file of {label} cannot be read now ({os_error_text(exc)})") from None
    except Exception:  # noqa: BLE001 - any unreadable file refuses the series, named
        raise Refused(f"the stored file of {label} cannot be read as DICOM") from None


# ---------------------------------------------------------------------------
# Reading values without trusting them
# ---------------------------------------------------------------------------


def _numbers(label: str, dataset: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """A decimal-string attribute as ``count`` finite numbers; None when absent."""
    text = raw_text(dataset, keyword)
    if text is None:
        return None
    parts = [part.strip() for part in text.split("\\")]
    if len(parts) != count:
        raise Refused(f"{keyword} of {label} has {len(parts)} value(s), not {count}")
    values = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise Refused(f"{keyword} of {label} is not a number ({shown(part, 20)})") from None
        if not math.isfinite(number):
            raise Refused(f"{keyword} of {label} is not a finite number ({shown(part, 20)})")
        values.append(number)
    return tuple(values)


def _unsigned(label: str, dataset: Dataset, keyword: str) -> int | None:
    """A US attribute (Rows, BitsAllocated...), or None when absent."""
    try:
        value = dataset.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed binary value
        raise Refused(f"{keyword} of {label} cannot be read") from None
    if value is None or value == "":
        return None
    if isinstance(value, (list, MultiValue)):
        raise Refused(f"{keyword} of {label} has several values")
    return int(value)


def _text(dataset: Dataset, keyword: str) -> str | None:
    try:
        value = dataset.get(keyword)
    except Exception:  # noqa: BLE001 - an undecodable value counts as its raw text
        return raw_text(dataset, keyword)
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text or None


def _is_localizer(dataset: Dataset) -> bool:
    image_type = raw_text(dataset, "ImageType") or ""
    return "LOCALIZER" in image_type.upper().split("\\")


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


def _check_identity(headers: list[tuple[str, Dataset, InstanceFile]]) -> None:
    """Patient and study identity must be the same in every instance (values never named), each one value of
    printable text; PatientID is required."""
    for label, header, _ in headers:
        for keyword in IDENTITY_KEYWORDS:
            problem = _identity_value_problem(header, keyword)
            if problem is not None:
                raise Refused(f"{keyword} of {label} {problem}; the sender must correct it")
        for keyword in IDENTITY_SEQUENCES:
            problem = _identity_sequence_problem(header, keyword)
            if problem is not None:
                raise Refused(f"{keyword} of {label}: {problem}; the results carry it, so the sender must correct it")
    missing = [label for label, header, _ in headers if not (raw_text(header, "PatientID") or "").strip(" \x00")]
    if missing:
        raise Refused(
            f"{len(missing)} of {len(headers)} instances have no PatientID (first: {missing[0]}); "
            "a result must name its patient"
        )
    for keyword in (*IDENTITY_KEYWORDS, *IDENTITY_SEQUENCES):
        disagreement = _name_disagreement(headers) if keyword == "PatientName" else _disagreement(headers, keyword)
        if disagreement is not None:
            differing, first = disagreement
            raise Refused(
                f"{keyword} differs within the series: {differing} of {len(headers)} instances "
                f"(first: {first}) carry another value than the rest; one series must hold one "
                f"{IDENTITY_SUBJECT.get(keyword, 'patient')}"
            )


def _check_modality(headers: list[tuple[str, Dataset, InstanceFile]], modality: str | None) -> None:
    """Every instance must carry the series' Modality (as routing decided it: CT where most instances are CT images,
    else the first instance's): a CT series holding an image labelled MR would be segmented with that image in the
    volume."""
    if modality is None:
        return
    expected = modality.strip(" \x00").upper()
    others = [
        (label, (raw_text(header, "Modality") or "").strip(" \x00").upper(), raw_text(header, "SOPClassUID"))
        for label, header, _ in headers
        if (raw_text(header, "Modality") or "").strip(" \x00").upper() != expected
    ]
    if others:
        label, given, sop_class = others[0]
        what = f"Modality {given or '(none)'}" + (f", {sop_class_name(sop_class)}" if sop_class else "")
        raise Refused(
            f"Modality differs within the series: {len(others)} of {len(headers)} instances (first: {label}, "
            f"{what}) are not {expected}, as the series is; one series holds images of one modality, so the sender "
            "must correct it"
        )


def _check_sop_classes(headers: list[tuple[str, Dataset, InstanceFile]], modality: str | None) -> None:
    """A CT series holds CT images alone: a dose screen (Secondary Capture), a report or a presentation state among
    them, whatever its Modality, is no slice of the volume, and the sender should keep it in a series of its own."""
    if (modality or "").strip(" \x00").upper() != "CT":
        return
    others = [
        (label, raw_text(header, "SOPClassUID") or "")
        for label, header, _ in headers
        if raw_text(header, "SOPClassUID") not in CT_IMAGE_SOP_CLASSES
    ]
    if others:
        kinds = ", ".join(sorted({sop_class_name(uid) if uid else "no SOP Class UID" for _, uid in others}))
        raise Refused(
            f"the series holds {len(others)} instance(s) that are not CT images ({kinds}; first: {others[0][0]}) "
            f"beside {len(headers) - len(others)} CT images; a CT series is processed only when it holds CT images "
            "alone, so the sender must send the other objects as a series of their own"
        )


DATES_AND_TIMES = {"StudyDate": DA, "PatientBirthDate": DA, "StudyTime": TM, "PatientBirthTime": TM}
"""Dates and times the results copy from a source image, each read as a DICOM date or time when encoded."""
DATE_FORMS = {DA: "a date in the DICOM form YYYYMMDD", TM: "a time in the DICOM form HHMMSS.FFFFFF"}


def _check_dates_and_times(label: str, header: Dataset) -> None:
    """Each date and time the results copy must be one valid DICOM value (or empty): one that is not would fail
    the results after inference. Values are never named (they identify the patient)."""
    for keyword, kind in DATES_AND_TIMES.items():
        text = raw_text(header, keyword)
        if text is None:
            continue
        try:
            kind(text)
        except (ValueError, TypeError, OverflowError):
            raise Refused(
                f"{keyword} of {label} is not {DATE_FORMS[kind]}; the results carry it, so the sender (or the RIS) "
                "must correct it"
            ) from None


PATIENT_SEX_VALUES = ("M", "F", "O")
"""PatientSex's defined terms (PS3.3 C.7.1.1): the results' Patient module takes no other value."""


def _check_patient_sex(label: str, header: Dataset) -> None:
    """PatientSex must be M, F, O or empty: the results copy it, and encoding them would fail on any other value
    after inference. The value is never named (it describes the patient)."""
    text = raw_text(header, "PatientSex")
    if text is not None and text.strip(" \0") not in ("", *PATIENT_SEX_VALUES):
        raise Refused(
            f"PatientSex of {label} is not M, F, O or empty; the results carry it, so the sender (or the RIS) must "
            "correct it"
        )


def _identity_value_problem(header: Dataset, keyword: str) -> str | None:
    """Why an identity value cannot label a result (a control character, bytes its character set does not decode,
    several values), or None.

    The results copy it as it is: ``P1\\P2`` would name no one patient, and a tab or line break is no part of
    an ID or a name (DICOM's text values allow only ESC, for character set switches). Bytes that do not decode
    would reach the results as replacement characters: another name than the one sent. Values are counted once
    decoded in the data set's character set: a backslash byte inside a JIS or GBK character (本, ぼ) is no
    value separator."""
    raw = raw_text(header, keyword)
    if raw is None:
        return None
    if any((ord(c) < 0x20 and c != "\x1b") or c == "\x7f" for c in raw):
        return "holds a control character (a tab, line break or similar), which no ID or name may hold"
    element = header.get_item(Tag(keyword), keep_deferred=True)
    if isinstance(element, RawDataElement):  # decoded apart: the header keeps the raw bytes the comparison reads
        decoded = strictly_decoded_text(header, element)
        if decoded is None:
            changed = "name" if keyword == "PatientName" else "value"
            return (
                f"does not decode in its SpecificCharacterSet {_declared_set(header, element)}, so the results "
                f"would carry a changed {changed}"
            )
        count = len(decoded.split("\\"))  # as pydicom splits a decoded text value into its values
    else:
        count = len(element.value) if isinstance(element.value, (list, MultiValue)) else 1
    if count > 1:
        subject = IDENTITY_SUBJECT.get(keyword, "patient")
        return f"has {count} values, where one {subject} has one"
    text = decoded if isinstance(element, RawDataElement) else str(element.value)
    if _reorders(keyword, text):
        return (
            "holds an invisible character that changes how the text reads (a right-to-left override, zero-width "
            "space or similar), so it could show as another patient's; no ID or name may hold one"
        )
    if keyword in PERSON_NAME_KEYWORDS:
        return person_name_problem(text)
    return None


def _reorders(keyword: str, text: str) -> bool:
    """Whether ``text`` holds a character that makes it read as other text: in the PatientID, any invisible
    formatting character (Unicode category Cf); elsewhere (a name, an issuer written in its own script, an
    accession number) one of :data:`~dicom_node.logs.REORDERING_CHARACTERS`, so that the joiners and marks some
    scripts are written with are kept."""
    if keyword == "PatientID":
        return any(unicodedata.category(c) == "Cf" for c in text)
    return any(c in REORDERING_CHARACTERS for c in text)


def _identity_sequence_problem(header: Dataset, keyword: str) -> str | None:
    """Why an identity sequence cannot label a result, naming the attribute and item (a value that breaks its VR,
    nested items included: :func:`~dicom_node.encode.values.sequence_check`), or None. The results copy it as it
    is, so validators and PACS would refuse them. Values are never named."""
    if keyword not in header:
        return None
    try:
        element = header[keyword]
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a sequence it cannot parse
        return "the sequence cannot be read"
    return sequence_check(element).first_problem if element.VR == "SQ" else None


PERSON_NAME_KEYWORDS = frozenset({"PatientName"})


def _study_detail_warnings(headers: list[tuple[str, Dataset, InstanceFile]]) -> list[str]:
    """One warning per study attribute the instances disagree on (values never named)."""
    found = []
    for keyword in STUDY_DETAIL_KEYWORDS:
        disagreement = _disagreement(headers, keyword)
        if disagreement is not None:
            found.append(
                f"{keyword} differs within the series: {disagreement[0]} of {len(headers)} instances carry another "
                f"value than the rest{STUDY_DETAIL_SUFFIX}"
            )
    return found


def _study_record_warnings(
    headers: list[tuple[str, Dataset, InstanceFile]], study: RecordedStudy, warned: list[str]
) -> list[str]:
    """One warning per study attribute the series carries another value of than its study's row (kept from
    another series, received first), where both carry one (values never named). An attribute that differs within
    the series is left to its warning there."""
    found = []
    for keyword, recorded in study.details:
        if any(warning.startswith(f"{keyword} differs within the series") for warning in warned):
            continue
        recorded = _as_compared(keyword, comparable_identity(keyword, recorded) or None)
        carried = _compared_value(headers[0][1], keyword)
        if recorded is not None and carried is not None and carried != recorded:
            found.append(
                f"{keyword} differs from the value the study holds from the series received first{STUDY_RECORD_SUFFIX}"
            )
    return found


def _disagreement(headers: list[tuple[str, Dataset, InstanceFile]], keyword: str) -> tuple[int, str] | None:
    """How many instances carry another value of ``keyword`` than most do, and the first of them; None if all agree."""
    return _minority([(label, _compared_value(header, keyword)) for label, header, _ in headers])


def _minority(values: list[tuple[str, str | None]]) -> tuple[int, str] | None:
    """How many of the (label, value) pairs carry another value than most do, and the first of them; None if all
    agree."""
    counted = Counter(value for _, value in values)
    if len(counted) < 2:
        return None
    common, _count = counted.most_common(1)[0]
    differing = sum(n for value, n in counted.items() if value != common)
    first = next(label for label, value in values if value != common)
    return differing, first


def _name_disagreement(headers: list[tuple[str, Dataset, InstanceFile]]) -> tuple[int, str] | None:
    """As :func:`_disagreement` for PatientName, where two spellings of one person's name agree (:mod:`db.names`:
    ``Müller^Jürgen`` and ``MÜLLER^JÜRGEN``, as a series completed by a PACS re-sending it in its own form carries):
    an instance disagrees where its name is another person's than :func:`_series_name`, or where it carries a name
    while others carry none (or none while others carry one)."""
    series_name = _series_name(headers)
    values = []
    for label, header, _ in headers:
        name = _identity_value(header, "PatientName")
        values.append((label, series_name if name and not other_person(series_name, name) else name))
    return _minority(values)


def _series_name(headers: list[tuple[str, Dataset, InstanceFile]]) -> str | None:
    """The patient's name the series carries, as admission compares it with its study's: the spelling most of its
    instances carry (the first one's where as many carry another), with each component group it lacks taken from the
    others' (:func:`~db.names.completed_name`); None where no instance carries one."""
    names = Counter(name for _, header, _ in headers if (name := _identity_value(header, "PatientName")))
    if not names:
        return None
    series_name: str | None = names.most_common(1)[0][0]
    for name in names:
        series_name = completed_name(series_name, name)
    return series_name


COMPARED_AS_VALUES: dict[str, type[DA] | type[TM]] = {"StudyDate": DA, "StudyTime": TM}
"""Study details compared as the date or time they mean, not as written: 101010 and 101010.000 are one time."""


def _compared_value(header: Dataset, keyword: str) -> str | None:
    """The value as the series' instances and its study are compared: :func:`_identity_value`, a study date or
    time as the DICOM value it means (:data:`COMPARED_AS_VALUES`)."""
    return _as_compared(keyword, _identity_value(header, keyword))


def _as_compared(keyword: str, text: str | None) -> str | None:
    """``text`` as :func:`_compared_value` compares it: a date or time in ISO form where it is one; else as written
    (admission refuses a study date or time that is not a valid one)."""
    kind = COMPARED_AS_VALUES.get(keyword)
    if kind is None or text is None:
        return text
    try:
        return kind(text).isoformat()
    except (ValueError, TypeError, OverflowError):
        return text


def _identity_value(header: Dataset, keyword: str) -> str | None:
    """The value as the results would carry it: text beyond printable ASCII decoded in the instance's own
    SpecificCharacterSet, so Müller written in Latin-1 and in UTF-8 is one name, and the same bytes under
    another character set are another. Bytes that do not decode cleanly (or switch character sets with ISO 2022
    escapes) are compared as written, with their character set: two broken names never pass for one."""
    if keyword in IDENTITY_SEQUENCES:
        return _sequence_value(header, keyword)
    raw = raw_text(header, keyword)
    if raw is not None:
        raw = comparable_identity(keyword, raw) or None  # DOE^JOHN^^^ is DOE^JOHN, as the receiver compares it
    if raw is None or all(" " <= c <= "~" for c in raw):
        return raw
    decoded = _strictly_decoded(header, keyword)
    if decoded is not None:
        return comparable_identity(keyword, decoded) or None
    return f"{raw_text(header, 'SpecificCharacterSet') or 'ISO_IR 6'}|{raw}"


def _sequence_value(header: Dataset, keyword: str) -> str | None:
    """A sequence's items as comparable text, in a fixed order; None when absent or empty. A sequence that cannot
    be parsed is compared as its bytes, never equal to a readable one."""
    try:
        items = header.get(keyword)
        if not items:
            return None
        return "\n".join(sorted(_item_text(item) for item in items))
    except Exception:  # noqa: BLE001 - unparsable: compared as written
        element = header.get_item(Tag(keyword), keep_deferred=True)
        value = element.value if element is not None else None
        return f"unreadable|{value.decode('latin-1') if isinstance(value, bytes) else ''}"


def _item_text(item: Dataset) -> str:
    """One sequence item's elements (nested items included) as text, in tag order."""
    parts = []
    for element in item:
        if element.VR == "SQ":
            value = "[" + ";".join(sorted(_item_text(nested) for nested in element.value)) + "]"
        else:
            value = comparable_identity(element.keyword, _value_text(element.value))
        parts.append(f"{int(element.tag):08X}={value}")
    return "|".join(parts)


def _value_text(value: Any) -> str:
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _strictly_decoded(header: Dataset, keyword: str) -> str | None:
    """The value decoded in its declared character set without replacing a byte; None where it cannot be."""
    element = header.get_item(Tag(keyword), keep_deferred=True)
    if element is None:
        return None
    if not isinstance(element, RawDataElement):  # already decoded by pydicom, which replaces what it cannot read
        decoded = str(element.value)
        return None if "\ufffd" in decoded else decoded
    text = strictly_decoded_text(header, element)
    return None if text is None else text.strip(" \x00")


def _declared_set(header: Dataset, element: RawDataElement) -> str:
    """SpecificCharacterSet as a refusal of ``element``'s text names it, saying that only plain ASCII reads where
    that is why: the text would decode as pydicom reads it (Latin-1 standing in for the default repertoire)."""
    declared = raw_text(header, "SpecificCharacterSet")
    encodings = strict_encodings(header)
    if DEFAULT_REPERTOIRE in encodings and isinstance(element.value, bytes):
        try:
            decode_strictly(element.value, [default_encoding if e == DEFAULT_REPERTOIRE else e for e in encodings])
        except (UnicodeError, ValueError, LookupError):
            pass  # it does not decode even so: another reason (an escape to a character set not declared)
        else:
            return _ascii_only(declared)
    return shown(declared) if declared else "(none given)"


def _ascii_only(declared: str | None) -> str:
    """SpecificCharacterSet as a refusal names it where only plain ASCII reads under it."""
    if not declared:
        return "(none given: plain ASCII only)"
    if character_set_read_as(declared.split("\\")[0].strip()) is None:
        return f"{shown(declared)} (not a character set DICOM defines: plain ASCII only)"
    if "\\" in declared:
        return f"{shown(declared)} (plain ASCII except where an escape sequence switches character set)"
    return f"{shown(declared)} (plain ASCII only)"


def _check_pixel_module(label: str, header: Dataset) -> None:
    for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            raise Refused(
                f"{label} holds floating-point pixels ({keyword}), which CT images do not use: the node reads integer "
                "Pixel Data with RescaleSlope and RescaleIntercept"
            )
    samples = _unsigned(label, header, "SamplesPerPixel")
    if samples is not None and samples != 1:
        raise Refused(f"SamplesPerPixel of {label} is {samples}; CT images have 1 (grayscale)")
    photometric = _text(header, "PhotometricInterpretation")
    if photometric is not None and photometric.upper() not in MONOCHROME:
        raise Refused(
            f"PhotometricInterpretation of {label} is {shown(photometric, 20)}; CT images are MONOCHROME1 or MONOCHROME2"
        )
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        value = _unsigned(label, header, keyword)
        if value is None:
            raise Refused(f"{label} has no {keyword}")
        if value == 0:
            raise Refused(f"{keyword} of {label} is 0")
    allocated = _unsigned(label, header, "BitsAllocated") or 0
    if allocated not in ALLOWED_BITS_ALLOCATED:
        raise Refused(f"BitsAllocated of {label} is {allocated}; only 8, 16 or 32 are processed")
    stored = _unsigned(label, header, "BitsStored")
    if stored is None:
        raise Refused(f"{label} has no BitsStored")
    if not 1 <= stored <= allocated:
        raise Refused(f"BitsStored of {label} is {stored}, not between 1 and BitsAllocated ({allocated})")
    high_bit = _unsigned(label, header, "HighBit")
    if high_bit is not None and high_bit != stored - 1:
        raise Refused(f"HighBit of {label} is {high_bit}; with BitsStored {stored} it must be {stored - 1}")
    representation = _unsigned(label, header, "PixelRepresentation")
    if representation is None:
        raise Refused(f"{label} has no PixelRepresentation, so whether its pixel values are signed cannot be told")
    if representation not in (0, 1):
        raise Refused(f"PixelRepresentation of {label} is {representation}; it must be 0 (unsigned) or 1 (signed)")


def _check_rescale(label: str, header: Dataset, modality: str | None, settings: AdmissionSettings) -> str | None:
    """Every frame's RescaleSlope and RescaleIntercept, from one place (as the volume reader takes them): both
    or neither, parseable, finite, slope non-zero; missing ones per ``missing_rescale``."""
    enhanced = bool(header.get("PerFrameFunctionalGroupsSequence"))
    frames = len(header.PerFrameFunctionalGroupsSequence) if enhanced else 1
    missing = False
    for number in range(1, frames + 1):
        source, where = rescale_source(header, number if enhanced else None)
        named = f"frame {number} of {label}" if enhanced else label
        slope = _numbers(named, source, "RescaleSlope", 1)
        intercept = _numbers(named, source, "RescaleIntercept", 1)
        if slope is not None and slope[0] == 0:
            raise Refused(f"RescaleSlope of {named} is 0: every pixel would have the same value")
        if (slope is None) != (intercept is None):
            present, absent = (
                ("RescaleSlope", "RescaleIntercept") if intercept is None else ("RescaleIntercept", "RescaleSlope")
            )
            raise Refused(f"{named} has {present} but no {absent} ({where}); its pixel values cannot be read as HU")
        missing = missing or slope is None
        if _is_localizer(header):
            continue  # a localizer is left out of the volume: its unit and scale do not matter
        _check_rescale_type(named, source, where)
        unusable = unusable_rescale(slope[0], intercept[0], header) if slope and intercept else None
        if unusable is not None:
            given, why = unusable
            raise Refused(f"{named} has {given} ({where}); {why}")
    if not missing or (modality or "").upper() != "CT":
        return None
    if "ModalityLUTSequence" in header:
        raise Refused(
            f"{label} gives its pixel values' meaning through a Modality LUT Sequence (0028,3000), which the node "
            "does not apply, and has no RescaleSlope/RescaleIntercept: its pixel values cannot be read as HU "
            "(whatever admission.missing_rescale says)"
        )
    if settings.missing_rescale == "refuse":
        raise Refused(
            f"{label} has no RescaleSlope/RescaleIntercept, so its pixel values cannot be read as HU "
            "(admission.missing_rescale: refuse)"
        )
    unusable = unusable_rescale(1.0, 0.0, header)
    if unusable is not None and not _is_localizer(header):
        raise Refused(
            f"{label} has no RescaleSlope, read as 1 (admission.missing_rescale: assume_identity); {unusable[1]}"
        )
    return (
        f"{ASSUMED_RESCALE_PREFIX} pixel values were read as HU with slope 1 and intercept 0 "
        "(admission.missing_rescale: assume_identity)"
    )


def _check_rescale_everywhere_or_nowhere(headers: Sequence[tuple[str, Dataset, Any]], modality: str | None) -> None:
    """Images of one CT series either all carry RescaleSlope/RescaleIntercept or none does: reading those without
    as slope 1, intercept 0 (``admission.missing_rescale: assume_identity``) while the others are rescaled would
    put two HU scales into one volume."""
    if (modality or "").upper() != "CT":
        return
    lacking: list[str] = []
    images = 0
    for label, header, _ in headers:
        if _is_localizer(header):
            continue
        enhanced = bool(header.get("PerFrameFunctionalGroupsSequence"))
        for number in range(1, (len(header.PerFrameFunctionalGroupsSequence) if enhanced else 1) + 1):
            source, _where = rescale_source(header, number if enhanced else None)
            images += 1
            if "RescaleSlope" not in source and "RescaleIntercept" not in source:
                lacking.append(f"frame {number} of {label}" if enhanced else label)
    if lacking and len(lacking) < images:
        raise Refused(
            f"{len(lacking)} of {images} images have no RescaleSlope/RescaleIntercept (first: {lacking[0]}) while "
            "the others have them: their pixel values cannot be read on the same HU scale"
        )


def _check_padding(label: str, header: Dataset) -> None:
    """PixelPaddingValue, where given, must be readable and must not read as tissue (:func:`padding_problem`)."""
    if _is_localizer(header) or "PixelPaddingValue" not in header:
        return
    source, _where = rescale_source(header, 1 if header.get("PerFrameFunctionalGroupsSequence") else None)
    slope = _numbers(label, source, "RescaleSlope", 1) or (1.0,)
    intercept = _numbers(label, source, "RescaleIntercept", 1) or (0.0,)
    try:
        problem = padding_problem(header, slope[0], intercept[0])
    except Exception:  # noqa: BLE001 - a value that does not decode at all
        problem = "its PixelPaddingValue cannot be read, so which pixels are padding cannot be told"
    if problem is not None:
        raise Refused(f"{label}: {problem}")


def _check_rescale_type(named: str, source: Dataset, where: str) -> None:
    """RescaleType, where given, must say HU: the models and the SR's mean HU read the rescaled values as HU."""
    try:
        value = source.get("RescaleType")
    except Exception:  # noqa: BLE001 - a value that does not decode is no unit
        raise Refused(f"RescaleType of {named} ({where}) cannot be read") from None
    text = str(value or "").strip()
    if text and text.upper() != "HU":
        raise Refused(
            f"RescaleType of {named} ({where}) is {shown(text, 20)}: its rescaled pixel values are not Hounsfield "
            "units, which the models and the reported mean HU need"
        )


def _check_pixel_data_length(label: str, header: Dataset, file: InstanceFile) -> None:
    """Native (uncompressed) pixel data must be as long as the header says."""
    element = header.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if element is None:
        raise Refused(f"{label} has no Pixel Data")
    if UID(file.transfer_syntax_uid).is_compressed:
        return
    length = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
    expected = _expected_pixel_bytes(label, header)
    if length == 0xFFFFFFFF or length < expected:
        shown = "undefined" if length == 0xFFFFFFFF else f"{length}"
        raise Refused(f"Pixel Data of {label} is truncated: {shown} of {expected} bytes")


def _expected_pixel_bytes(label: str, header: Dataset) -> int:
    rows = _unsigned(label, header, "Rows") or 0
    columns = _unsigned(label, header, "Columns") or 0
    samples = _unsigned(label, header, "SamplesPerPixel") or 1
    allocated = _unsigned(label, header, "BitsAllocated") or 0
    frames = _frame_count(label, header)
    return rows * columns * samples * frames * allocated // 8


def _frame_count(label: str, header: Dataset) -> int:
    text = raw_text(header, "NumberOfFrames")
    if text is None:
        return 1
    try:
        frames = int(text)
    except ValueError:
        raise Refused(f"NumberOfFrames of {label} is not a whole number ({shown(text, 20)})") from None
    if frames < 1:
        raise Refused(f"NumberOfFrames of {label} is {frames}")
    return frames


def _frames(label: str, header: Dataset, file: InstanceFile) -> list[_Frame]:
    """One :class:`_Frame` per image, each knowing its instance."""
    frames = _images(label, header)
    for frame in frames:
        frame.instance, frame.instance_number = file.sop_instance_uid, raw_text(header, "InstanceNumber") or ""
    return frames


def _images(label: str, header: Dataset) -> list[_Frame]:
    """One :class:`_Frame` per image, from the top level or the functional groups."""
    shape = (_unsigned(label, header, "Rows") or 0, _unsigned(label, header, "Columns") or 0)
    bytes_per_pixel = (_unsigned(label, header, "BitsAllocated") or 16) // 8
    localizer = _is_localizer(header)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        if _frame_count(label, header) > 1:
            raise Refused(
                f"{label} has {_frame_count(label, header)} frames (NumberOfFrames) but no Per-frame Functional "
                "Groups Sequence, so where each frame lies cannot be told"
            )
        if localizer:
            return [_Frame(label, (), (), (), shape, bytes_per_pixel, True)]
        acquisition = raw_text(header, "AcquisitionNumber") or ""
        plane = _plane(label, [header])
        thickness = _slice_thickness(header)
        return [
            _Frame(
                label,
                *plane,
                shape,
                bytes_per_pixel,
                False,
                acquisition,
                thickness,
                reconstruction_values(header),
                acquired=acquisition_seconds(header),
            )
        ]
    if len(per_frame) != _frame_count(label, header):
        raise Refused(
            f"{label} has {len(per_frame)} per-frame functional groups for {_frame_count(label, header)} frames"
        )
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    frames = []
    for number, group in enumerate(per_frame, start=1):
        _check_one_place(f"frame {number} of {label}", group, shared)
        sources = [
            _item(group, shared, "PlanePositionSequence"),
            _item(group, shared, "PlaneOrientationSequence"),
            _item(group, shared, "PixelMeasuresSequence"),
        ]
        frame_label = f"frame {number} of {label}"
        frames.append(
            _Frame(
                frame_label,
                *_plane(frame_label, [s for s in sources if s is not None]),
                shape,
                bytes_per_pixel,
                localizer,
                thickness=_slice_thickness(sources[2]) if sources[2] is not None else None,
                reconstruction=reconstruction_values(header, [group, shared]),
                acquired=acquisition_seconds(header, [group, shared]),
                frame=number,
            )
        )
    return frames


FUNCTIONAL_GROUPS_READ = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}
"""The functional groups the volume is built from, and the attributes it reads from each."""
SAME_NUMBER = 1e-4
"""Numbers this close (relative, or absolute near zero) are one value written to a different precision."""


def _check_one_place(frame_label: str, group: Dataset, shared: Dataset) -> None:
    """A functional group the volume reads must be either shared or per frame (PS3.3 C.7.6.16): in both, with
    different values of an attribute the volume reads, one of the two is wrong, and which one cannot be told.
    Values are compared as numbers (0.8 and 0.800 are one value); other attributes are not compared."""
    for sequence, keywords in FUNCTIONAL_GROUPS_READ.items():
        own, common = group.get(sequence), shared.get(sequence)
        if not own or not common:
            continue
        for keyword in keywords:
            if _differ(raw_text(own[0], keyword), raw_text(common[0], keyword)):
                raise Refused(
                    f"{frame_label} gives its {keyword} ({sequence}) both in its per-frame functional group and in "
                    "the shared one, with different values: DICOM allows one place, and which value is right "
                    "cannot be told"
                )


def _differ(first: str | None, second: str | None) -> bool:
    """Whether two decimal-string values, both given, are different numbers (or different text where not numbers)."""
    if first is None or second is None:
        return False
    a, b = first.split("\\"), second.split("\\")
    if len(a) != len(b):
        return True
    try:
        pairs = [(float(x), float(y)) for x, y in zip(a, b, strict=True)]
    except ValueError:
        return [x.strip() for x in a] != [y.strip() for y in b]
    return any(not math.isclose(x, y, rel_tol=SAME_NUMBER, abs_tol=SAME_NUMBER) for x, y in pairs)


def _item(group: Dataset, shared: Dataset, sequence: str) -> Dataset | None:
    for source in (group, shared):
        items = source.get(sequence)
        if items:
            return items[0]
    return None


def _plane(label: str, sources: list[Dataset]) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing), checked."""
    found: dict[str, tuple[float, ...]] = {}
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        for source in sources:
            values = _numbers(label, source, keyword, count)
            if values is not None:
                found[keyword] = values
                break
        else:
            raise Refused(f"{label} has no {keyword}")
    spacing = found["PixelSpacing"]
    if min(spacing) <= 0:
        raise Refused(f"PixelSpacing of {label} is not positive ({spacing[0]:g} x {spacing[1]:g} mm)")
    orientation = found["ImageOrientationPatient"]
    row, column = orientation[:3], orientation[3:]
    cross = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    if math.sqrt(sum(c * c for c in cross)) < 0.5:
        raise Refused(
            f"ImageOrientationPatient of {label} does not describe a plane (its two directions are degenerate)"
        )
    lengths = [math.sqrt(sum(c * c for c in direction)) for direction in (row, column)]
    if any(abs(length - 1) > ORTHONORMAL_TOLERANCE for length in lengths) or (
        abs(_dot(row, column)) > ORTHONORMAL_TOLERANCE
    ):
        raise Refused(
            f"ImageOrientationPatient of {label} is not two perpendicular unit directions (lengths "
            f"{lengths[0]:.3f} and {lengths[1]:.3f}, cosine of their angle {_dot(row, column):.3f}); "
            "positions and contours computed from it would be wrong"
        )
    return found["ImagePositionPatient"], orientation, spacing


def _check_frame_of_reference(headers: list[tuple[str, Dataset]]) -> None:
    values = Counter(raw_text(header, "FrameOfReferenceUID") for _, header in headers)
    missing = values.pop(None, 0)
    if missing:
        first = next(label for label, header in headers if raw_text(header, "FrameOfReferenceUID") is None)
        raise Refused(f"{missing} of {len(headers)} images have no FrameOfReferenceUID (first: {first})")
    if len(values) > 1:
        raise Refused(
            f"the series has {len(values)} different FrameOfReferenceUIDs; its images do not share one "
            "coordinate system, so they cannot make one volume"
        )


def _check_orientation(images: list[_Frame]) -> None:
    differing = differing_orientations([f.orientation for f in images])
    if differing:
        orientations = Counter(tuple(round(v, ORIENTATION_DECIMALS) for v in f.orientation) for f in images)
        raise Refused(
            f"the series has {max(len(orientations), 2)} different ImageOrientationPatient values "
            f"(first differing: {images[differing[0]].label}); one volume needs one orientation"
        )
    try:
        check_obliquity(images[0].orientation)  # the note, for a series a little oblique, is the assembler's
    except VolumeError as exc:
        raise Refused(str(exc)) from None


def _consistent_matrix(images: list[_Frame], settings: AdmissionSettings, warnings: list[str]) -> list[_Frame]:
    """Rows, Columns and PixelSpacing alike in every image; or, if allowed, the largest alike group."""
    groups: dict[tuple[Any, ...], list[_Frame]] = defaultdict(list)
    for frame in images:
        groups[(frame.shape, tuple(round(v, SPACING_DECIMALS) for v in frame.spacing))].append(frame)
    if len(groups) == 1:
        return images
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))  # never by arrival order
    described = "; ".join(
        f"{len(members)} of {shape[0]} x {shape[1]} at {spacing[0]:g} x {spacing[1]:g} mm"
        for (shape, spacing), members in ordered
    )
    if settings.mixed_series == "refuse":
        raise Refused(
            f"the series mixes matrix sizes or pixel spacings ({described}); refused (admission.mixed_series: refuse)"
        )
    if len(ordered[0][1]) == len(ordered[1][1]):
        raise Refused(
            f"the series mixes matrix sizes or pixel spacings ({described}) and the largest groups are the same "
            "size, so which one to process cannot be told; send each as its own series"
        )
    largest = ordered[0][1]
    warnings.append(f"processed {len(largest)} of {len(images)} {LARGEST_GROUP_SUFFIX}")
    return largest


def _check_slice_stack(images: list[_Frame], localizers: Sequence[str] = ()) -> None:
    """One acquisition's slices: no position twice, no gap, no drift, no shear; same wording as the assembler.

    A gap in a series from which ``localizers`` (their labels) were left out names them: one marked LOCALIZER by
    mistake leaves a gap though every image arrived."""
    normal = _normal(images[0].orientation)
    ordered = sorted(images, key=lambda f: _dot(f.position, normal))
    try:
        smallest_pixel = min((min(f.spacing) for f in ordered if f.spacing), default=None)
        positions = [f.position for f in ordered]
        labels, instances = [_without_uid(f.label, f.instance) for f in ordered], [f.instance for f in ordered]
        check_slice_stack(positions, normal, pixel_spacing=smallest_pixel, labels=labels, instances=instances)
    except MissingSlices as exc:
        if localizers:
            named = ", ".join(localizers[:3]) + (f" and {len(localizers) - 3} more" if len(localizers) > 3 else "")
            raise Refused(
                f"{exc}; {len(localizers)} image(s) with LOCALIZER in their ImageType were left out of the volume "
                f"({named}): an image marked so by mistake leaves such a gap though it arrived"
            ) from None
        raise Refused(str(exc)) from None
    except VolumeError as exc:
        raise Refused(str(exc)) from None


THICKER_THAN_STEPS = 8
"""How many slice steps one slice may be thick: overlapping reconstructions go to a step of half (rarely a
quarter) of SliceThickness; a step ten times finer than the slices are thick means ImagePositionPatient is in
centimetres, which would make every volume in the report ten times too small."""


SPARSER_THAN_THICK = 2.0
"""How many slices' thickness one step may span (10 % allowed over it): slices further apart leave more than half
of the scanned range unimaged (a sparse series, such as high-resolution lung CT at 1 mm every 10 mm), which the
models would fill by interpolation and the report would measure as tissue."""


def _one_image_set(images: list[_Frame]) -> list[_Frame]:
    """The images the volume keeps of several image sets in one series, or Refused where it would refuse them
    (:func:`inference.volume.one_image_set`, with the same words)."""
    headers = [
        SliceHeader(
            frame.label if frame.instance in frame.label else f"{frame.label} (SOP Instance UID {frame.instance})",
            frame.position,
            frame.reconstruction,
            frame.instance,
            frame.instance_number,
            frame.acquisition,
            frame.acquired,
        )
        for frame in images
    ]
    try:
        kept, _note = one_image_set(headers, _normal(images[0].orientation))  # the volume notes it on the job
    except VolumeError as exc:
        raise Refused(str(exc)) from None
    return [images[index] for index in kept]


def _check_one_multiframe_source(images: list[_Frame]) -> None:
    """Refused where the volume would be read from several instances, one of them multi-frame
    (:func:`inference.volume.several_sources_problem`): found here, before the model runs, not at the results."""
    problem = several_sources_problem({frame.instance for frame in images}, any(frame.frame for frame in images))
    if problem is not None:
        raise Refused(problem)


def _check_step_of_each_acquisition(images: list[_Frame]) -> None:
    """Several acquisitions: the step of each largest one (those the volume assembler keeps: the largest, or all
    of them where they continue one another) that holds two positions or more must fit its SliceThickness (a
    step-and-shoot scan's blocks, overlapping reconstructions); where none does (a scanner numbering every slice
    as its own acquisition), the step of all of them together. A smaller acquisition is left out of the volume
    with a warning, so its slabs refuse nothing. Each of those holds one image set, as the volume keeps it
    (:func:`_one_image_set`): all of them together where they continue one another, else each largest one."""
    groups: dict[str, list[_Frame]] = defaultdict(list)
    for frame in images:
        groups[frame.acquisition].append(frame)
    normal = _normal(images[0].orientation)
    chosen = {  # as the volume chooses: a stack before images at a few positions (bolus tracking)
        acquisition: members
        for acquisition, members in groups.items()
        if not repeats_positions([_dot(frame.position, normal) for frame in members])
    } or groups
    largest = max(len(members) for members in chosen.values())
    stacks = [members for members in chosen.values() if len(members) == largest and len(_depths(members)) >= 2]
    joined = one_stack_of_blocks(
        [frame.position for frame in images],
        [frame.acquisition for frame in images],
        _normal(images[0].orientation),
        pixel_spacing=min(min(frame.spacing) for frame in images),
    )
    if joined:  # the volume takes them all as one stack: one image set
        _one_image_set(images)
    for members in stacks:
        kept = members if joined else _one_image_set(members)
        _check_step_against_thickness(kept, f"AcquisitionNumber {members[0].acquisition or '(none)'}: ")
    if not stacks:
        _check_step_against_thickness(images)


def _depths(images: list[_Frame]) -> list[float]:
    """The images' distinct positions along the normal of the first one's plane, in order (to a micrometre)."""
    normal = _normal(images[0].orientation)
    return sorted({round(_dot(frame.position, normal), 3) for frame in images})


def _check_step_against_thickness(images: list[_Frame], which: str = "") -> None:
    """The distance between slices must fit their SliceThickness (:data:`THICKER_THAN_STEPS`,
    :data:`SPARSER_THAN_THICK`; the images' median). ``which`` starts the refusal (the acquisition it is about)."""
    given = sorted(frame.thickness for frame in images if frame.thickness is not None)
    thickness = given[len(given) // 2] if given else None
    depths = _depths(images)
    if thickness is None or len(depths) < 2:
        return
    step = (depths[-1] - depths[0]) / (len(depths) - 1)
    if step * THICKER_THAN_STEPS < thickness:
        raise Refused(
            f"{which}the slices are {step:.3g} mm apart (ImagePositionPatient) but {thickness:g} mm thick "
            "(SliceThickness): "
            f"a step more than {THICKER_THAN_STEPS} times finer than the slices means the positions are not in "
            "millimetres (perhaps centimetres), so every volume would be wrong, or the images are thick slabs (MIP "
            "or MPR), which the models do not segment"
        )
    if step > thickness * SPARSER_THAN_THICK * 1.1:
        raise Refused(
            f"{which}the slices are {step:.3g} mm apart (ImagePositionPatient) but only {thickness:g} mm thick "
            f"(SliceThickness): {1 - thickness / step:.0%} of the scanned range lies between slices and was never "
            "imaged (a sparse series, such as high-resolution lung CT), so the segmentation would be interpolated "
            "across the gaps and every volume in the report would count tissue nobody imaged; send a contiguous "
            "reconstruction"
        )


def _positive_number(text: str | None) -> float | None:
    """``text`` as a positive finite number; None where absent or not one."""
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _slice_thickness(source: Dataset) -> float | None:
    """SliceThickness of an image (or a Pixel Measures item), where it is a positive number (else it is not
    refused for that: the models do not use it)."""
    return _positive_number(raw_text(source, "SliceThickness"))


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _normal(orientation: Sequence[float]) -> tuple[float, float, float]:
    row, column = orientation[:3], orientation[3:]
    normal = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    length = math.sqrt(sum(c * c for c in normal))
    return (normal[0] / length, normal[1] / length, normal[2] / length)


def _reconstruction_diameter(frame: _Frame) -> float | None:
    """The frame's ReconstructionDiameter in mm, where a positive finite number; else None."""
    index = RECONSTRUCTION_KEYWORDS.index("ReconstructionDiameter")
    return _positive_number(frame.reconstruction[index] if len(frame.reconstruction) > index else None)


def _check_field_against_reconstruction_diameter(images: list[_Frame], extent: tuple[float, ...]) -> None:
    """Refuse a series whose images' width (columns x PixelSpacing) is :data:`RECONSTRUCTION_DIAMETER_RATIO` times
    or more away from the ReconstructionDiameter they give: one of the two is wrong, and a wrong PixelSpacing
    makes every reported volume wrong by its square or cube."""
    width = max(extent[:2])
    for frame in images:
        diameter = _reconstruction_diameter(frame)
        if diameter is None or 1 / RECONSTRUCTION_DIAMETER_RATIO < width / diameter < RECONSTRUCTION_DIAMETER_RATIO:
            continue
        rows, columns = frame.shape
        raise Refused(
            f"{frame.label} is {width:.0f} mm across ({rows} x {columns} pixels at PixelSpacing "
            f"{frame.spacing[0]:g} x {frame.spacing[1]:g} mm) "
            f"but its ReconstructionDiameter says the reconstructed field is {diameter:g} mm: one of the two is "
            "wrong (PixelSpacing perhaps in centimetres), and every volume the node reported would be wrong with "
            "it; the sender must correct the series"
        )


def _extent_mm(images: list[_Frame]) -> tuple[float, float, float]:
    """Across the columns, across the rows, and along the slices (one step added to the span of positions)."""
    rows, columns = images[0].shape
    row_spacing, column_spacing = images[0].spacing
    normal = _normal(images[0].orientation)
    depths = sorted({round(_dot(frame.position, normal), 3) for frame in images})
    span = depths[-1] - depths[0]
    step = span / (len(depths) - 1) if len(depths) > 1 else 0.0
    return (columns * column_spacing, rows * row_spacing, span + step)


def model_footprint(models: Mapping[str, ModelSettings], name: str | None) -> ModelFootprint:
    """The footprint of the model ``name``; where it is not one of ``models`` (None: a series no rule has chosen a
    model for yet), the finest grid and the most classes of the configured models."""
    chosen = [models[name]] if name is not None and name in models else list(models.values())
    footprints = [_footprint(settings) for settings in chosen] or [LARGEST_FOOTPRINT]
    spacings = [f.spacing_mm for f in footprints if f.spacing_mm is not None]
    return ModelFootprint(min(spacings, default=None), max(f.classes for f in footprints))


def models_over_memory(settings: Settings) -> list[str]:
    """A sentence per configured model whose class scores alone, for the smallest series, need more than
    ``admission.max_memory_gigabytes``: every series routed to it would be refused."""
    limit = settings.admission.max_memory_gigabytes * 1024**3
    sentences = []
    for name, model in settings.models.items():
        footprint = _footprint(model)
        least = _class_bytes((1, 1, 1), footprint)
        if least > limit:
            what = f"TotalSegmentator {model.task}" if isinstance(model, TotalSegmentatorModelSettings) else model.kind
            sentences.append(
                f"model {name!r} ({what}) needs about {_size(least)} of memory for the scores of its "
                f"{footprint.classes} classes even for the smallest series, more than admission.max_memory_gigabytes "
                f"({settings.admission.max_memory_gigabytes:g} GB): every series routed to it is refused. Set the "
                "limit to about half this machine's memory, or route to a model that needs less"
            )
    return sentences


def _footprint(settings: ModelSettings) -> ModelFootprint:
    if isinstance(settings, TotalSegmentatorModelSettings):
        return TASK_FOOTPRINTS[settings.task]
    return THRESHOLD_FOOTPRINT


def _memory_estimate(images: list[_Frame], extent: tuple[float, float, float], model: ModelFootprint) -> int:
    """Bytes for the stored pixels and every stage after them; a coarse series is counted on the model's grid."""
    rows, columns = images[0].shape
    voxels = len(images) * rows * columns
    grid = _model_grid(extent, model)
    return (
        voxels * (images[0].bytes_per_pixel + BYTES_PER_SOURCE_VOXEL)
        + max(voxels, math.prod(grid)) * BYTES_PER_MODEL_VOXEL
        + _class_bytes(grid, model)
    )


def _model_grid(extent: tuple[float, float, float], model: ModelFootprint) -> tuple[int, ...]:
    """The voxels along each axis of the model's grid (one, where the model keeps the series' grid)."""
    if model.spacing_mm is None:
        return (1, 1, 1)
    return tuple(max(math.ceil(length / model.spacing_mm), 1) for length in extent)


def _class_bytes(grid: tuple[int, ...], model: ModelFootprint) -> int:
    """nnU-Net's per-class memory: the logits over the whole grid (padded to a tile) and one tile's working copies."""
    padded = math.prod(max(count, TILE_EDGE_VOXELS) for count in grid)
    return model.classes * (padded * BYTES_PER_CLASS_VOXEL + BYTES_PER_CLASS_TILE)
