"""Synthetic CT phantom: DICOM series writer with known ground truth.

The phantom is a simple torso defined in physical patient coordinates
(DICOM LPS, millimetres; +x = patient left, +y = posterior, +z = superior),
centred on the isocentre ``(0, 0, 0)``. Voxels are sampled at their exact
physical positions, so the same anatomy appears at any resolution, slice
order, orientation or gantry tilt, and the returned label volume is the
ground truth for every file written.

Anatomy (z extent about -70..+68 mm, so it fits a 150 mm stack centred on 0):
elliptical body 320 x 220 mm with a 12 mm subcutaneous fat rim, two lungs in
the upper part, liver on the patient's right (-x), spleen on the left (+x),
a kidney either side of the spine, the aorta anterior-left of the spine and a
cylindrical spine posteriorly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import reduce
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "PHANTOM_HU",
    "PHANTOM_LABELS",
    "PhantomSeries",
    "PhantomSpec",
    "phantom_volume",
    "write_phantom_series",
]

PHANTOM_LABELS: dict[str, int] = {
    "body": 1,
    "lung_left": 2,
    "lung_right": 3,
    "liver": 4,
    "spleen": 5,
    "kidney_left": 6,
    "kidney_right": 7,
    "aorta": 8,
    "spine": 9,
}

#: Mean HU per structure. Besides every key of PHANTOM_LABELS ("body" is the
#: soft tissue inside the fat rim) it has "air" (outside the body) and "fat"
#: (the subcutaneous rim, labelled "body").
PHANTOM_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "body": 10.0,
    "lung_left": -850.0,
    "lung_right": -850.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_left": 35.0,
    "kidney_right": 35.0,
    "aorta": 45.0,
    "spine": 700.0,
}

# T1-weighted-like signal for the MR variant (arbitrary positive units).
_MR_SIGNAL: dict[str, float] = {
    "air": 0.0,
    "fat": 1100.0,
    "body": 450.0,
    "lung_left": 40.0,
    "lung_right": 40.0,
    "liver": 600.0,
    "spleen": 420.0,
    "kidney_left": 480.0,
    "kidney_right": 480.0,
    "aorta": 120.0,
    "spine": 380.0,
}

_AIR, _FAT = 0, len(PHANTOM_LABELS) + 1  # internal tissue codes (labels use 1..N)
_CT_RESCALE_INTERCEPT = -1024  # stored value = HU + 1024
_CT_RANGE = (-1024, 3071)
_MR_RANGE = (0, 4095)
_MANUFACTURER = "dicom-node phantom"

_TRANSFER_SYNTAXES: dict[str | None, UID] = {
    None: ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
_ENCODED = {RLELossless, JPEG2000Lossless, JPEGLSLossless}


# --------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomSpec:
    """What to write; every field has a realistic default.

    Parameters
    ----------
    rows, columns, slices
        Matrix size and number of slices in the full stack (before ``gaps``).
    pixel_spacing
        ``(row spacing, column spacing)`` in mm, as DICOM PixelSpacing.
    slice_spacing
        Distance in mm between consecutive slice positions. With gantry tilt
        this is the table increment along the untilted normal (see below).
    slice_thickness
        SliceThickness in mm; defaults to ``slice_spacing``.
    origin
        ImagePositionPatient (LPS mm) of the first voxel of the first slice.
        ``None`` (default) centres the stack on the isocentre, i.e. on the body.
    orientation
        Untilted ImageOrientationPatient (row direction, column direction).
    slice_direction_sign
        +1: slices advance along ``row x col`` (feet to head for axial);
        -1: against it (head to feet, as many scanners write).
    noise_sd, seed
        Gaussian noise standard deviation and random seed.
    compression
        None (explicit VR LE), "implicit", "deflate", "rle", "jpeg2000" or
        "jpegls" (all lossless).
    modality
        "CT" or "MR" (MR Image Storage, positive signal, no HU semantics).
    gaps
        Indices into the full stack that are not written (missing slices).
    gantry_tilt_degrees
        Gantry tilt: both orientation vectors are rotated about the patient x
        axis while slice positions still advance along the untilted normal, so
        the stack is sheared (the usual tilted-CT situation).
    add_localizer
        Also write one coronal LOCALIZER image into the same series.
    enhanced
        Write one Enhanced CT multi-frame instance instead of single frames
        (CT only).
    legacy_converted
        With ``enhanced``: write the instance as Legacy Converted Enhanced CT
        (what a PACS makes of a single-frame series), referencing the
        single-frame images it stands for.
    images_in_acquisition
        Write ImagesInAcquisition on single-frame CT images (False: none, as
        many scanners send them; only the quiet period then completes the series).
    patient_id, patient_name, character_set
        PatientID, PatientName and the SpecificCharacterSet written (values
        separated by backslashes, e.g. ``\\ISO 2022 IR 87`` for Japanese
        kanji; pydicom encodes the name with it).
    """

    rows: int = 512
    columns: int = 512
    slices: int = 100
    pixel_spacing: tuple[float, float] = (0.8, 0.8)
    slice_spacing: float = 1.5
    slice_thickness: float | None = None
    origin: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    slice_direction_sign: int = 1
    noise_sd: float = 10.0
    seed: int = 0
    compression: str | None = None
    modality: str = "CT"
    gaps: tuple[int, ...] = ()
    gantry_tilt_degrees: float = 0.0
    add_localizer: bool = False
    enhanced: bool = False
    legacy_converted: bool = False
    images_in_acquisition: bool = True
    patient_id: str = "PHANTOM-1"
    patient_name: str = "Phantom^Synthetic"
    character_set: str = "ISO_IR 100"
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    series_description: str = "Synthetic CT phantom"
    series_number: int = 1
    body_part_examined: str = "CHESTABDOMEN"

    def __post_init__(self) -> None:
        if min(self.rows, self.columns, self.slices) < 1:
            raise ValueError("rows, columns and slices must be positive")
        if min(self.pixel_spacing) <= 0 or self.slice_spacing <= 0:
            raise ValueError("spacings must be positive")
        if self.compression not in _TRANSFER_SYNTAXES:
            raise ValueError(f"unknown compression {self.compression!r}")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', not {self.modality!r}")
        if self.slice_direction_sign not in (1, -1):
            raise ValueError("slice_direction_sign must be +1 or -1")
        if len(self.orientation) != 6:
            raise ValueError("orientation needs six values")
        if any(not 0 <= g < self.slices for g in self.gaps):
            raise ValueError("gap indices must lie within the stack")
        if len(set(self.gaps)) >= self.slices:
            raise ValueError("gaps would leave no slice to write")
        if self.enhanced and self.modality != "CT":
            raise ValueError("enhanced output is only supported for CT")
        if self.legacy_converted and not self.enhanced:
            raise ValueError("legacy_converted needs enhanced (it is a kind of multi-frame instance)")
        _orientation(self)  # validates the orientation vectors

    @property
    def thickness(self) -> float:
        """SliceThickness actually written (mm)."""
        return self.slice_spacing if self.slice_thickness is None else self.slice_thickness


@dataclass
class PhantomSeries:
    """What :func:`write_phantom_series` wrote.

    Attributes
    ----------
    files
        Every file written: the slice files (or the one Enhanced CT file) in
        stack order, then the localizer if any.
    hu
        int16 ``(slices, rows, columns)`` of the *full* stack, gap slices
        included; HU for CT, the stored signal for MR.
    labels
        uint8, same shape, values from PHANTOM_LABELS (0 = background).
    slice_positions
        ImagePositionPatient of every slice of the full stack.
    slice_indices
        Full-stack indices that were written (frame order for Enhanced CT).
    orientation
        ImageOrientationPatient written (tilt applied).
    sop_instance_uids
        SOPInstanceUID of each entry of ``files``.
    localizer_file
        The localizer file, or None.
    """

    files: list[Path]
    hu: np.ndarray
    labels: np.ndarray
    slice_positions: list[tuple[float, float, float]]
    spec: PhantomSpec
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slice_indices: list[int] = field(default_factory=list)
    orientation: tuple[float, ...] = ()
    sop_instance_uids: list[str] = field(default_factory=list)
    localizer_file: Path | None = None

    @property
    def present(self) -> np.ndarray:
        """Boolean mask over the full stack: True where a slice was written."""
        mask = np.zeros(self.hu.shape[0], dtype=bool)
        mask[self.slice_indices] = True
        return mask


# --------------------------------------------------------------------------
# Anatomy and rendering
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """Axis-aligned ellipsoid (``inf`` z radius: elliptic cylinder)."""

    tissue: int
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    z_limits: tuple[float, float] = (-math.inf, math.inf)


_INF = math.inf
_L = PHANTOM_LABELS
# Drawn in order; later blobs overwrite earlier ones.
_ANATOMY: tuple[_Blob, ...] = (
    _Blob(_FAT, (0.0, 0.0, 0.0), (160.0, 110.0, _INF)),
    _Blob(_L["body"], (0.0, 0.0, 0.0), (148.0, 98.0, _INF)),
    _Blob(_L["liver"], (-60.0, -10.0, -20.0), (75.0, 60.0, 40.0)),
    _Blob(_L["spleen"], (85.0, 35.0, -10.0), (30.0, 45.0, 35.0)),
    _Blob(_L["kidney_right"], (-60.0, 55.0, -40.0), (25.0, 30.0, 30.0)),
    _Blob(_L["kidney_left"], (60.0, 55.0, -40.0), (25.0, 30.0, 30.0)),
    _Blob(_L["lung_right"], (-70.0, -5.0, 32.0), (50.0, 70.0, 36.0)),
    _Blob(_L["lung_left"], (70.0, -5.0, 32.0), (50.0, 70.0, 36.0)),
    _Blob(_L["aorta"], (18.0, 35.0, 0.0), (11.0, 11.0, _INF), (-65.0, _INF)),
    _Blob(_L["spine"], (0.0, 72.0, 0.0), (17.0, 17.0, _INF)),
)


def _tissue_lut(values: dict[str, float]) -> np.ndarray:
    """float32 lookup table from internal tissue code to intensity."""
    lut = np.empty(_FAT + 1, dtype=np.float32)
    lut[_AIR], lut[_FAT] = values["air"], values["fat"]
    for name, label in PHANTOM_LABELS.items():
        lut[label] = values[name]
    return lut


_LABEL_LUT = np.arange(_FAT + 1, dtype=np.uint8)
_LABEL_LUT[_FAT] = PHANTOM_LABELS["body"]


@dataclass(frozen=True)
class _Plane:
    """Sampling grid of one image: top-left position, unit vectors, spacing."""

    position: np.ndarray  # (3,) mm
    row_dir: np.ndarray  # (3,) direction of increasing column index
    col_dir: np.ndarray  # (3,) direction of increasing row index
    spacing: tuple[float, float]  # (row spacing, column spacing)
    shape: tuple[int, int]  # (rows, columns)

    def axis(self, a: int, offset: float, scale: float) -> np.ndarray:
        """``(coordinate a - offset) / scale`` over the grid, kept 1-D when it can."""
        r_step = self.spacing[0] * self.col_dir[a] / scale
        c_step = self.spacing[1] * self.row_dir[a] / scale
        start = (self.position[a] - offset) / scale
        r = np.arange(self.shape[0], dtype=np.float32)
        c = np.arange(self.shape[1], dtype=np.float32)
        if r_step == 0:
            return (start + c * c_step)[None, :].astype(np.float32)
        if c_step == 0:
            return (start + r * r_step)[:, None].astype(np.float32)
        return (start + r[:, None] * r_step + c[None, :] * c_step).astype(np.float32)

    def bounds(self, a: int) -> tuple[float, float]:
        """Min and max of coordinate ``a`` over the image (corners of the grid)."""
        ext_r = (self.shape[0] - 1) * self.spacing[0] * self.col_dir[a]
        ext_c = (self.shape[1] - 1) * self.spacing[1] * self.row_dir[a]
        p = self.position[a]
        corners = (p, p + ext_r, p + ext_c, p + ext_r + ext_c)
        return min(corners), max(corners)


def _blob_reaches(blob: _Blob, plane: _Plane) -> bool:
    """Cheap bounding-box test: can the blob intersect this image at all?"""
    for a in range(3):
        lo, hi = plane.bounds(a)
        b_lo, b_hi = blob.centre[a] - blob.radii[a], blob.centre[a] + blob.radii[a]
        if a == 2:
            b_lo, b_hi = max(b_lo, blob.z_limits[0]), min(b_hi, blob.z_limits[1])
        if hi < b_lo or lo > b_hi:
            return False
    return True


def _blob_mask(blob: _Blob, plane: _Plane) -> np.ndarray:
    """Boolean mask (broadcastable to the image) of pixels inside the blob."""
    terms = [np.square(plane.axis(a, blob.centre[a], blob.radii[a])) for a in range(3) if math.isfinite(blob.radii[a])]
    terms.sort(key=np.size)  # add the small (1-D) terms first
    mask = reduce(np.add, terms) <= 1.0
    lo, hi = blob.z_limits
    if math.isfinite(lo) or math.isfinite(hi):
        z = plane.axis(2, 0.0, 1.0)
        mask = mask & (z >= lo) & (z <= hi)
    return mask


def _render_tissue(plane: _Plane) -> np.ndarray:
    """uint8 internal tissue codes of one image."""
    tissue = np.full(plane.shape, _AIR, dtype=np.uint8)
    for blob in _ANATOMY:
        if _blob_reaches(blob, plane):
            mask = np.broadcast_to(_blob_mask(blob, plane), plane.shape)
            tissue[mask] = blob.tissue
    return tissue


def _render_image(
    plane: _Plane,
    lut: np.ndarray,
    value_range: tuple[int, int],
    rng: np.random.Generator,
    noise_sd: float,
) -> tuple[np.ndarray, np.ndarray]:
    """int16 intensities (with noise, clipped) and uint8 labels of one image."""
    tissue = _render_tissue(plane)
    values = lut[tissue]
    if noise_sd > 0:
        values += rng.standard_normal(plane.shape, dtype=np.float32) * np.float32(noise_sd)
    np.rint(values, out=values)
    np.clip(values, *value_range, out=values)
    return values.astype(np.int16), _LABEL_LUT[tissue]


def _render_stack(
    planes: Sequence[_Plane],
    lut: np.ndarray,
    value_range: tuple[int, int],
    seed: int,
    noise_sd: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Render every plane; noise drawn slice by slice from one seeded stream."""
    rows, cols = planes[0].shape
    values = np.empty((len(planes), rows, cols), dtype=np.int16)
    labels = np.empty((len(planes), rows, cols), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for k, plane in enumerate(planes):
        values[k], labels[k] = _render_image(plane, lut, value_range, rng, noise_sd)
    return values, labels


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def _q(value: float) -> float:
    """Quantise to what is written into DS attributes (6 decimals)."""
    v = round(float(value), 6)
    return 0.0 if v == 0 else v


def _ds(value: float) -> str:
    """Decimal String (at most 16 characters) for a quantised value."""
    text = f"{_q(value):.6f}".rstrip("0").rstrip(".")
    if len(text) > 16:
        raise ValueError(f"value {value} does not fit a DICOM DS")
    return text


def _unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length."""
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise ValueError("orientation vectors must be non-zero")
    return v / norm


def _orientation(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tilted (row_dir, col_dir) as written, and the untilted stack normal."""
    row = _unit(np.asarray(spec.orientation[:3], dtype=float))
    col = _unit(np.asarray(spec.orientation[3:], dtype=float))
    if abs(float(row @ col)) > 1e-4:
        raise ValueError("orientation row and column directions must be orthogonal")
    normal = np.cross(row, col)
    t = math.radians(spec.gantry_tilt_degrees)
    rot_x = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    row_t, col_t = (np.array([_q(x) for x in rot_x @ v]) for v in (row, col))
    return row_t, col_t, normal


def _slice_positions(
    spec: PhantomSpec, row: np.ndarray, col: np.ndarray, normal: np.ndarray
) -> list[tuple[float, float, float]]:
    """ImagePositionPatient of every slice of the full stack (quantised)."""
    step = spec.slice_direction_sign * spec.slice_spacing * normal
    if spec.origin is None:
        half = (
            (spec.columns - 1) / 2 * spec.pixel_spacing[1] * row
            + (spec.rows - 1) / 2 * spec.pixel_spacing[0] * col
            + (spec.slices - 1) / 2 * step
        )
        origin = -half
    else:
        origin = np.asarray(spec.origin, dtype=float)
    return [(_q(x), _q(y), _q(z)) for x, y, z in (origin + k * step for k in range(spec.slices))]


def _plane(position: Sequence[float], row: np.ndarray, col: np.ndarray, spec: PhantomSpec) -> _Plane:
    """Sampling grid of one image with the spec's matrix and pixel spacing."""
    return _Plane(np.asarray(position, dtype=float), row, col, spec.pixel_spacing, (spec.rows, spec.columns))


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    seed: int = 0,
    noise_sd: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the phantom on an axial grid centred on the body.

    Parameters
    ----------
    shape
        ``(slices, rows, columns)``.
    spacing
        ``(slice, row, column)`` spacing in mm.
    seed, noise_sd
        Noise seed and Gaussian standard deviation in HU.

    Returns
    -------
    hu, labels
        int16 HU and uint8 labels, ``(slice, row, column)``. Slice index grows
        towards the head (+z), row index posterior (+y), column index towards
        the patient's left (+x); the grid centre is at ``(0, 0, 0)``. This is
        exactly what ``write_phantom_series`` writes for a default-geometry
        spec with the same size, spacing, seed and noise.
    """
    spec = PhantomSpec(
        rows=shape[1],
        columns=shape[2],
        slices=shape[0],
        pixel_spacing=(spacing[1], spacing[2]),
        slice_spacing=spacing[0],
    )
    row, col, normal = _orientation(spec)
    planes = [_plane(p, row, col, spec) for p in _slice_positions(spec, row, col, normal)]
    return _render_stack(planes, _tissue_lut(PHANTOM_HU), _CT_RANGE, seed, noise_sd)


# --------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """Series-wide values shared by every instance."""

    spec: PhantomSpec
    study_uid: str
    series_uid: str
    for_uid: str
    date: str
    time: str
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray

    @property
    def transfer_syntax(self) -> UID:
        return _TRANSFER_SYNTAXES[self.spec.compression]

    @property
    def iop(self) -> list[str]:
        return [_ds(v) for v in (*self.row, *self.col)]


def _make_context(spec: PhantomSpec) -> _Context:
    now = datetime.now()
    row, col, normal = _orientation(spec)
    return _Context(
        spec=spec,
        study_uid=spec.study_instance_uid or generate_uid(),
        series_uid=spec.series_instance_uid or generate_uid(),
        for_uid=generate_uid(),
        date=now.strftime("%Y%m%d"),
        time=now.strftime("%H%M%S"),
        row=row,
        col=col,
        normal=normal,
    )


def check_name_encodable(name: str, character_set: str) -> None:
    """Raise ValueError where ``character_set`` is none DICOM defines, or ``name`` cannot be written in it (pydicom
    would put '?' in its place). `dicom-node phantom` checks; a :class:`PhantomSpec` may hold such a pair on purpose
    (a test of what a node does with it)."""
    import warnings

    from pydicom.charset import convert_encodings, encode_string

    terms = character_set.split("\\")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns, and replaces, where a character has no encoding
        try:
            encodings = convert_encodings(terms)
        except (UserWarning, LookupError, ValueError):
            raise ValueError(
                f"--character-set {character_set!r} is not a Specific Character Set DICOM defines (for example "
                "ISO_IR 100, ISO_IR 192, or \\ISO 2022 IR 87)"
            ) from None
        try:
            encode_string(name, encodings)
        except (UserWarning, LookupError, ValueError):
            raise ValueError(
                f"the patient name {name!r} cannot be written in the character set {character_set!r}: give a "
                "--character-set that has its characters (ISO_IR 192 has them all)"
            ) from None


def _check_encoder(transfer_syntax: UID) -> None:
    """Raise RuntimeError naming the missing package(s) if we cannot encode."""
    encoder = get_encoder(transfer_syntax)
    if not encoder.is_available:
        missing = "; ".join(encoder.missing_dependencies) or "an encoder plugin"
        raise RuntimeError(f"cannot write {transfer_syntax.name}: missing {missing}")


def _base_dataset(ctx: _Context, sop_class: UID, instance: int) -> Dataset:
    """Patient, study, series, frame of reference, equipment and SOP common."""
    spec, sop_uid = ctx.spec, generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ctx.transfer_syntax
    character_sets = spec.character_set.split("\\")
    ds.SpecificCharacterSet = character_sets if len(character_sets) > 1 else character_sets[0]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = ctx.date, ctx.time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ctx.date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ctx.time
    ds.AccessionNumber = "A" + hashlib.sha1(ctx.study_uid.encode()).hexdigest()[:10].upper()
    ds.Modality = spec.modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "Synthetic Phantom Lab"
    ds.StationName = "PHANTOM01"
    ds.ManufacturerModelName = "Synthetic Phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic phantom study"
    ds.SeriesDescription = spec.series_description
    ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.BodyPartExamined = spec.body_part_examined
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ctx.study_uid, ctx.series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", spec.series_number, instance
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ctx.for_uid, ""
    return ds


def _set_pixel_module(ds: Dataset, shape: tuple[int, int], modality: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = 16
    if modality == "CT":  # stored = HU + 1024 in 0..4095, signed 16-bit container
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0


def _stored(values: np.ndarray, modality: str) -> np.ndarray:
    """Stored pixel values for HU (CT) or signal (MR) values."""
    if modality == "CT":
        return (values.astype(np.int32) - _CT_RESCALE_INTERCEPT).astype(np.int16)
    return values.astype(np.uint16)


def _set_ct_acquisition(ds: Dataset, spec: PhantomSpec) -> None:
    ds.KVP = "120"
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(spec.columns * spec.pixel_spacing[1])
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = "1085.6", "595"
    ds.GantryDetectorTilt = _ds(spec.gantry_tilt_degrees)
    ds.TableHeight, ds.RotationDirection = "160", "CW"
    ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 500, 200, 100
    ds.FilterType, ds.GeneratorPower, ds.FocalSpots = "BODY FILTER", 24, "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(_CT_RESCALE_INTERCEPT), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"


def _set_mr_acquisition(ds: Dataset, spec: PhantomSpec) -> None:
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "se2d1"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", 1
    ds.NumberOfAverages, ds.EchoNumbers = "1", 1
    ds.ImagingFrequency, ds.ImagedNucleus = "63.87", "1H"
    ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = _ds(spec.slice_spacing)
    ds.FlipAngle, ds.PixelBandwidth = "90", "130"
    ds.ReceiveCoilName = ds.TransmitCoilName = "BODY"
    ds.AngioFlag = "N"
    ds.WindowCenter, ds.WindowWidth = "600", "1200"


def _set_acquisition(ds: Dataset, spec: PhantomSpec) -> None:
    (_set_ct_acquisition if spec.modality == "CT" else _set_mr_acquisition)(ds, spec)


def _set_image_plane(ds: Dataset, ctx: _Context, position: Sequence[float] | np.ndarray, iop: list[str]) -> None:
    spec = ctx.spec
    ds.PixelSpacing = [_ds(v) for v in spec.pixel_spacing]
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceThickness = _ds(spec.thickness)


def _save(ds: Dataset, stored: np.ndarray, path: Path) -> Path:
    """Attach pixel data (compressing if asked) and write a DICOM file."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in _ENCODED:
        ds.compress(syntax, stored, generate_instance_uid=False)
    else:
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_slice(
    ctx: _Context,
    out_dir: Path,
    index: int,
    position: Sequence[float],
    values: np.ndarray,
    images: int,
) -> tuple[Path, str]:
    """One single-frame CT/MR Image Storage file for full-stack slice ``index``."""
    spec = ctx.spec
    is_ct = spec.modality == "CT"
    ds = _base_dataset(ctx, CTImageStorage if is_ct else MRImageStorage, instance=index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + (["AXIAL"] if is_ct else ["M", "ND"])
    ds.AcquisitionNumber = 1
    if is_ct and spec.images_in_acquisition:
        ds.ImagesInAcquisition = images
    _set_image_plane(ds, ctx, position, ctx.iop)
    ds.SliceLocation = _ds(float(np.dot(position, ctx.normal)))
    _set_pixel_module(ds, values.shape, spec.modality)
    _set_acquisition(ds, spec)
    path = out_dir / f"{spec.modality}_{index + 1:04d}.dcm"
    return _save(ds, _stored(values, spec.modality), path), ds.SOPInstanceUID


def _item(**attributes: object) -> Dataset:
    """Sequence item with the given keyword attributes."""
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _enhanced_shared_groups(ctx: _Context) -> Dataset:
    spec = ctx.spec
    frame_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    return _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=[_ds(v) for v in spec.pixel_spacing],
                SliceThickness=_ds(spec.thickness),
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=ctx.iop)],
        PixelValueTransformationSequence=[
            _item(RescaleIntercept=str(_CT_RESCALE_INTERCEPT), RescaleSlope="1", RescaleType="HU")
        ],
        FrameVOILUTSequence=[_item(WindowCenter="40", WindowWidth="400")],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=frame_type,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        CTAcquisitionTypeSequence=[_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")],
        CTAcquisitionDetailsSequence=[
            _item(
                DataCollectionDiameter=500,
                GantryDetectorTilt=float(_q(spec.gantry_tilt_degrees)),
                TableHeight=160,
                RotationDirection="CW",
                SingleCollimationWidth=0.625,
                TotalCollimationWidth=40.0,
            )
        ],
        CTXRayDetailsSequence=[_item(KVP=120, FocalSpots=[1.2], FilterType="BODY FILTER", FilterMaterial=["ALUMINUM"])],
        CTTableDynamicsSequence=[_item(TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0)],
        CTGeometrySequence=[_item(DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0)],
        CTReconstructionSequence=[
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel=["STANDARD"],
                ConvolutionKernelGroup="SOFT_TISSUE",
                ReconstructionDiameter=float(_q(spec.columns * spec.pixel_spacing[1])),
                ReconstructionPixelSpacing=[float(v) for v in spec.pixel_spacing],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ],
        CTExposureSequence=[
            _item(ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0, ExposureInmAs=100.0, ExposureModulationType="NONE")
        ],
        CTPositionSequence=[
            _item(
                TablePosition=0.0,
                ReconstructionTargetCenterPatient=[0.0, 0.0, 0.0],
                DataCollectionCenterPatient=[0.0, 0.0, 0.0],
            )
        ],
        FrameAnatomySequence=[
            _item(
                AnatomicRegionSequence=[
                    _item(CodeValue="416775004", CodingSchemeDesignator="SCT", CodeMeaning="Chest, Abdomen and Pelvis")
                ],
                FrameLaterality="U",
            )
        ],
        IrradiationEventIdentificationSequence=[
            _item(IrradiationEventUID=generate_uid(entropy_srcs=[ctx.series_uid, "irradiation"]))
        ],
    )


def _enhanced_frame_group(ctx: _Context, frame: int, position: Sequence[float]) -> Dataset:
    stamp = ctx.date + ctx.time
    content = _item(
        FrameAcquisitionNumber=1,
        FrameReferenceDateTime=stamp,
        FrameAcquisitionDateTime=stamp,
        FrameAcquisitionDuration=500.0,
        StackID="1",
        InStackPositionNumber=frame + 1,
        DimensionIndexValues=[1, frame + 1],
    )
    plane = _item(ImagePositionPatient=[_ds(v) for v in position])
    return _item(FrameContentSequence=[content], PlanePositionSequence=[plane])


def _set_dimensions(ds: Dataset) -> None:
    """Dimension organisation: (StackID, InStackPositionNumber) of FrameContent."""
    uid = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=uid,
            DimensionIndexPointer=tag,
            FunctionalGroupPointer=0x00209111,  # FrameContentSequence
        )
        for tag in (0x00209056, 0x00209057)  # StackID, InStackPositionNumber
    ]


def _write_enhanced(
    ctx: _Context, out_dir: Path, positions: Sequence[Sequence[float]], values: np.ndarray
) -> tuple[Path, str]:
    """One Enhanced CT (or Legacy Converted Enhanced CT) Image Storage instance holding ``values`` as frames."""
    if ctx.spec.legacy_converted:
        ds = _base_dataset(ctx, LegacyConvertedEnhancedCTImageStorage, instance=1)
    else:
        ds = _base_dataset(ctx, EnhancedCTImageStorage, instance=1)
        ds.ContentQualification = "PRODUCT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation, ds.VolumetricProperties = "MONOCHROME", "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = ctx.date + ctx.time
    ds.AcquisitionDuration = 500.0 * len(positions) / 1000.0
    ds.AcquisitionContextSequence = DicomSequence()
    ds.BurnedInAnnotation = ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = len(positions)
    _set_dimensions(ds)
    if ctx.spec.legacy_converted:
        converted_from = [generate_uid() for _ in positions]
        ds.SharedFunctionalGroupsSequence = [_legacy_shared_groups(ctx)]
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(
            [_legacy_frame_group(ctx, i, p, converted_from[i]) for i, p in enumerate(positions)]
        )
    else:
        ds.SharedFunctionalGroupsSequence = [_enhanced_shared_groups(ctx)]
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(
            [_enhanced_frame_group(ctx, i, p) for i, p in enumerate(positions)]
        )
    _set_pixel_module(ds, values.shape[1:], "CT")
    path = out_dir / ("CT_LEGACY_CONVERTED.dcm" if ctx.spec.legacy_converted else "CT_ENHANCED.dcm")
    return _save(ds, _stored(values, "CT"), path), ds.SOPInstanceUID


def _legacy_shared_groups(ctx: _Context) -> Dataset:
    """Shared groups of Legacy Converted Enhanced CT: geometry, rescale, window, and the CT attributes as converted."""
    spec = ctx.spec
    return _item(
        PixelMeasuresSequence=[
            _item(PixelSpacing=[_ds(v) for v in spec.pixel_spacing], SliceThickness=_ds(spec.thickness))
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=ctx.iop)],
        PixelValueTransformationSequence=[
            _item(RescaleIntercept=str(_CT_RESCALE_INTERCEPT), RescaleSlope="1", RescaleType="HU")
        ],
        FrameVOILUTSequence=[_item(WindowCenter="40", WindowWidth="400")],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        UnassignedSharedConvertedAttributesSequence=[
            _item(
                KVP="120",
                ConvolutionKernel="STANDARD",
                ReconstructionDiameter=_ds(spec.columns * spec.pixel_spacing[1]),
            )
        ],
    )


def _legacy_frame_group(ctx: _Context, frame: int, position: Sequence[float], converted_from: str) -> Dataset:
    """Per-frame group of Legacy Converted Enhanced CT: position, content, and the single-frame image it came from."""
    group = _enhanced_frame_group(ctx, frame, position)
    group.ConversionSourceAttributesSequence = [
        _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=converted_from)
    ]
    group.UnassignedPerFrameConvertedAttributesSequence = [
        _item(SliceLocation=_ds(float(np.dot(position, ctx.normal))))
    ]
    return group


def _localizer_plane(ctx: _Context, first: Sequence[float]) -> _Plane:
    """Coronal plane through the centre of the axial stack, same matrix/spacing."""
    spec = ctx.spec
    dr, dc = spec.pixel_spacing
    step = spec.slice_direction_sign * spec.slice_spacing * ctx.normal
    centre = (
        np.asarray(first, dtype=float)
        + (spec.slices - 1) / 2 * step
        + (spec.columns - 1) / 2 * dc * ctx.row
        + (spec.rows - 1) / 2 * dr * ctx.col
    )
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
    top_left = centre - (spec.columns - 1) / 2 * dc * row - (spec.rows - 1) / 2 * dr * col
    return _plane([_q(v) for v in top_left], row, col, spec)


def _write_localizer(ctx: _Context, out_dir: Path, first: Sequence[float]) -> tuple[Path, str]:
    """A coronal ORIGINAL\\PRIMARY\\LOCALIZER image in the same series."""
    spec = ctx.spec
    plane = _localizer_plane(ctx, first)
    lut, value_range = _intensity_model(spec.modality)
    rng = np.random.default_rng([spec.seed, 1])
    values, _ = _render_image(plane, lut, value_range, rng, spec.noise_sd)
    sop_class = CTImageStorage if spec.modality == "CT" else MRImageStorage
    ds = _base_dataset(ctx, sop_class, instance=spec.slices + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.AcquisitionNumber = 2
    if spec.modality == "CT" and spec.images_in_acquisition:
        ds.ImagesInAcquisition = 1
    iop = [_ds(v) for v in (*plane.row_dir, *plane.col_dir)]
    _set_image_plane(ds, ctx, plane.position, iop)
    _set_pixel_module(ds, values.shape, spec.modality)
    _set_acquisition(ds, spec)
    if spec.modality == "CT":
        ds.GantryDetectorTilt = "0"  # the scout is taken with the gantry upright
    path = out_dir / f"{spec.modality}_LOCALIZER.dcm"
    return _save(ds, _stored(values, spec.modality), path), ds.SOPInstanceUID


def _intensity_model(modality: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Tissue lookup table and clipping range for the modality."""
    if modality == "CT":
        return _tissue_lut(PHANTOM_HU), _CT_RANGE
    return _tissue_lut(_MR_SIGNAL), _MR_RANGE


def write_phantom_series(out_dir: Path | str, spec: PhantomSpec = PhantomSpec()) -> PhantomSeries:
    """Write the phantom as a DICOM series into ``out_dir``.

    Parameters
    ----------
    out_dir
        Target folder, created if needed. Existing files with the same names
        are overwritten.
    spec
        What to write.

    Returns
    -------
    PhantomSeries
        Files, full-stack volumes (gap slices included) and UIDs.

    Raises
    ------
    RuntimeError
        If the requested compression has no encoder installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.compression is not None:
        syntax = _TRANSFER_SYNTAXES[spec.compression]
        if syntax in _ENCODED:
            _check_encoder(syntax)
    ctx = _make_context(spec)
    positions = _slice_positions(spec, ctx.row, ctx.col, ctx.normal)
    lut, value_range = _intensity_model(spec.modality)
    planes = [_plane(p, ctx.row, ctx.col, spec) for p in positions]
    values, labels = _render_stack(planes, lut, value_range, spec.seed, spec.noise_sd)
    gaps = set(spec.gaps)
    indices = [k for k in range(spec.slices) if k not in gaps]
    if spec.enhanced:
        written = [_write_enhanced(ctx, out, [positions[k] for k in indices], values[indices])]
    else:
        n = len(indices)
        written = [_write_slice(ctx, out, k, positions[k], values[k], n) for k in indices]
    localizer = _write_localizer(ctx, out, positions[0]) if spec.add_localizer else None
    if localizer is not None:
        written.append(localizer)
    return PhantomSeries(
        files=[path for path, _ in written],
        hu=values,
        labels=labels,
        slice_positions=positions,
        spec=spec,
        study_instance_uid=ctx.study_uid,
        series_instance_uid=ctx.series_uid,
        frame_of_reference_uid=ctx.for_uid,
        slice_indices=indices,
        orientation=tuple(float(v) for v in ctx.iop),
        sop_instance_uids=[uid for _, uid in written],
        localizer_file=localizer[0] if localizer else None,
    )
