"""Assemble the stored instances of a series into one 3D CT volume in HU, with its geometry.

Slices are ordered by their position along the slice normal (never by
InstanceNumber). Localizers are dropped, several acquisitions at the same
positions keep the largest one, so do several image sets in one series (two
reconstructions or series merged, told apart by :data:`RECONSTRUCTION_KEYWORDS`:
:func:`one_image_set`), and anything that cannot make one regular
volume (mixed orientations, missing slices, gantry tilt, a single slice, no
pixel data) raises :class:`VolumeError` with a reason an operator can act on.
Gantry-tilted (sheared) stacks are refused rather than resampled: resampling
silently moves anatomy, and scanners can reconstruct without tilt.

Whatever the assembler leaves out or assumes is said in ``Volume.notes``, plain
sentences that the worker turns into the job's warnings; ``excluded_images``
counts the images of the series that the volume does not cover (other
acquisitions), so a caller can refuse a partial series (``allow_partial``).
Decoding fails loudly: an image whose pixel data does not decode, decodes to
another size, makes the decoder warn, or holds non-finite values fails the
series naming the image (InstanceNumber and SOP Instance UID); so does a
compressed frame whose own header describes another image than the DICOM
header (:mod:`inference.frames`), before any decoder allocates what it says,
a JPEG 2000 or JPEG frame whose structure (or, for JPEG, Huffman-coded data)
shows damage the decoder read through, and pixel values that need more bits
than BitsStored (read with BitsStored bits, as decoders do, they would
silently become other HU values).
"""

from __future__ import annotations

import datetime
import itertools
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from scipy import ndimage

from inference.frames import (
    codestream_damage,
    encapsulated_problem,
    jpeg2000_sign,
    lossy_in_lossless_syntax,
    stored_precision,
)

SPACING_TOLERANCE = 0.1
"""Largest relative deviation of a slice step from the median step (10 %) before it counts as a gap."""
ORIENTATION_TOLERANCE = 1e-3
TILT_TOLERANCE_DEGREES = 0.5
"""End-to-end shear that is named gantry tilt; any smaller shear is still bounded by IN_PLANE_TOLERANCE."""
IN_PLANE_TOLERANCE = 0.5
"""Largest distance of a slice from the stack's axis, as a fraction of the smallest pixel spacing (half a pixel)."""
POSITION_NOISE_MM = 0.01
"""Position differences below this are rounding in ImagePositionPatient, never a geometry fault."""
OBLIQUE_LIMIT_DEGREES = 30.0
"""Images turned further than this from the patient's axes are refused. TotalSegmentator's networks learnt from
images in the patient's axes, turned by up to 30 degrees about each axis in training (nnU-Net's augmentation), and
see an oblique series only reordered to the nearest axes (``as_closest_canonical``): turned further, the anatomy is
outside what they learnt, and near 45 degrees one side may be taken for the other."""
OBLIQUE_NOTE_DEGREES = 10.0
"""Images turned further than this (up to :data:`OBLIQUE_LIMIT_DEGREES`) are segmented with a note saying so."""


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """The series cannot become one regular volume; the message says why."""


class MissingSlices(VolumeError):
    """A step between neighbouring slices a whole number of usual steps or more: slices missing."""


@dataclass(frozen=True)
class SliceRef:
    """One slice of the volume and the instance (and frame) it came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based, for multi-frame instances


@dataclass
class Volume:
    """A CT volume: ``hu[k, j, i]`` is slice k, row j, column i.

    Geometry in DICOM patient coordinates (LPS, mm): ``origin`` is the centre of
    voxel (0, 0, 0); ``spacing`` is (column step, row step, slice step), ITK
    order; the columns of ``direction`` are the row, column and slice directions.
    """

    hu: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    slices: list[SliceRef]
    frame_of_reference_uid: str | None
    study_instance_uid: str
    series_instance_uid: str
    notes: list[str] = field(default_factory=list)  # what was left out or assumed: sentences for the job's warnings
    excluded_images: int = 0  # images of the series (not localizers) that the volume does not cover
    source_paths: list[Path] = field(default_factory=list)  # the instance files the slices came from
    positions: np.ndarray | None = None  # each slice's own ImagePositionPatient (k x 3), where read from DICOM
    padding: np.ndarray | None = None  # pixels marked as padding (PixelPaddingValue), packed: see padding_mask

    def padding_mask(self, k: int) -> np.ndarray:
        """Slice k's pixels marked as padding (outside the reconstructed field), whatever they read as HU.

        Kept only where an image marks padding, one bit a pixel (``np.packbits`` along rows): 33 MB for 1000
        slices of 512 x 512, an eighth of a boolean mask."""
        if self.padding is None:
            return np.zeros(self.hu.shape[1:], dtype=bool)
        return np.unpackbits(self.padding[k], axis=-1, count=self.hu.shape[2]).astype(bool)

    def index_to_patient(self, index: Sequence[float]) -> np.ndarray:
        """Patient position (LPS mm) of voxel (i, j, k) = (column, row, slice)."""
        return self.origin + self.direction @ (np.asarray(index, dtype=float) * self.spacing)

    def slice_origin(self, k: int) -> np.ndarray:
        """Where slice k's first voxel is: its image's own ImagePositionPatient, else the regular grid's."""
        if self.positions is not None:
            return self.positions[k]
        return self.index_to_patient((0.0, 0.0, float(k)))

    def ras_affine(self) -> np.ndarray:
        """4x4 affine from (i, j, k) = (column, row, slice) to RAS mm, NIfTI's convention."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * self.spacing
        affine[:3, 3] = self.origin
        return LPS_TO_RAS @ affine

    def to_nibabel(self, dtype: type = np.float64):  # nibabel is imported lazily
        """The volume as a NIfTI image indexed [i, j, k] (as TotalSegmentator reads a CT)."""
        import nibabel as nib

        return nib.Nifti1Image(self.hu.transpose(2, 1, 0).astype(dtype), self.ras_affine())

    def to_sitk(self):  # SimpleITK is imported lazily
        """The volume as a SimpleITK image (same geometry)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.hu)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image


@dataclass
class _Frame:
    ref: SliceRef
    path: Path
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    acquisition: str
    is_localizer: bool
    instance_number: str = ""
    reconstruction: tuple[str | None, ...] = ()  # RECONSTRUCTION_KEYWORDS' values (reconstruction_values)
    acquired: float | None = None  # acquisition_seconds()


HEADER_DEFER_BYTES = 64 * 1024
"""A header value longer than this (a large private element, overlay data) is not read into memory unless used: a
series of thousands of images, each with megabytes of such values beside its pixel data, would otherwise hold them
all at once."""


def read_header(path: Path | str) -> Dataset:
    """An image's header without its pixel data; values longer than :data:`HEADER_DEFER_BYTES` are read only when
    used (from the file, which must then still be there)."""
    return dcmread(path, stop_before_pixels=True, defer_size=HEADER_DEFER_BYTES)


def load_series_volume(paths: Sequence[Path], *, allow_partial: bool = True) -> Volume:
    """Read the instance files of one series into a :class:`Volume`.

    Parameters
    ----------
    paths
        The instance files of one series, in any order.
    allow_partial
        Whether a volume may leave out images of the series (a second acquisition,
        another matrix size); if not, such a series raises :class:`VolumeError`.

    Raises
    ------
    VolumeError
        With the reason the series cannot be one regular volume.
    """
    if not paths:
        raise VolumeError("series has no instances")
    frames: list[_Frame] = []
    first_header: Dataset | None = None
    for path in paths:  # one header at a time: only the frames' geometry is kept of each
        header = read_header(path)
        frames.extend(_frames(Path(path), header))
        first_header = first_header or header
    assert first_header is not None
    notes: list[str] = []
    frames = _drop_localizers(frames, notes)
    kept = _keep_one_image_set(_keep_main_acquisition(frames, notes), notes)
    excluded = len(frames) - len(kept)
    if excluded and not allow_partial:
        raise VolumeError(f"{notes[-1]}; a partial series is not processed (inference.partial_series is 'fail')")
    frames = kept
    problem = several_sources_problem({f.ref.sop_instance_uid for f in frames}, any(f.ref.frame_number for f in frames))
    if problem is not None:
        raise VolumeError(problem)
    normal = _common_orientation(frames)
    oblique = check_obliquity(frames[0].orientation)
    if oblique is not None:
        notes.append(oblique)
    frames.sort(key=lambda f: float(np.dot(f.position, normal)))
    step = _regular_step(frames, normal)
    hu, padding = _read_pixels(frames, notes)
    first = frames[0]
    row_dir, col_dir = orthonormal_directions(first.orientation)
    header = first_header
    return Volume(
        hu=hu,
        origin=first.position.copy(),
        spacing=np.array([first.pixel_spacing[1], first.pixel_spacing[0], step]),
        direction=np.column_stack([row_dir, col_dir, normal]),
        slices=[f.ref for f in frames],
        frame_of_reference_uid=header.get("FrameOfReferenceUID"),
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        notes=notes,
        excluded_images=excluded,
        source_paths=list(dict.fromkeys(f.path for f in frames)),
        positions=np.array([f.position for f in frames], dtype=float),
        padding=padding,
    )


def several_sources_problem(instances: set[str], multiframe: bool) -> str | None:
    """Why slices of several instances, one of them multi-frame, cannot be one volume's sources: the results
    reference the frames of one multi-frame instance only (or single-frame images); None where they can."""
    if not multiframe or len(instances) < 2:
        return None
    return (
        f"the slices come from {len(instances)} instances, at least one of them multi-frame: results can reference "
        "the frames of one multi-frame instance only; send the series as one Enhanced CT instance or as "
        "single-frame CT images"
    )


def volume_from_nifti(path: Path | str) -> Volume:
    """Read a NIfTI CT (e.g. TotalSegmentator's examples) into a :class:`Volume`, without resampling."""
    import nibabel as nib

    image = nib.load(str(path))
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise VolumeError(f"{Path(path).name} is not a NIfTI image")
    affine = LPS_TO_RAS @ image.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return Volume(
        hu=np.asanyarray(image.dataobj).astype(np.float32).transpose(2, 1, 0),
        origin=affine[:3, 3].copy(),
        spacing=spacing,
        direction=affine[:3, :3] / spacing,
        slices=[],
        frame_of_reference_uid=None,
        study_instance_uid="",
        series_instance_uid="",
        notes=[f"read from {Path(path).name}"],
    )


def _frames(path: Path, header: Dataset) -> list[_Frame]:
    image_type = [str(v).upper() for v in header.get("ImageType", [])]
    localizer = "LOCALIZER" in image_type
    if "PerFrameFunctionalGroupsSequence" in header:
        return _enhanced_frames(path, header, localizer)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in header:
            if localizer:
                return [_placeholder(path, header)]
            raise VolumeError(f"instance {header.get('SOPInstanceUID')} has no {keyword}")
    spacing = _numbers(header, "PixelSpacing", 2)
    if min(spacing) <= 0:
        raise VolumeError(f"{_header_name(header)} has PixelSpacing {_vector(spacing)}: spacing must be positive")
    return [
        _Frame(
            ref=SliceRef(str(header.SOPInstanceUID), str(header.SOPClassUID), None),
            path=path,
            position=_numbers(header, "ImagePositionPatient", 3),
            orientation=_numbers(header, "ImageOrientationPatient", 6),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            shape=(int(header.Rows), int(header.Columns)),
            acquisition=_text_of(header.get("AcquisitionNumber")),
            is_localizer=localizer,
            instance_number=str(header.get("InstanceNumber", "")),
            reconstruction=reconstruction_values(header),
            acquired=acquisition_seconds(header),
        )
    ]


def _text_of(value: object) -> str:
    """A value as text, empty for an empty (or absent) one: never 'None'."""
    return "" if value is None else str(value)


def _numbers(header: Dataset, keyword: str, count: int) -> np.ndarray:
    """``count`` finite numbers from a decimal-string attribute, or a VolumeError naming the image and attribute."""
    try:
        value = header.get(keyword)
        values = np.array(
            [float(v) for v in (value if isinstance(value, (list, MultiValue)) else [value])], dtype=float
        )
    except (TypeError, ValueError):
        raise VolumeError(f"{_header_name(header)} has {keyword} values that are not numbers") from None
    if values.shape != (count,):
        raise VolumeError(f"{_header_name(header)} has {len(values)} {keyword} values, not {count}")
    if not np.isfinite(values).all():
        raise VolumeError(f"{_header_name(header)} has {keyword} values that are not finite numbers")
    return values


def _vector(values: Sequence[float] | np.ndarray) -> str:
    """Numbers as an operator reads them: "[1, 0, 0, 0, 1, 0]" (no numpy reprs)."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _header_name(header: Dataset) -> str:
    number = header.get("InstanceNumber")
    shown = f" {number}" if number not in (None, "") else ""
    return f"image{shown} (SOP Instance UID {header.get('SOPInstanceUID')})"


def _placeholder(path: Path, header: Dataset) -> _Frame:
    return _Frame(
        SliceRef(str(header.SOPInstanceUID), str(header.SOPClassUID), None),
        path,
        np.zeros(3),
        np.zeros(6),
        (0.0, 0.0),
        (0, 0),
        "",
        True,
    )


def _enhanced_frames(path: Path, header: Dataset, localizer: bool) -> list[_Frame]:
    shared = header.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []
    for number, group in enumerate(header.PerFrameFunctionalGroupsSequence, start=1):

        def attribute(sequence: str, keyword: str, group: Dataset = group, number: int = number):
            for source in (group, shared):
                if sequence in source and keyword in source[sequence][0]:
                    return source[sequence][0][keyword].value
            raise VolumeError(f"frame {number} of {header.SOPInstanceUID} has no {keyword}")

        spacing = attribute("PixelMeasuresSequence", "PixelSpacing")
        frames.append(
            _Frame(
                ref=SliceRef(str(header.SOPInstanceUID), str(header.SOPClassUID), number),
                path=path,
                position=np.array(attribute("PlanePositionSequence", "ImagePositionPatient"), dtype=float),
                orientation=np.array(attribute("PlaneOrientationSequence", "ImageOrientationPatient"), dtype=float),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                shape=(int(header.Rows), int(header.Columns)),
                acquisition="",
                is_localizer=localizer,
                reconstruction=reconstruction_values(header, [group, shared]),
                acquired=acquisition_seconds(header, [group, shared]),
            )
        )
    return frames


def _drop_localizers(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    kept = [f for f in frames if not f.is_localizer]
    if len(kept) < len(frames):
        notes.append(f"{len(frames) - len(kept)} localizer image(s) left out of the volume")
    if not kept:
        raise VolumeError("series holds only localizer images")
    return kept


def differing_orientations(orientations: Sequence[Sequence[float] | np.ndarray]) -> list[int]:
    """The indices of the orientations further than :data:`ORIENTATION_TOLERANCE` (each direction cosine) from
    the series' own: the median of the images that share the most common orientation to three decimals (the
    first of those by value on a tie, so the same whatever order the images arrived in). Values written to
    another precision are the same."""
    values = np.asarray(orientations, dtype=float)
    keys = [tuple(row) for row in np.round(values, 3).tolist()]
    rounded = Counter(keys)
    most = max(rounded.values())
    common = min(key for key, count in rounded.items() if count == most)
    reference = np.median(values[[key == common for key in keys]], axis=0)  # of the images themselves, unrounded
    return [int(i) for i in np.flatnonzero(np.abs(values - reference).max(axis=1) > ORIENTATION_TOLERANCE)]


VOLUME_SOURCE_KEYWORDS = (
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)
"""The attributes of one image (outside enhanced functional groups) a volume is built from: its geometry, the pixel
module that says how stored values are read, the rescale that makes them HU and the padding it marks. Admission
reads them, and a copy of an instance sent again is compared on them."""

SPACING_DECIMALS = 4
"""PixelSpacing values alike to this many decimals (of a mm) are one matrix: 0.97656 and 0.9765625 are the same
spacing written to different precision, not two reconstructions."""


def _keep_main_acquisition(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Refuse mixed orientations; of several acquisitions (or matrix sizes), keep the largest.

    Acquisitions that continue one another (step-and-shoot: each a few slices further along, together one
    regular stack) are one volume, not several. Two largest groups of the same size are refused: which one
    is meant cannot be told, and the choice must never depend on the order the images arrived in.
    """
    if differing_orientations([f.orientation for f in frames]):
        orientations = Counter(tuple(np.round(f.orientation, 3)) for f in frames)
        counts = ", ".join(f"{n} images at {_vector(o)}" for o, n in orientations.most_common())
        raise VolumeError(f"mixed orientations in one series ({counts})")
    groups: dict[tuple, list[_Frame]] = defaultdict(list)
    same_matrix: dict[tuple, list[_Frame]] = defaultdict(list)
    for frame in frames:
        spacing = tuple(round(v, SPACING_DECIMALS) for v in frame.pixel_spacing)  # as admission compares them
        groups[(frame.acquisition, frame.shape, spacing)].append(frame)
        same_matrix[(frame.shape, spacing)].append(frame)
    if len(groups) == 1:
        return frames
    stacks = {key: members for key, members in groups.items() if not repeats_positions(_depths_of(members))}
    repeated = [members for key, members in groups.items() if key not in stacks] if stacks else []
    largest_matrix = max(same_matrix.values(), key=len)
    if len({f.acquisition for f in largest_matrix}) > 1 and _is_one_stack(largest_matrix):
        main = largest_matrix
        if len(main) == len(frames):
            return frames
        kept = "one stack of consecutive acquisitions"
    else:
        candidates = stacks or groups
        sizes = [*sorted((len(members) for members in candidates.values()), reverse=True), 0]
        stack_problem = _problem_of_consecutive_blocks(largest_matrix) if sizes[0] == sizes[1] else None
        if stack_problem is not None:  # refused either way: say what is wrong with the stack they make
            raise VolumeError(
                f"{stack_problem} (the series' {len({f.acquisition for f in largest_matrix})} acquisitions follow "
                "one another along the slices, so they were checked as one stack)"
            )
        if sizes[0] == sizes[1]:
            raise VolumeError(
                f"{_describe_groups(groups)}: two or more of the largest have {sizes[0]} images each, so which "
                "one to process cannot be told (a choice by arrival order would be arbitrary); send each "
                "acquisition as its own series"
            )
        main = max(candidates.values(), key=len)
        kept = _describe_group(main)
    largest = "the largest" if not repeated else "the largest stack of slices"
    notes.append(
        f"partial series: {len(groups)} acquisitions or matrix sizes in one series; "
        f"processed {largest}, {len(main)} of {len(frames)} images ({kept})" + _repeated_note(repeated)
    )
    return main


REPEATED_POSITIONS_AT_MOST = 3
"""Distinct positions a group of images repeated at them may have to be taken for monitoring images (bolus tracking
at one or a few table positions), not for two image sets at the same positions."""


def repeats_positions(depths: Sequence[float]) -> bool:
    """Whether the images lie at :data:`REPEATED_POSITIONS_AT_MOST` positions or fewer, each taken more than once
    on average (bolus-tracking monitoring images): they make no volume, however many they are, so a stack is
    chosen over them. Two image sets at the same positions (two kernels, two energies) are not this."""
    distinct = len(set(np.round(np.asarray(depths, dtype=float), 3).tolist()))
    return distinct <= REPEATED_POSITIONS_AT_MOST and len(depths) > distinct


def _depths_of(frames: list[_Frame]) -> list[float]:
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    return [float(np.dot(f.position, normal)) for f in frames]


def _repeated_note(repeated: list[list[_Frame]]) -> str:
    """'; 30 images of AcquisitionNumber 2, ... lie at 1 position(s) only ...': the groups left out for that."""
    return "".join(
        f"; {len(members)} images of {_describe_group(members)} lie at {len(set(np.round(_depths_of(members), 3)))} "
        "position(s) only (bolus-tracking or dynamic images): no volume"
        for members in repeated
    )


def _describe_group(members: list[_Frame]) -> str:
    """'AcquisitionNumber 2, 512 x 512 at 0.7 x 0.7 mm': what one group of images has in common."""
    first = members[0]
    acquisition = f"AcquisitionNumber {first.acquisition or '(none)'}"
    rows, columns = first.shape
    return f"{acquisition}, {rows} x {columns} at {first.pixel_spacing[0]:g} x {first.pixel_spacing[1]:g} mm"


GROUPS_DESCRIBED = 6
"""The most groups of images a reason lists one by one; the rest are counted."""


def _describe_groups(groups: dict[tuple, list[_Frame]]) -> str:
    ordered = sorted(groups.values(), key=lambda members: (-len(members), _describe_group(members)))
    described = "; ".join(
        f"{len(members)} images of {_describe_group(members)}" for members in ordered[:GROUPS_DESCRIBED]
    )
    rest = ordered[GROUPS_DESCRIBED:]
    if rest:
        described += f"; and {len(rest)} more groups of {sum(len(members) for members in rest)} images"
    return described


def _problem_of_consecutive_blocks(frames: list[_Frame]) -> str | None:
    """Why acquisitions that follow one another along the slices (each one block of neighbouring positions,
    as a step-and-shoot scan writes them) do not make one regular stack: a gap or a tilt, in the words of
    :func:`check_slice_stack`; None when they interleave or overlap (separate volumes), or make one stack."""
    if len({f.acquisition for f in frames}) < 2:
        return None
    try:
        normal = _common_orientation(frames)
    except VolumeError:
        return None
    ordered = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))
    runs = [a for i, a in enumerate(f.acquisition for f in ordered) if i == 0 or ordered[i - 1].acquisition != a]
    depths = [float(np.dot(f.position, normal)) for f in ordered]
    if len(runs) != len(set(runs)) or len(set(np.round(depths, 3))) < len(depths):
        return None  # interleaved or overlapping: not one stack in parts
    try:
        check_slice_stack([f.position for f in ordered], normal, pixel_spacing=min(ordered[0].pixel_spacing))
    except VolumeError as problem:
        return str(problem)
    return None


def _is_one_stack(frames: list[_Frame]) -> bool:
    """Whether the frames' positions, taken together, make one regular, unsheared stack of consecutive blocks
    (:func:`one_stack_of_blocks`)."""
    try:
        normal = _common_orientation(frames)
    except VolumeError:
        return False
    smallest_pixel = min(min(f.pixel_spacing) for f in frames)
    return one_stack_of_blocks(
        [f.position for f in frames], [f.acquisition for f in frames], normal, pixel_spacing=smallest_pixel
    )


def one_stack_of_blocks(
    positions: Sequence[Sequence[float] | np.ndarray],
    acquisitions: Sequence[str],
    normal: Sequence[float] | np.ndarray,
    *,
    pixel_spacing: float | None = None,
) -> bool:
    """Whether images of several acquisitions make one regular, unsheared stack (:func:`check_slice_stack`) of
    consecutive blocks, as a step-and-shoot scan writes them: the volume then takes them all.

    Each acquisition must hold one block of neighbouring positions: acquisitions whose slices interleave
    (two phases offset by half a step) are two volumes, never one. Admission asks it of the same images.
    """
    if len(positions) < 2:
        return False
    points = np.asarray(positions, dtype=float)
    order = np.argsort(points @ np.asarray(normal, dtype=float), kind="stable")
    try:
        check_slice_stack(list(points[order]), normal, pixel_spacing=pixel_spacing)
    except VolumeError:
        return False
    ordered = [acquisitions[i] for i in order]
    runs = [acquisition for index, acquisition in enumerate(ordered) if index == 0 or ordered[index - 1] != acquisition]
    return len(runs) == len(set(runs))


RECONSTRUCTION_KEYWORDS = (
    "ConvolutionKernel",
    "SliceThickness",
    "ReconstructionDiameter",
    "SeriesNumber",
    "ImageType",
    "KVP",
    "TemporalPositionIdentifier",
)
"""Attributes that tell one image set (a reconstruction, a series, an energy of a dual-energy scan, a phase) from
another: the slices of one volume agree on each that they give. ImageType counts with all its values (a dual-energy
scanner tells its energies apart in the fourth and later ones), one that begins another as that one. AcquisitionTime and
ContentTime are not among them: they change from slice to slice of a helical scan (:func:`sets_by_acquisition_time`
reads the acquisition times)."""
FUNCTIONAL_GROUP_PLACES = {
    "ConvolutionKernel": ("CTReconstructionSequence", "ConvolutionKernel"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "ReconstructionDiameter": ("CTReconstructionSequence", "ReconstructionDiameter"),
    "ImageType": ("CTImageFrameTypeSequence", "FrameType"),
    "KVP": ("CTXRayDetailsSequence", "KVP"),
    "TemporalPositionIdentifier": ("FrameContentSequence", "TemporalPositionIndex"),
}
"""Where a frame of an enhanced image gives each of :data:`RECONSTRUCTION_KEYWORDS` (sequence, attribute)."""
COMPARED_DECIMALS = {"SliceThickness": 3, "ReconstructionDiameter": 1, "KVP": 0}
"""Numbers alike to this many decimals (of a mm, of a kV) are one value written to another precision."""


@dataclass(frozen=True)
class SliceHeader:
    """What tells which image set a slice belongs to, as :func:`one_image_set` compares it."""

    name: str  # the slice as a sentence names it: 'image 12 (SOP Instance UID 1.2.3)'
    position: Sequence[float] | np.ndarray  # ImagePositionPatient
    reconstruction: tuple[str | None, ...]  # reconstruction_values(); None where not given
    instance: str = ""  # SOP Instance UID: the frames of one multi-frame instance share it
    instance_number: str = ""
    acquisition: str = ""
    acquired: float | None = None  # acquisition_seconds(); None where not given


def reconstruction_values(header: Dataset, groups: Sequence[Dataset] = ()) -> tuple[str | None, ...]:
    """The image's values of :data:`RECONSTRUCTION_KEYWORDS` as compared (numbers rounded, ImageType's values in
    capitals), None where not given. An enhanced image's frame: ``groups`` are its per-frame and shared functional
    groups, read before the top level."""
    values = []
    for keyword in RECONSTRUCTION_KEYWORDS:
        sequence, inner = FUNCTIONAL_GROUP_PLACES.get(keyword, ("", keyword))
        places = [(group[sequence][0], inner) for group in groups if sequence and group.get(sequence)]
        given = (_given_text(source, name) for source, name in [*places, (header, keyword)])
        text = next((t for t in given if t is not None), None)
        values.append(None if text is None else _compared(keyword, text))
    return tuple(values)


BINARY_NUMBER_VRS = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
"""Value representations written as binary numbers (TemporalPositionIndex is UL): read as numbers, not as text."""


def _given_text(source: Dataset, keyword: str) -> str | None:
    """:func:`raw_text` (a binary number as its value), None where the value cannot be read (it is then not
    compared)."""
    try:
        element = source.get_item(Tag(keyword), keep_deferred=True)
        if element is not None and (element.VR or dictionary_VR(element.tag)) in BINARY_NUMBER_VRS:  # implicit VR
            value = source[keyword].value
            values = value if isinstance(value, (list, MultiValue)) else [value]
            return "\\".join(f"{v:g}" for v in values if v is not None) or None
        return raw_text(source, keyword)
    except Exception:  # noqa: BLE001 - a value that cannot be read is not compared
        return None


def raw_text(dataset: Dataset, keyword: str) -> str | None:
    """An attribute's value as written (several values joined by backslashes), undecoded and stripped; None when
    absent or empty."""
    element = dataset.get_item(Tag(keyword), keep_deferred=True)
    if element is None or element.value is None:
        return None
    value = element.value
    if isinstance(element, RawDataElement) or isinstance(value, bytes):
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    elif isinstance(value, (list, MultiValue)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip(" \x00") or None


def _compared(keyword: str, text: str) -> str | None:
    parts = [part.strip(" \x00") for part in text.split("\\")]
    if keyword == "ImageType":
        parts = [part.upper() for part in parts]
    elif keyword in COMPARED_DECIMALS or keyword in ("SeriesNumber", "TemporalPositionIdentifier"):
        try:
            number = float(parts[0])
        except ValueError:
            return parts[0] or None
        if math.isfinite(number):
            return f"{round(number, COMPARED_DECIMALS.get(keyword, 0)):g}"
    return "\\".join(parts).strip("\\") or None


def one_image_set(slices: Sequence[SliceHeader], normal: Sequence[float] | np.ndarray) -> tuple[list[int], str | None]:
    """The slices (indices into ``slices``) that make one image set, and a note where others were left out.

    Two reconstructions (a soft-tissue and a bone kernel, two phases) or two series merged into one series by a
    PACS or router would make one volume that changes reconstruction from slice to slice. Slices of one set agree
    on each of :data:`RECONSTRUCTION_KEYWORDS` that they give, and were acquired in one scan of the region
    (:func:`sets_by_acquisition_time`). Where they differ, the largest set is kept (the note, for the job's
    warnings, names the attribute and both values) if every slice gives the values that differ and the set makes a
    regular stack on its own; otherwise, or when the largest sets are the same size, VolumeError. An
    InstanceNumber used twice in one acquisition at different positions is two sets that no attribute tells apart:
    VolumeError. The volume and admission ask it of the same slices.
    """
    values = [
        [s.reconstruction[k] if len(s.reconstruction) > k else None for s in slices]
        for k in range(len(RECONSTRUCTION_KEYWORDS))
    ]
    image_type = RECONSTRUCTION_KEYWORDS.index("ImageType")
    values[image_type] = _completed_image_types(values[image_type])
    differing = [k for k, of_keyword in enumerate(values) if len(set(of_keyword) - {None}) > 1]
    kept, note = list(range(len(slices))), None
    if differing:
        keys = [tuple(values[k][i] for k in differing) for i in range(len(slices))]
        keywords = [RECONSTRUCTION_KEYWORDS[index] for index in differing]
        kinds = SCANS if "TemporalPositionIdentifier" in keywords else RECONSTRUCTIONS
        kept, note = _largest_image_set(slices, keys, keywords, normal, kinds)
    scans = sets_by_acquisition_time([slices[index] for index in kept], normal)
    if scans is not None:
        chosen, scan_note = _largest_image_set(
            [slices[index] for index in kept], scans, ["AcquisitionTime"], normal, SCANS
        )
        kept = [kept[index] for index in chosen]
        note = scan_note if note is None else f"{note}; {scan_note.removeprefix('partial series: ')}"
    _check_instance_numbers([slices[index] for index in kept], normal)
    return kept, note


def _completed_image_types(types: list[str | None]) -> list[str | None]:
    """ImageType values as image sets compare them: one that begins a longer one (ORIGINAL\\PRIMARY and
    ORIGINAL\\PRIMARY\\AXIAL\\CT_SOM5 SPI: a scanner writing the later values on some images only) is taken as that
    one where it begins only one of the longest; a dual-energy scan's DET_A and DET_B images still differ."""
    given = {t for t in types if t is not None}
    longest = [t for t in given if not any(other.startswith(t + "\\") for other in given)]

    def completed(value: str | None) -> str | None:
        if value is None:
            return None
        wider = [t for t in longest if t == value or t.startswith(value + "\\")]
        return wider[0] if len(wider) == 1 else value

    return [completed(value) for value in types]


RECONSTRUCTIONS = "reconstructions, energies of a dual-energy scan, or series merged into one"
SCANS = "scans of one region at different times, such as two contrast phases, or series merged into one"

ACQUISITION_TIME_GAP_SECONDS = 5.0
"""A pause between the acquisition times of a series' images longer than this, seconds, parts two scans. One
helical scan writes its slices' times a fraction of a second apart; a step-and-shoot scan pauses a second or two
between its blocks (and its blocks lie one after the other along the slices, so they are never taken for two
scans); two contrast phases are tens of seconds apart."""

SCAN_MINIMUM_IMAGES = 3
"""Images a scan must hold to count as one when scans are told apart by acquisition time: a lone slice with an
odd AcquisitionTime is a scanner's quirk, not a second scan."""


def sets_by_acquisition_time(
    slices: Sequence[SliceHeader], normal: Sequence[float] | np.ndarray
) -> list[tuple[str | None, ...]] | None:
    """Each slice's scan, as the AcquisitionTime span it belongs to, where the slices were acquired in two scans
    or more of one region; None where they were not, or where a slice gives no acquisition time.

    Two scans (contrast phases, a repeat) merged into one series under one AcquisitionNumber, each slice at its
    own position (the second offset by half a step) and numbered on, look like one regular stack of twice the
    slices; only their acquisition times tell them apart. The times split where they pause longer than
    :data:`ACQUISITION_TIME_GAP_SECONDS`; the parts are scans when two of them (of
    :data:`SCAN_MINIMUM_IMAGES` or more) lie among each other along the slices (most of the smaller one's
    positions within the other's range). Parts that follow one another along the slices are one scan however long
    the pause (a step-and-shoot scan's blocks, one resumed after a tube-cooling wait), as is a helix crossing
    midnight: two phases over adjacent halves of a region are not told apart.
    """
    times = [item.acquired for item in slices]
    if len(slices) < 2 * SCAN_MINIMUM_IMAGES or any(t is None for t in times):
        return None
    known = _across_midnight([float(t) for t in times if t is not None])
    order = sorted(range(len(slices)), key=lambda index: known[index])
    parts: list[list[int]] = [[order[0]]]
    for before, index in itertools.pairwise(order):
        if known[index] - known[before] > ACQUISITION_TIME_GAP_SECONDS:
            parts.append([])
        parts[-1].append(index)
    depth = [float(np.dot(np.asarray(item.position, dtype=float), normal)) for item in slices]
    scans = [part for part in parts if len(part) >= SCAN_MINIMUM_IMAGES]
    if not any(_lie_among(first, second, depth) for i, first in enumerate(scans) for second in scans[i + 1 :]):
        return None
    labels: list[tuple[str | None, ...]] = [()] * len(slices)
    for part in parts:
        start, end = _clock(known[part[0]]), _clock(known[part[-1]])
        for index in part:
            labels[index] = (start if start == end else f"{start} to {end}",)
    return labels


def _across_midnight(seconds: list[float]) -> list[float]:
    """Times that span more than half a day where their times of day would not: a scan across midnight whose
    AcquisitionDate is the day it began (or not given), its times after midnight counted on from that day."""
    if not seconds or max(seconds) - min(seconds) <= 43200:
        return seconds
    shifted = [t % 86400 + (86400 if t % 86400 < 43200 else 0) for t in seconds]
    return shifted if max(shifted) - min(shifted) < max(seconds) - min(seconds) else seconds


def _lie_among(first: list[int], second: list[int], depth: list[float]) -> bool:
    """Whether most of the smaller part's positions lie strictly within the larger one's range along the slices."""
    smaller, larger = sorted((first, second), key=len)
    low, high = min(depth[index] for index in larger), max(depth[index] for index in larger)
    within = sum(low < depth[index] < high for index in smaller)
    return within * 2 > len(smaller)


def _clock(seconds: float) -> str:
    """'10:42:07': a time of day as an operator reads it, to the second (the date, where counted in, left out)."""
    hours, rest = divmod(int(seconds % 86400), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


ACQUISITION_TIME_KEYWORDS = ("AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")
"""Where a single-frame image says when it was acquired (:func:`acquisition_seconds`)."""

_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def acquisition_seconds(header: Dataset, groups: Sequence[Dataset] = ()) -> float | None:
    """When the image (or an enhanced image's frame: ``groups``, its per-frame and shared functional groups) was
    acquired, in seconds: FrameAcquisitionDateTime of its Frame Content, else AcquisitionDateTime, else
    AcquisitionTime on AcquisitionDate (on no date where none is given). None where none is given or it cannot be
    read."""
    for group in groups:
        content = group.get("FrameContentSequence")
        text = raw_text(content[0], "FrameAcquisitionDateTime") if content else None
        if text is not None:
            return _date_time_seconds(text[:8], text[8:])
    combined = raw_text(header, "AcquisitionDateTime")
    if combined is not None:
        return _date_time_seconds(combined[:8], combined[8:])
    time = raw_text(header, "AcquisitionTime")
    if time is None:
        return None
    return _date_time_seconds(raw_text(header, "AcquisitionDate"), time)


def _date_time_seconds(date: str | None, time: str) -> float | None:
    """Seconds from a DA and a TM (or a DT's time part, its offset from UTC left off); None where unreadable."""
    time = re.split(r"[+-]", time.replace(":", ""), maxsplit=1)[0].strip()
    matched = _TIME.match(time)
    if not matched:
        return None
    hours, minutes, seconds, fraction = matched.groups()
    of_day = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0) + float(fraction or 0)
    day = _DATE.match((date or "").replace(".", "").strip())
    if day is None:
        return of_day if date is None or not date.strip() else None
    try:
        days = datetime.date(int(day[1]), int(day[2]), int(day[3])).toordinal()
    except ValueError:
        return None
    return days * 86400 + of_day


def _largest_image_set(
    slices: Sequence[SliceHeader],
    keys: Sequence[tuple[str | None, ...]],
    keywords: list[str],
    normal: Sequence[float] | np.ndarray,
    kinds: str,
) -> tuple[list[int], str]:
    """The largest set of the slices told apart by their ``keys`` (the values of ``keywords`` each slice gives),
    and the note that says so; VolumeError where it cannot be told. ``kinds`` says what such sets are."""
    depth = [float(np.dot(np.asarray(s.position, dtype=float), normal)) for s in slices]
    sets: dict[tuple[str | None, ...], list[int]] = defaultdict(list)
    unplaced: list[int] = []
    for index, key in enumerate(keys):
        if None in key:
            unplaced.append(index)
        else:
            sets[key].append(index)
    ordered = sorted(sets.items(), key=lambda entry: (-len(entry[1]), [str(v) for v in entry[0]]))
    listed = "; ".join(
        f"{len(members)} images with {_set_values(keywords, key)} (first: "
        f"{slices[min(members, key=lambda i: depth[i])].name})"
        for key, members in ordered
    )
    found = f"the series holds {len(ordered)} image sets ({kinds}) that differ in {' and '.join(keywords)}: {listed}"
    if unplaced:
        first = slices[min(unplaced, key=lambda i: depth[i])].name
        raise VolumeError(
            f"{found}; {len(unplaced)} image(s) give no {' or '.join(keywords)} (first: {first}), so which set they "
            "belong to cannot be told: send each set as its own series"
        )
    main = ordered[0][1]
    if len(main) == len(ordered[1][1]):
        raise VolumeError(
            f"{found}; the largest sets have {len(main)} images each, so which one to process cannot be told: send "
            "each set as its own series"
        )
    try:
        check_slice_stack([slices[i].position for i in sorted(main, key=lambda i: depth[i])], normal)
    except VolumeError as problem:
        raise VolumeError(
            f"{found}; the largest set does not make one regular stack on its own ({problem}): send each set as its "
            "own series"
        ) from None
    return main, f"partial series: {found}; processed the largest, {len(main)} of {len(slices)} images"


def _set_values(keywords: list[str], values: tuple[str | None, ...]) -> str:
    """'ConvolutionKernel B30f and SliceThickness 1 mm': what one image set's slices have in common."""
    unit = {"SliceThickness": " mm", "ReconstructionDiameter": " mm", "KVP": " kV"}
    return " and ".join(f"{k} {v}{unit.get(k, '')}" for k, v in zip(keywords, values, strict=True))


def _check_instance_numbers(slices: Sequence[SliceHeader], normal: Sequence[float] | np.ndarray) -> None:
    """VolumeError where InstanceNumbers are used by instances of one acquisition at different positions that
    interleave (:func:`_copies_interleave`).

    A multi-frame instance counts once. A series whose images all carry one number (a numbering not kept by an
    export) shows no two sets."""
    places: dict[tuple[str, str], dict[float, SliceHeader]] = defaultdict(dict)
    counted: set[str] = set()
    for item in slices:
        if not item.instance_number or (item.instance and item.instance in counted):
            continue
        counted.add(item.instance)
        depth = round(float(np.dot(np.asarray(item.position, dtype=float), normal)), 3)
        places[(item.acquisition, _instance_number(item.instance_number))].setdefault(depth, item)
    if len({number for _acquisition, number in places}) < 2:
        return
    repeated = [sorted(at.items(), key=lambda entry: entry[0]) for at in places.values() if len(at) > 1]
    repeated.sort(key=lambda at: (at[0][0], at[0][1].name))
    if not repeated or not _copies_interleave(repeated):
        return
    (first_depth, first), (second_depth, second) = repeated[0][:2]
    others = f", and {len(repeated) - 1} more InstanceNumber(s) alike" if len(repeated) > 1 else ""
    raise VolumeError(
        f"InstanceNumber {first.instance_number} is used by {len(repeated[0])} images at different positions "
        f"({first.name} at {first_depth:g} mm and {second.name} at {second_depth:g} mm along the slices{others}): two "
        "image sets merged into one series (by a PACS, a router, or two reconstructions) that no other attribute "
        "tells apart; send each set as its own series"
    )


def _copies_interleave(repeated: list[list[tuple[float, SliceHeader]]]) -> bool:
    """Whether the first and second images of each repeated InstanceNumber (by position) lie among each other.

    A scan numbered afresh in each block (step-and-shoot without AcquisitionNumber) repeats its numbers in
    consecutive blocks: one after the other, one set. Two sets merged interleave."""
    first = [at[0][0] for at in repeated]
    second = [at[1][0] for at in repeated]
    return min(second) <= max(first) and min(first) <= max(second)


def _instance_number(text: str) -> str:
    """InstanceNumber as compared: '007' and '7' are one number."""
    try:
        return str(int(text))
    except ValueError:
        return text.strip()


def _keep_one_image_set(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Of several image sets in the frames the volume keeps, the largest (:func:`one_image_set`)."""
    normal = _common_orientation(frames)
    headers = [
        SliceHeader(
            _image_name(f),
            f.position,
            f.reconstruction,
            f.ref.sop_instance_uid,
            f.instance_number,
            f.acquisition,
            f.acquired,
        )
        for f in frames
    ]
    kept, note = one_image_set(headers, normal)
    if note is not None:
        notes.append(note)
    return [frames[index] for index in kept]


def _common_orientation(frames: list[_Frame]) -> np.ndarray:
    reference = frames[0].orientation
    for frame in frames:
        if np.max(np.abs(frame.orientation - reference)) > ORIENTATION_TOLERANCE:
            raise VolumeError("mixed orientations: images of the series do not share ImageOrientationPatient")
    row_dir, col_dir = reference[:3], reference[3:]
    normal = np.cross(row_dir, col_dir)
    length = np.linalg.norm(normal)
    if length < 0.5:
        raise VolumeError(f"ImageOrientationPatient {_vector(reference)} is degenerate")
    return normal / length


def obliquity_degrees(orientation: Sequence[float] | np.ndarray) -> float:
    """How far (degrees) the image axes of ImageOrientationPatient are turned from the patient's axes: for the
    row, the column and the slice normal, the angle to the nearest of left-right, front-back and head-foot; the
    largest of the three. 0 for axial, coronal and sagittal images, whatever their patient position."""
    row, column = orthonormal_directions(orientation)
    axes = np.column_stack([row, column, np.cross(row, column)])
    nearest = np.clip(np.abs(axes).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(nearest)).max())


def check_obliquity(orientation: Sequence[float] | np.ndarray) -> str | None:
    """VolumeError for images turned more than :data:`OBLIQUE_LIMIT_DEGREES` from the patient's axes; the note
    for the job's warnings for those turned more than :data:`OBLIQUE_NOTE_DEGREES`; None for the rest."""
    angle = obliquity_degrees(orientation)
    if angle > OBLIQUE_LIMIT_DEGREES:
        raise VolumeError(
            f"the images are turned about {angle:.0f} degrees from the patient's axes (ImageOrientationPatient "
            f"{_orientation_text(orientation)}): an oblique reconstruction. The models "
            f"learnt from images at most {OBLIQUE_LIMIT_DEGREES:.0f} degrees off the patient's axes and could take "
            "one side of the body for the other; send an axial reconstruction of the scan"
        )
    if angle > OBLIQUE_NOTE_DEGREES:
        return (
            f"the images are turned about {angle:.0f} degrees from the patient's axes (an oblique reconstruction, "
            f"ImageOrientationPatient {_orientation_text(orientation)}); they were "
            "segmented as they are, but the models learnt mostly from images in the patient's axes: check the "
            "result, left and right especially"
        )
    return None


def _orientation_text(orientation: Sequence[float] | np.ndarray) -> str:
    return _vector(np.round(np.asarray(orientation, dtype=float), 4) + 0.0)  # + 0.0: no "-0"


def orthonormal_directions(orientation: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ImageOrientationPatient's row and column directions as unit vectors at right angles.

    Admission lets them be up to 1 % off (rounded by the scanner); used as they are, they would
    stretch every distance in the volume, its NIfTI and its contours by that much, where viewers
    use unit vectors. The row direction is kept; the column direction is made perpendicular to it.
    """
    values = np.asarray(orientation, dtype=float)
    row = values[:3] / np.linalg.norm(values[:3])
    column = values[3:] - float(np.dot(values[3:], row)) * row
    return row, column / np.linalg.norm(column)


def _regular_step(frames: list[_Frame], normal: np.ndarray) -> float:
    if len(frames) < 2:
        raise VolumeError("single slice: a volume needs at least two slices")
    smallest_pixel = min(min(f.pixel_spacing) for f in frames)
    return check_slice_stack([f.position for f in frames], normal, pixel_spacing=smallest_pixel)


MAX_POSITION_MM = 100_000.0
"""Farther than 100 m from the patient coordinate origin: no CT's ImagePositionPatient (table positions reach a
few metres); such values (or ones so large that their differences overflow) are wrong, not a volume."""


def check_slice_stack(
    positions: Sequence[Sequence[float] | np.ndarray],
    normal: Sequence[float] | np.ndarray,
    *,
    pixel_spacing: float | None = None,
    labels: Sequence[str] | None = None,
    instances: Sequence[str] | None = None,
) -> float:
    """The slice step (mm) of positions sorted along ``normal``: one regular, unsheared stack, or VolumeError.

    The volume puts slice k at ``positions[0] + k x step x normal``, so every slice must lie there:

    - no position twice, and no step more than :data:`SPACING_TOLERANCE` off the median (a gap);
    - along the normal, each slice within :data:`SPACING_TOLERANCE` of a step of its place in the
      regular stack, so small uneven steps cannot add up to a drift;
    - across the normal, each slice within :data:`IN_PLANE_TOLERANCE` of a pixel (of ``pixel_spacing``,
      or of the step when it is not given) of the stack's axis: no shear (gantry tilt), however small,
      and no shifted slice anywhere. The axis goes through the first slice, or through the first slice
      on the line the others make (:func:`_common_line`) where the first lies off it, so a shifted slice
      is named as such even at an end; gantry tilt is judged from the first and last slice on that line.

    The admission stage runs it on headers, so a series is refused before it is queued; it gives ``labels`` (one
    per position, such as "instance 12"), so a position given twice names the two images, and their SOP Instance UIDs
    (``instances``, one per position) where both carry one label: two copies of one image.
    """
    points = np.asarray(positions, dtype=float)
    direction = np.asarray(normal, dtype=float)
    direction = direction / np.linalg.norm(direction)
    distances = points @ direction
    steps = np.diff(distances)
    if not (np.isfinite(distances).all() and np.isfinite(steps).all()) or np.abs(points).max() > MAX_POSITION_MM:
        raise VolumeError(
            f"ImagePositionPatient puts slices more than {MAX_POSITION_MM:,.0f} mm from the scanner's origin, which "
            "no CT can: the positions are wrong"
        )
    if np.any(steps < 1e-3):
        raise VolumeError(_repeated_position(points, steps, labels, instances, direction))
    median = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > SPACING_TOLERANCE * median:
        missing = round(steps[worst] / median) - 1
        kind = f"about {missing} missing slice(s)" if missing >= 1 else "non-uniform spacing"
        named = f": {labels[worst]} and {labels[worst + 1]}" if labels else ""
        raise (MissingSlices if missing >= 1 else VolumeError)(
            f"{kind}: slices {worst + 1} and {worst + 2} (by position{named}) are {steps[worst]:.2f} mm apart, "
            f"the series' usual step is {median:.2f} mm"
        )
    step = float(distances[-1] - distances[0]) / (len(points) - 1)
    allowed_sideways = max(IN_PLANE_TOLERANCE * (pixel_spacing or step), POSITION_NOISE_MM)
    line = _common_line(points, direction, allowed_sideways)
    if line is not None:
        _check_tilt(points[line[0]], points[line[-1]], direction)
    places = np.arange(len(points))
    expected = points[0] + np.outer(places * step, direction)
    errors = points - expected
    along = errors @ direction
    drifted = int(np.argmax(np.abs(along)))
    allowed_along = max(SPACING_TOLERANCE * step, POSITION_NOISE_MM)
    if abs(along[drifted]) > allowed_along:
        raise VolumeError(
            f"non-uniform spacing: slice {drifted + 1} (by position) lies {abs(along[drifted]):.2f} mm from where "
            f"a regular stack of {step:.3f} mm steps puts it (more than {allowed_along:.2f} mm): the uneven steps "
            "add up, and volumes and contours would be wrong"
        )
    reference = 0 if line is None else int(line[0])  # the first slice, unless it lies off the others' line
    offsets = errors - errors[reference]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ direction, direction), axis=1)
    shifted = int(np.argmax(sideways))
    if sideways[shifted] > allowed_sideways:
        axis = "the first slice" if reference == 0 else f"slice {reference + 1}"
        raise VolumeError(
            f"slices are not stacked straight: slice {shifted + 1} (by position) lies {sideways[shifted]:.2f} mm "
            f"beside the axis through {axis} along the slice normal (more than {allowed_sideways:.2f} mm); "
            "a sheared or shifted stack is not resampled: reconstruct the series on the scanner and send it again"
        )
    _check_tilt(points[0], points[-1], direction)  # every slice within tolerance: the end-to-end angle still counts
    return step


def _check_tilt(first: np.ndarray, last: np.ndarray, direction: np.ndarray) -> None:
    """A stack sheared between these two slices by more than :data:`TILT_TOLERANCE_DEGREES`: gantry tilt."""
    offset = last - first
    along = float(np.dot(offset, direction))
    sideways = float(np.linalg.norm(offset - along * direction))
    angle = float(np.degrees(np.arctan2(sideways, abs(along))))
    if angle > TILT_TOLERANCE_DEGREES:
        raise VolumeError(
            f"gantry tilt of about {angle:.1f} degrees (slices are sheared): not resampled; "
            "reconstruct the series without tilt on the scanner and send it again"
        )


SHEAR_PARTNERS = 64
"""Slices each slice's shear is measured against when the stack's line is fitted (evenly spread over the stack)."""
COMMON_LINE_SHARE = 0.75
"""Share of the slices one line must hold to be the stack's axis: a tilted gantry puts every slice on its sheared
line and a few shifted slices leave most on theirs, while a stack that jumps sideways half way fits no line."""


def _repeated_position(
    points: np.ndarray,
    steps: np.ndarray,
    labels: Sequence[str] | None,
    instances: Sequence[str] | None,
    normal: np.ndarray,
) -> str:
    """The sentence for positions given twice: how many, and the first two images that share one; or, where those
    two lie at one depth along the slice normal but at different places, that the images do not advance along it."""
    repeats = np.flatnonzero(steps < 1e-3)
    first = int(repeats[0])
    which, copies = _two_images(first, len(points), labels, instances)
    if np.linalg.norm(points[first + 1] - points[first]) > POSITION_NOISE_MM:
        return (
            f"{len(repeats)} pair(s) of slices lie at the same depth along the slice normal {_vector(normal)} that "
            f"ImageOrientationPatient gives, though at different places: {which} are at ImagePositionPatient "
            f"({_place(points[first])}) and ({_place(points[first + 1])}); the images do not advance along the "
            "normal, so their ImageOrientationPatient or their ImagePositionPatient is wrong"
        )
    return (
        f"{len(repeats)} slice position(s) occur twice in one acquisition: {which} are both at ImagePositionPatient "
        f"({_place(points[first])}){copies}"
    )


def _place(point: np.ndarray) -> str:
    return ", ".join(f"{value:.2f}" for value in point)


def _two_images(
    first: int, count: int, labels: Sequence[str] | None, instances: Sequence[str] | None
) -> tuple[str, str]:
    """Slices ``first`` and ``first + 1`` (by position) as a sentence names them, and what follows the place: two
    images of one label (one InstanceNumber) are named by their SOP Instance UIDs where known, as two copies of one
    image."""
    if labels is None or len(labels) != count:
        return f"slices {first + 1} and {first + 2} (by position)", ""
    label, other = labels[first], labels[first + 1]
    if label != other:
        return f"{label} and {other}", ""
    copies = f"; {COPIES_UNDER_NEW_UIDS}"
    if instances is not None and len(instances) == count and instances[first] != instances[first + 1]:
        uids = instances[first], instances[first + 1]
        return f"{label} (SOP Instance UID {uids[0]}) and {label} (SOP Instance UID {uids[1]})", copies
    return f"two images labelled {label}", copies


COPIES_UNDER_NEW_UIDS = "two copies of one image under different SOP Instance UIDs (a resend that gave it a new UID?)"
"""What two images of one label (one InstanceNumber) at one position are, said after naming them."""


def _common_line(points: np.ndarray, direction: np.ndarray, allowed: float) -> np.ndarray | None:
    """Indices (by position) of the slices on the line most slices (:data:`COMMON_LINE_SHARE`) lie on, within
    ``allowed`` mm; None if no line holds that many.

    Two lines are fitted to the slices' offsets across ``direction``: the straight axis (no shear, through the
    median offset) and a sheared one (a repeated-median fit, as a tilted gantry shears every slice in proportion
    to its depth), which one or a few slices off the line cannot pull. A sheared line is kept only where it holds
    more slices than the straight axis, so a lone shifted slice, even at an end, is never taken for a shear.
    """
    offsets = _across(points - points[0], direction)
    depth = (points - points[0]) @ direction
    straight = np.linalg.norm(offsets - np.median(offsets, axis=0), axis=1) <= allowed
    slope = _repeated_median_slope(offsets, depth)
    leaning = offsets - np.outer(depth, slope)
    sheared = np.linalg.norm(leaning - np.median(leaning, axis=0), axis=1) <= allowed
    line = sheared if sheared.sum() > straight.sum() else straight
    return np.flatnonzero(line) if line.sum() >= COMMON_LINE_SHARE * len(points) else None


def _across(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The components of ``vectors`` in two fixed directions at right angles to ``direction`` (unit)."""
    helper = np.eye(3)[int(np.argmin(np.abs(direction)))]
    first = np.cross(direction, helper)
    first /= np.linalg.norm(first)
    return vectors @ np.column_stack([first, np.cross(direction, first)])


def _repeated_median_slope(offsets: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Sideways offset per mm of depth: for each slice the median slope to the partners, then the median of those."""
    partners = np.unique(np.linspace(0, len(depth) - 1, min(len(depth), SHEAR_PARTNERS)).round().astype(int))
    rise = offsets[partners][None, :, :] - offsets[:, None, :]
    run = depth[partners][None, :] - depth[:, None]
    run[run == 0] = np.nan  # a slice and itself
    return np.median(np.nanmedian(rise / run[:, :, None], axis=1), axis=0)


def _read_pixels(frames: list[_Frame], notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The volume in HU, and its padding pixels packed (:attr:`Volume.padding`), None where no image marks any."""
    by_path: dict[Path, list[tuple[int, _Frame]]] = defaultdict(list)
    for index, frame in enumerate(frames):
        by_path[frame.path].append((index, frame))
    rows, columns = frames[0].shape
    volume = np.empty((len(frames), rows, columns), dtype=np.float32)
    assumed_rescale = 0
    padding = _PaddingAsAir(volume.shape)
    soft = _SoftestTissue()
    for path, members in by_path.items():
        dataset, pixels, unproven = _decode(path, members[0][1])
        codestream_sign = jpeg2000_sign(dataset)
        sign = _SignDisagreement.of(dataset, codestream_sign)
        mislabel = None if sign is not None else _SignMislabel.of(dataset, codestream_sign, unproven)
        assumed_rescale += "RescaleSlope" not in dataset and "PerFrameFunctionalGroupsSequence" not in dataset
        for index, frame in members:
            plane = pixels[frame.ref.frame_number - 1] if frame.ref.frame_number and pixels.ndim == 3 else pixels
            if plane.shape != (rows, columns):
                raise VolumeError(
                    f"{_image_name(frame)} decodes to {plane.shape[1]} x {plane.shape[0]} pixels, "
                    f"its header says {columns} x {rows}"
                )
            slope, intercept = _rescale(dataset, frame.ref.frame_number, _image_name(frame))
            unusable_padding = padding_problem(dataset, slope, intercept)
            if unusable_padding is not None:
                raise VolumeError(f"{_image_name(frame)}: {unusable_padding}")
            volume[index] = plane * slope + intercept
            padded = padding.apply(dataset, plane, volume[index], index)
            soft.count(volume[index], padded, frame, intercept)
            if sign is not None:
                sign.check(plane, volume[index], padded, frame, slope)
            if mislabel is not None:
                position = frame.ref.frame_number - 1 if frame.ref.frame_number and pixels.ndim == 3 else 0
                mislabel.check(plane, volume[index], padded, frame, slope, position)
            if not np.isfinite(volume[index]).all():
                raise VolumeError(f"{_image_name(frame)} has pixel values that are not finite numbers after rescaling")
            highest = float(volume[index].max())
            if highest > HIGHEST_PLAUSIBLE_HU:
                raise VolumeError(
                    f"{_image_name(frame)} has values up to {highest:.4g} HU after RescaleSlope and RescaleIntercept, "
                    f"beyond any CT (over {HIGHEST_PLAUSIBLE_HU:,} HU): its rescale values are wrong"
                )
    if assumed_rescale:
        notes.append(
            f"RescaleSlope and RescaleIntercept missing on {assumed_rescale} image(s): assumed 1 and 0 (HU as stored)"
        )
    notes.extend(padding.notes())
    if min(np.multiply(frames[0].shape, frames[0].pixel_spacing)) >= AIR_OR_FAT_FIELD_MM:
        soft.check()
    return volume, padding.packed


HIGHEST_PLAUSIBLE_HU = 70_000
"""Above any CT value (16-bit extended scales reach about 64,500 HU): a higher one means a wrong rescale."""
AIR_HU = -1024.0
AIR_CEILING_HU = -1000.0
"""Air reads -1000 HU (padding and noise below): a CT whose pixels cannot read this low holds no HU."""


@dataclass(frozen=True)
class _SignDisagreement:
    """A JPEG 2000 codestream that says its samples are signed where PixelRepresentation says unsigned, or the
    other way round. pydicom follows PixelRepresentation, which is right for a known encoder fault (signed
    CT written as an unsigned codestream: its negative values, air and fat, read as they should). Where the
    header is the one that is wrong, the samples past half the range read on the other side of the scale:
    bone as far below air. So the reading is judged by what it gives."""

    signed_header: bool
    precision: int

    @classmethod
    def of(cls, dataset: Dataset, sign: tuple[bool, int] | None) -> _SignDisagreement | None:
        """``sign``: the codestream's (:func:`inference.frames.jpeg2000_sign`)."""
        header = dataset.get("PixelRepresentation")
        if sign is None or header not in (0, 1) or sign[0] == bool(header):
            return None
        return cls(bool(header), sign[1])

    def check(self, plane: np.ndarray, hu: np.ndarray, padded: np.ndarray | None, frame: _Frame, slope: float) -> None:
        """Refuse the image where the pixels whose reading the sign decides read, as the header says, as no tissue
        can (header signed: below air), or, as the codestream says, as air or tissue (header unsigned: what the
        header reads as dense bone would be air)."""
        flipped = plane < 0 if self.signed_header else plane >= (1 << (self.precision - 1))
        if padded is not None:
            flipped &= ~padded
        if self.signed_header:
            doubtful = flipped & (hu < BELOW_AIR_HU)
            if len(np.unique(hu[doubtful])) > SIGN_FLIPPED_VALUES:  # a fill and its rim, or bone torn from tissue
                doubtful &= ~_joined_to_fill(doubtful, hu, padded)
                doubtful &= _torn_from_neighbour(plane, padded, self.precision)
        else:
            doubtful = flipped & (hu - (1 << self.precision) * slope >= BELOW_AIR_HU)
        if len(np.unique(hu[doubtful])) <= SIGN_FLIPPED_VALUES:
            return  # none, or one padding-like value: the reading PixelRepresentation gives stands
        count = int(doubtful.sum())
        if self.signed_header:
            said, header = "unsigned", "signed (1)"
            why = f"read as the header says, {count:,} pixels would read far below air (bone read on the wrong side)"
        else:
            said, header = "signed", "unsigned (0)"
            why = f"read as the codestream says, {count:,} pixels the header reads as dense bone would be air or tissue"
        raise VolumeError(
            f"the JPEG 2000 data of {_image_name(frame)} says its samples are {said}, but its PixelRepresentation "
            f"says {header}: {why}, so which one is right cannot be told"
        )


SIGN_FLIPPED_VALUES = 16
"""Distinct values among the pixels a sign disagreement would misread that are still taken as padding (one value,
or a few), not as tissue read on the wrong side of the scale."""


@dataclass(frozen=True)
class _SignMislabel:
    """A PixelRepresentation that the pixel data itself cannot confirm, judged, as :class:`_SignDisagreement`
    judges a JPEG 2000 codestream's, by what its reading gives.

    Header signed: a frame whose stored values carry no sign of their own (none below 0 with bits above
    BitsStored to hold its copies, or a decoder that extends the sign itself, as JPEG-LS and JPEG lossless
    decoders do) is read sign-extended; an export or anonymiser that set PixelRepresentation 1 on a scanner's
    unsigned 12-bit values then reads every pixel from half the range up (bone, contrast) far below air.
    A frame that holds -1000 HU as 3096 (signed, written without sign extension) reads as air, and stands.
    Below air is not enough: a signed image may hold a fill outside its field (-2000, -3024 HU), and a
    reformatted or resampled one a rim of many values between that fill and air or tissue. Such a frame is
    refused only where over :data:`SIGN_FLIPPED_VALUES` values far below air are torn from the picture as a
    misread sign tears it: each lies beside a pixel more than half the range of BitsStored above it (bone read
    as far below air, beside the soft tissue or bone just under half the range that it continues), and none is
    joined, through pixels below air, to the fill (declared padding, or one value covering
    :data:`SIGN_FILL_SHARE` of the image), as a rim is.

    Header unsigned: signed values read unsigned put pixels just below 0 (air noise under a RescaleIntercept of
    -1024) at the top of the range, 64,496 HU. Real metal can read that high on a 16-bit extended scale, so
    such pixels are refused only where taken as signed they would be air or tissue, they are more than one
    value and more than :data:`SIGN_MISREAD_SHARE` of the image, and nothing else in the image comes within a
    quarter of the range below them (metal's edges fill that span; a fill value covering
    :data:`SIGN_FILL_SHARE` of the image, outside the field of a mislabelled signed image, does not count)."""

    signed_header: bool
    bits: int
    unproven: tuple[bool, ...]

    @classmethod
    def of(cls, dataset: Dataset, sign: tuple[bool, int] | None, unproven: tuple[bool, ...]) -> _SignMislabel | None:
        """``sign``: the JPEG 2000 codestream's, which confirms a signed header; ``unproven``: for each frame,
        whether its values carry no sign of their own (:func:`_decode`)."""
        header, bits = dataset.get("PixelRepresentation"), dataset.get("BitsStored")
        if header not in (0, 1) or not isinstance(bits, int) or not 2 <= bits <= 32:
            return None
        if header == 1 and (sign is not None or not any(unproven)):
            return None
        return cls(header == 1, bits, unproven)

    def check(
        self, plane: np.ndarray, hu: np.ndarray, padded: np.ndarray | None, frame: _Frame, slope: float, position: int
    ) -> None:
        if self.signed_header:
            if position < len(self.unproven) and self.unproven[position]:
                self._check_signed(plane, hu, padded, frame, slope)
        elif plane.dtype.kind in "iu" and slope > 0 and int(plane.max()) >= 1 << (self.bits - 1):
            self._check_unsigned(plane, hu, padded, frame, slope)

    def _check_signed(
        self, plane: np.ndarray, hu: np.ndarray, padded: np.ndarray | None, frame: _Frame, slope: float
    ) -> None:
        below = (plane < 0) & (hu < BELOW_AIR_HU)
        if padded is not None:
            below &= ~padded
        if len(np.unique(hu[below])) <= SIGN_FLIPPED_VALUES:
            return  # none, or one padding-like value: below air as signed values may be
        doubtful = below & ~_joined_to_fill(below, hu, padded)  # a fill and the rim between it and the field
        torn = doubtful & _torn_from_neighbour(plane, padded, self.bits)
        if len(np.unique(hu[torn])) <= SIGN_FLIPPED_VALUES:
            return  # below air, but continuous with what lies beside it, as signed values are
        values = np.unique(hu[doubtful])
        unsigned = (1 << self.bits) * slope
        raise VolumeError(
            f"{_image_name(frame)} has PixelRepresentation (0028,0103) 1 (signed), but read so, "
            f"{int(doubtful.sum()):,} pixels would read far below air (bone read on the wrong side), "
            f"{values[0]:,.0f} to {values[-1]:,.0f} HU, as no CT can; read as unsigned they would be "
            f"{values[0] + unsigned:,.0f} to {values[-1] + unsigned:,.0f} HU: its values are most likely unsigned "
            "and PixelRepresentation wrong, so the series is not processed; correct PixelRepresentation in the "
            "export, or send the scanner's original images"
        )

    def _check_unsigned(
        self, plane: np.ndarray, hu: np.ndarray, padded: np.ndarray | None, frame: _Frame, slope: float
    ) -> None:
        signed_offset = (1 << self.bits) * slope
        upper = plane >= 1 << (self.bits - 1)
        if padded is not None:
            upper &= ~padded
        doubtful = upper & (hu - signed_offset >= BELOW_AIR_HU)
        count = int(np.count_nonzero(doubtful))
        if count < SIGN_MISREAD_SHARE * plane.size:
            return
        values = np.unique(hu[doubtful])
        if len(values) <= 1:
            return  # one value: padding, or metal at the top of the scale
        others = ~doubtful if padded is None else ~doubtful & ~padded
        below = upper & ~doubtful  # far below air if signed: metal, or the fill outside a signed image's field
        fills, held = np.unique(hu[below], return_counts=True)
        for fill in fills[held >= SIGN_FILL_SHARE * plane.size]:
            others &= hu != fill
        highest = float(hu[others].max()) if others.any() else -math.inf
        if values[0] - highest <= (1 << (self.bits - 2)) * slope:
            return  # values reach up to them: the top of a real scale (metal's edges)
        beneath = f"the highest other {highest:,.0f} HU" if others.any() else "no other pixel"
        raise VolumeError(
            f"{_image_name(frame)} has PixelRepresentation (0028,0103) 0 (unsigned), but read so, {count:,} pixels "
            f"would read {values[0]:,.0f} to {values[-1]:,.0f} HU, far above every other pixel in it ({beneath}), "
            f"as no CT can; read as signed they would be air or tissue, {values[0] - signed_offset:,.0f} to "
            f"{values[-1] - signed_offset:,.0f} HU: its values are most likely signed and PixelRepresentation "
            "wrong, so the series is not processed; correct PixelRepresentation in the export, or send the "
            "scanner's original images"
        )


def _joined_to_fill(below: np.ndarray, hu: np.ndarray, padded: np.ndarray | None) -> np.ndarray:
    """The pixels of ``below`` (far below air, not padding) joined to the fill outside the field through pixels
    of ``below``, 8-connected: the fill is the padding pixels and any one value of ``below`` that covers
    :data:`SIGN_FILL_SHARE` of the image (a fill not declared as padding); what joins it is a rim a reformat
    or resampling interpolated between the fill and the field."""
    fills, held = np.unique(hu[below], return_counts=True)
    seeds = below & np.isin(hu, fills[held >= SIGN_FILL_SHARE * hu.size])
    if padded is not None:
        seeds |= padded
    if not seeds.any():
        return seeds
    every_way = ndimage.generate_binary_structure(hu.ndim, hu.ndim)  # 8-connected in a plane
    joined = ndimage.binary_propagation(seeds, structure=every_way, mask=below | seeds)
    return joined & below


def _torn_from_neighbour(plane: np.ndarray, padded: np.ndarray | None, bits: int) -> np.ndarray:
    """The pixels beside (row or column) a pixel, not padding, whose stored value is more than half the range of
    ``bits`` above theirs: the step a sign misread makes, where the values read unsigned lie closer together
    than read signed. Signed images change by less between neighbours, a rim interpolated to a fill included."""
    values = plane.astype(np.int64)
    usable = np.ones(plane.shape, dtype=bool) if padded is None else ~padded
    torn = np.zeros(plane.shape, dtype=bool)
    half = 1 << (bits - 1)
    for axis in (-2, -1):
        first = [slice(None)] * plane.ndim
        second = [slice(None)] * plane.ndim
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        lower, upper = tuple(first), tuple(second)
        rise = values[upper] - values[lower]
        torn[lower] |= (rise > half) & usable[upper]
        torn[upper] |= (-rise > half) & usable[lower]
    return torn


SIGN_MISREAD_SHARE = 1e-3
"""Pixels a header that says unsigned would put at the top of the scale, where as signed they would be air or
tissue, are refused only from this share of an image on (air noise of a whole field, not a metal clip's edge)."""
SIGN_FILL_SHARE = 0.01
"""A value at least this share of an image holds, far below air if signed, is taken as the fill outside a signed
image's field (not metal) when judging what lies below the pixels an unsigned header puts at the top."""


class _SoftestTissue:
    """Whether a volume holds any air or fat, counted slice by slice as it is read.

    Every CT of a body region (at least :data:`AIR_OR_FAT_FIELD_MM` across) holds air (outside the patient,
    lungs, bowel) or at least fat (-190 to -30 HU); one where no pixel inside the field reads between
    :data:`BELOW_AIR_HU` and :data:`FAT_OR_AIR_HU` has its values shifted: most often RescaleIntercept 0 on
    pixels stored as HU + 1024, which makes air read as water and every segmentation and measurement wrong.
    Padding and pixels below air (outside the field) are not counted.
    """

    def __init__(self) -> None:
        self.inside = 0
        self.soft = 0
        self.first: tuple[_Frame, float] | None = None

    def count(self, hu: np.ndarray, padded: np.ndarray | None, frame: _Frame, intercept: float) -> None:
        inside = hu > BELOW_AIR_HU
        if padded is not None:
            inside &= ~padded
        self.inside += int(np.count_nonzero(inside))
        self.soft += int(np.count_nonzero(inside & (hu <= FAT_OR_AIR_HU)))
        if self.first is None:
            self.first = (frame, intercept)

    def check(self) -> None:
        if self.first is None or not self.inside or self.soft >= self.inside * SOFTEST_TISSUE_SHARE:
            return
        frame, intercept = self.first
        raise VolumeError(
            f"no pixel inside the field reads as air or fat ({BELOW_AIR_HU:.0f} to {FAT_OR_AIR_HU:.0f} HU) in "
            f"{self.inside:,} pixels, as no CT of a body can: its values are not HU as read, most likely because "
            f"RescaleIntercept ({intercept:g} on {_image_name(frame)}) or PixelRepresentation is wrong"
        )


FAT_OR_AIR_HU = -100.0
BELOW_AIR_HU = -1500.0
SOFTEST_TISSUE_SHARE = 1e-4
"""At least one pixel in ten thousand inside the field reads as air or fat in any CT of a body region."""
AIR_OR_FAT_FIELD_MM = 200.0
"""Only images at least this wide both ways are judged: a body or head field holds air around the patient,
while a small field zoomed inside the body (a spine or cardiac reconstruction) may hold neither."""


class _PaddingAsAir:
    """Pixels marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit): where they lie, and those that
    would read above air.

    Padding is not tissue: it marks what lies outside the reconstructed field. Where it rescales to air
    or below (the usual -2000 stored, -3024 HU) it is left as it is, as TotalSegmentator reads it; where
    it would read as tissue or bone (an unsigned 63536 read as 62,512 HU) it becomes air, -1024 HU, so
    it enters neither the model nor any measurement as anatomy. The job's warnings say so. Where the padding
    lies is kept (``packed``, one bit a pixel, made at the first padding pixel), so measurements still leave
    it out and see the edge of the field, whatever it reads as.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape  # the volume's (slices, rows, columns)
        self.packed: np.ndarray | None = None
        self.replaced = 0
        self.example: tuple[int, float] | None = None  # the padding value as stored, and what it would have read

    def apply(self, dataset: Dataset, plane: np.ndarray, hu: np.ndarray, index: int) -> np.ndarray | None:
        """Note slice ``index``'s padding pixels, and read those above air as air (in ``hu``, in place); the
        slice's padding pixels, None where it has none."""
        padded = _padding_mask(dataset, plane)
        if padded is None or not padded.any():
            return None
        if self.packed is None:
            slices, rows, columns = self.shape
            self.packed = np.zeros((slices, rows, (columns + 7) // 8), dtype=np.uint8)
        self.packed[index] = np.packbits(padded, axis=-1)
        above_air = padded & (hu > AIR_HU)
        count = int(np.count_nonzero(above_air))
        if count:
            if self.example is None:
                self.example = (int(dataset.PixelPaddingValue), float(hu[above_air].max()))
            hu[above_air] = AIR_HU
            self.replaced += count
        return padded

    def notes(self) -> list[str]:
        if not self.replaced or self.example is None:
            return []
        value, read_as = self.example
        return [
            f"{self.replaced} padding pixel(s) (PixelPaddingValue {value}, outside the reconstructed field) would "
            f"read as {read_as:.0f} HU; they were read as air (-1024 HU)"
        ]


PADDING_TISSUE_HU = (AIR_CEILING_HU, 3000.0)
"""Values a patient's tissue, contrast and bone read (above air, up to the densest bone): padding that reads
in this range would turn those pixels into air."""


def padding_problem(dataset: Dataset, slope: float, intercept: float) -> str | None:
    """Why the image's PixelPaddingValue (and PixelPaddingRangeLimit) cannot be used, or None.

    Each must be one whole number, and the padding must not read as tissue (between -1000 and 3000 HU after
    rescaling): pixels equal to it are taken for what lies outside the field and read as air, so padding of
    0 HU would punch holes in the patient."""
    if "PixelPaddingValue" not in dataset:
        return None
    bits = dataset.get("BitsStored")
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        return None  # checked, and named, by admission
    signed = dataset.get("PixelRepresentation") == 1
    values = []
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        try:
            raw = dataset.get(keyword)
            if raw is None and keyword == "PixelPaddingRangeLimit":
                continue
            values.append(_as_decoded(int(raw), bits, signed))
        except (TypeError, ValueError):
            return f"its {keyword} cannot be read as one whole number, so which pixels are padding cannot be told"
    low, high = sorted((min(values) * slope + intercept, max(values) * slope + intercept))
    floor, ceiling = PADDING_TISSUE_HU
    if high <= floor or low > ceiling:
        return None
    padding = f"{low:,.0f} HU" if low == high else f"{low:,.0f} to {high:,.0f} HU"
    return (
        f"its padding (PixelPaddingValue {int(dataset.PixelPaddingValue)}) reads as {padding}, a value of the "
        "patient's tissue: those pixels would be taken for the area outside the field and read as air; correct the "
        "padding value in the export"
    )


def _padding_mask(dataset: Dataset, plane: np.ndarray) -> np.ndarray | None:
    """Which pixels of ``plane`` (as decoded) are padding; None where the image declares none."""
    if "PixelPaddingValue" not in dataset:
        return None
    try:
        bits = int(dataset.get("BitsStored") or plane.dtype.itemsize * 8)
        signed = int(dataset.get("PixelRepresentation") or 0) == 1
        value = _as_decoded(int(dataset.PixelPaddingValue), bits, signed)
        limit = dataset.get("PixelPaddingRangeLimit")
        if limit is None:
            return plane == value
        low, high = sorted((value, _as_decoded(int(limit), bits, signed)))
    except (TypeError, ValueError):
        return None  # an unreadable padding value: the pixels are read as they are
    return (plane >= low) & (plane <= high)


def _as_decoded(value: int, bits: int, signed: bool) -> int:
    """A padding value as the decoder gives pixels: cut to BitsStored, then signed if the pixels are."""
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def _image_name(frame: _Frame) -> str:
    """'image 12 (SOP Instance UID 1.2.3)', with the frame number for a multi-frame instance."""
    part = f"frame {frame.ref.frame_number} of " if frame.ref.frame_number else ""
    return f"{part}{_instance_name(frame)}"


def _instance_name(frame: _Frame) -> str:
    """'image 12 (SOP Instance UID 1.2.3)': the instance the frame is in, all its frames."""
    number = f" {frame.instance_number}" if frame.instance_number else ""
    return f"image{number} (SOP Instance UID {frame.ref.sop_instance_uid})"


def _decode(path: Path, frame: _Frame) -> tuple[Dataset, np.ndarray, tuple[bool, ...]]:
    """Read one instance and decode its pixel data; any decoder warning or error fails the series, and so do
    damage a JPEG 2000 or JPEG frame shows (:func:`inference.frames.codestream_damage`) and pixel values that
    do not fit BitsStored (:func:`_check_stored_values`). Also, for each frame of an image that says signed,
    whether its values carry no sign of their own: sign-extended from BitsStored here (none below 0, bits
    above BitsStored all zero) or by the decoder (the data holds only BitsStored bits)."""
    with warnings.catch_warnings(record=True) as reading:
        warnings.simplefilter("always")
        try:
            dataset = dcmread(path)
        except Exception:  # noqa: BLE001 - a file changed on disk since its header was read
            raise VolumeError(f"{_image_name(frame)} cannot be read again from {path}") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        if reading:
            raise VolumeError(f"{_image_name(frame)} has incomplete pixel data (the file ends inside it)")
        raise VolumeError(f"instance {dataset.get('SOPInstanceUID')} has no pixel data")
    mismatch = encapsulated_problem(dataset, _instance_name(frame))  # before a decoder allocates what a frame says
    mismatch = mismatch or lossy_in_lossless_syntax(dataset, _instance_name(frame))
    if mismatch is not None:
        raise VolumeError(mismatch)
    bits_stored, signed = _stored_bits(dataset, frame) if "PixelData" in dataset else (0, False)
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    encoding = getattr(syntax, "name", "") or "pixel"
    with warnings.catch_warnings(record=True) as decoding:
        warnings.simplefilter("always")
        try:
            if bits_stored:  # every bit the data holds, not only BitsStored: what lies above is checked below
                dataset.pixel_array_options(bits_stored=_bits_held(dataset, bits_stored))
            pixels = dataset.pixel_array
        except Exception:  # noqa: BLE001 - any decoder failure becomes the reason
            damaged = f"{_image_name(frame)} cannot be decoded: its {encoding} data is damaged or incomplete"
            raise VolumeError(_length_mismatch(dataset, frame) or damaged) from None
    decoding = [warned for warned in decoding if not _zero_padding_only(dataset, str(warned.message))]
    if decoding:
        first = str(decoding[0].message).splitlines()[0][:200]
        warned = f'{_image_name(frame)} did not decode cleanly ({encoding}): the decoder warned "{first}"'
        raise VolumeError(_length_mismatch(dataset, frame) or warned)
    damage = codestream_damage(dataset, _instance_name(frame))
    if damage is not None:
        raise VolumeError(damage)
    unproven: tuple[bool, ...] = ()
    if bits_stored:
        pixels, unextended = _check_stored_values(dataset, pixels, bits_stored, signed, frame)
        container = pixels.dtype.itemsize * 8
        if signed and pixels.dtype.kind == "i" and bits_stored < container:
            decoder_extended = _bits_held(dataset, bits_stored) == bits_stored
            unproven = tuple(decoder_extended or plain for plain in unextended)
    return dataset, pixels, unproven


def _length_mismatch(dataset: Dataset, frame: _Frame) -> str | None:
    """The sentence for native Pixel Data of another length than its Rows, Columns, SamplesPerPixel,
    NumberOfFrames and BitsAllocated need, naming the image; None when they agree or cannot be told."""
    data = dataset.get("PixelData")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if not isinstance(data, bytes) or syntax is None or syntax.is_encapsulated:
        return None
    if str(dataset.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        return None  # two samples a pixel, not three: the decoder's own count
    try:
        keywords = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")
        rows, columns, samples, bits = (int(dataset[keyword].value) for keyword in keywords)
        frames = int(dataset.get("NumberOfFrames") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if len(data) in (needed, needed + needed % 2):  # an odd length is padded to even
        return None
    count = f" x NumberOfFrames {frames}" if frames > 1 else ""
    return (
        f"the Pixel Data of {_instance_name(frame)} holds {len(data):,} bytes, but its Rows {rows} x Columns "
        f"{columns} x SamplesPerPixel {samples}{count} x BitsAllocated {bits}/8 need {needed:,}: read with these "
        "values the image would be wrong (a wrong Rows or Columns shears it), so the series is not processed; "
        "correct the export, or send the scanner's original images"
    )


def _stored_bits(dataset: Dataset, frame: _Frame) -> tuple[int, bool]:
    """BitsStored, and whether the pixels are signed, where BitsAllocated, HighBit and PixelRepresentation agree
    with them (as admission checks them); else VolumeError naming the attribute."""
    allocated, stored = dataset.get("BitsAllocated"), dataset.get("BitsStored")
    high_bit, representation = dataset.get("HighBit"), dataset.get("PixelRepresentation")
    name = _image_name(frame)
    if not isinstance(allocated, int) or not isinstance(stored, int) or not 1 <= stored <= allocated:
        given = "no BitsStored (0028,0101)" if stored is None else f"BitsStored (0028,0101) {stored}"
        raise VolumeError(
            f"{name} has {given}, where it must be 1 to its BitsAllocated (0028,0100) {allocated}: which bits of "
            "each pixel hold its value cannot be told"
        )
    if high_bit is not None and high_bit != stored - 1:
        raise VolumeError(
            f"{name} has HighBit (0028,0102) {high_bit}, but with BitsStored (0028,0101) {stored} it must be "
            f"{stored - 1}: which bits of each pixel hold its value cannot be told"
        )
    if representation not in (0, 1):
        raise VolumeError(
            f"{name} has PixelRepresentation (0028,0103) {representation}; it must be 0 (unsigned) or 1 (signed), "
            "so whether its pixel values are negative cannot be told"
        )
    return stored, representation == 1


def _bits_held(dataset: Dataset, bits_stored: int) -> int:
    """How many bits of each pixel the data really holds: BitsAllocated for uncompressed and RLE data (every
    bit is stored), the compressed frames' own precision for JPEG, JPEG-LS and JPEG 2000 (the decoder gives
    values of that many bits); never fewer than BitsStored."""
    allocated = int(dataset.BitsAllocated)
    precision = stored_precision(dataset)
    return allocated if precision is None else max(bits_stored, min(precision, allocated))


def _check_stored_values(
    dataset: Dataset, pixels: np.ndarray, bits_stored: int, signed: bool, frame: _Frame
) -> tuple[np.ndarray, list[bool]]:
    """The pixels as BitsStored reads them, where they fit in BitsStored bits (signed ones: the bits above are
    copies of the sign, or, in a frame with no value below 0, all zero: written without sign extension, as
    DICOM allows), and for each frame whether it was read so, sign-extended here; else VolumeError naming the
    image. Reading only BitsStored bits of values that use more
    (a wrong BitsStored, or garbage in the bits above) would silently turn them into other HU values. Bits an
    embedded overlay uses (OverlayBitPosition, retired) are left out."""
    container = pixels.dtype.itemsize * 8
    planes = pixels.reshape(-1, pixels.shape[-2] * pixels.shape[-1])  # one row a frame
    unextended = [False] * len(planes)
    if pixels.dtype.kind not in "iu" or container <= bits_stored:
        return pixels, unextended
    needed = [_bits_needed(int(low), int(high), signed) for low, high in _extremes(planes)]
    overlay = _embedded_overlay_bits(dataset, bits_stored, container)
    kept = _keep_stored_bits(pixels, bits_stored) if overlay else pixels
    if overlay:  # above BitsStored, the bits but the overlay's must read as BitsStored reads them
        unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
        others = np.array(~overlay & ((1 << container) - 1), dtype=unsigned)
        changed = (planes.view(unsigned) ^ kept.reshape(planes.shape).view(unsigned)) & others
        wrong = changed.any(axis=1).tolist()
    else:
        wrong = [bits > bits_stored for bits in needed]
        if signed:  # a frame written without sign extension: no value below 0, none past BitsStored bits
            unextended = [int(low) >= 0 and int(high) < 1 << bits_stored for low, high in _extremes(planes)]
            wrong = [too_wide and not plain for too_wide, plain in zip(wrong, unextended, strict=True)]
            kept = _keep_stored_bits(pixels, bits_stored) if any(unextended) else pixels
    if any(wrong):
        index = wrong.index(True)
        raise VolumeError(_too_wide(frame, index, pixels.ndim == 3, needed[index], bits_stored, signed))
    return kept, unextended


EXCESS_PADDING = re.compile(
    r"The pixel data is \d+ bytes long, which indicates it contains (\d+) bytes of excess padding"
)
"""pydicom's warning for native pixel data longer than Rows x Columns x frames say."""


def _zero_padding_only(dataset: Dataset, warning: str) -> bool:
    """Whether ``warning`` is pydicom's about excess bytes after native pixel data, and those bytes are all zero
    (padding, safe to leave out). Non-zero ones may be a row or column the header does not count: the image read
    with the header's Rows and Columns would be sheared, so that warning still fails the series."""
    found = EXCESS_PADDING.match(warning)
    data = dataset.get("PixelData") if found else None
    if not isinstance(data, bytes) or not found:
        return False
    excess = int(found.group(1))
    return 0 < excess < len(data) and not any(data[-excess:])


def _extremes(planes: np.ndarray) -> list[tuple[int, int]]:
    """The lowest and highest value of each row (one frame a row)."""
    return list(zip(planes.min(axis=1).tolist(), planes.max(axis=1).tolist(), strict=True))


def _too_wide(frame: _Frame, index: int, multi_frame: bool, needed: int, bits_stored: int, signed: bool) -> str:
    """The reason for pixel values that need more bits than BitsStored, naming the image (and its frame)."""
    name = f"frame {index + 1} of {_instance_name(frame)}" if multi_frame else _image_name(frame)
    kind = "signed" if signed else "unsigned"
    return (
        f"{name} has {kind} pixel values that need {needed} bits, but its BitsStored (0028,0101) says {bits_stored}: "
        f"read with {bits_stored} bits they would become other, wrong HU values, so the series is not processed; "
        "correct BitsStored in the export, or send the scanner's original images"
    )


def _bits_needed(lowest: int, highest: int, signed: bool) -> int:
    """How many bits values from ``lowest`` to ``highest`` need: two's complement with a sign bit if ``signed``."""
    if not signed:
        return max(highest.bit_length(), 1)
    return max((value if value >= 0 else -value - 1).bit_length() + 1 for value in (lowest, highest))


def _keep_stored_bits(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """The pixels with only their BitsStored low bits (the sign extended from the highest of them if signed)."""
    shift = pixels.dtype.itemsize * 8 - bits_stored
    return np.right_shift(np.left_shift(pixels, shift), shift)


def _embedded_overlay_bits(dataset: Dataset, bits_stored: int, container: int) -> int:
    """The bits above BitsStored that embedded overlays use (an overlay group with OverlayBitPosition and no
    OverlayData of its own), as a mask; 0 where there are none."""
    mask = 0
    for group in range(0x6000, 0x6020, 2):
        position = dataset.get((group, 0x0102))
        if position is None or (group, 0x3000) in dataset:
            continue
        value = position.value
        if isinstance(value, int) and bits_stored <= value < container:
            mask |= 1 << value
    return mask


def rescale_source(dataset: Dataset, frame_number: int | None) -> tuple[Dataset, str]:
    """Where a frame's RescaleSlope/RescaleIntercept are read from, and where that is, in words.

    An enhanced image's frame: its per-frame Pixel Value Transformation item, else the shared one; any
    other image (and a frame with neither): the top level. Slope and intercept come from the same place.
    """
    if frame_number and "PerFrameFunctionalGroupsSequence" in dataset:
        groups = [("per-frame functional group", dataset.PerFrameFunctionalGroupsSequence[frame_number - 1])]
        groups += [("shared functional groups", group) for group in dataset.get("SharedFunctionalGroupsSequence", [])]
        for where, group in groups:
            items = group.get("PixelValueTransformationSequence")
            if items:
                return items[0], where
    return dataset, "top level"


def _rescale(dataset: Dataset, frame_number: int | None, name: str) -> tuple[float, float]:
    source, where = rescale_source(dataset, frame_number)
    slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
    if (slope is None) != (intercept is None):
        present, absent = (
            ("RescaleSlope", "RescaleIntercept") if intercept is None else ("RescaleIntercept", "RescaleSlope")
        )
        raise VolumeError(f"{name} has {present} but no {absent} ({where}); its pixel values cannot be read as HU")
    if slope is None:  # admission allowed it (admission.missing_rescale: assume_identity); noted on the job
        unusable = unusable_rescale(1.0, 0.0, dataset)
        if unusable is not None:
            raise VolumeError(f"{name} has no RescaleSlope, read as 1 ({where}); {unusable[1]}")
        return 1.0, 0.0
    unusable = unusable_rescale(float(slope), float(intercept), dataset)
    if unusable is not None:
        given, why = unusable
        raise VolumeError(f"{name} has {given} ({where}); {why}")
    return float(slope), float(intercept)


def unusable_rescale(slope: float, intercept: float, image: Dataset) -> tuple[str, str] | None:
    """Why a frame's RescaleSlope and RescaleIntercept cannot give CT values of ``image`` (its BitsStored and
    PixelRepresentation), or None: (the values at fault, as a reason names them; why). The slope must be positive
    and span air to water (:func:`narrow_rescale`); the values the pixels can take must reach air and water
    (:func:`hu_range_problem`). Admission and the volume reader refuse with the same words."""
    bits = image.get("BitsStored")
    if slope <= 0:
        return f"RescaleSlope {slope:g}", NON_POSITIVE_SLOPE
    narrow = narrow_rescale(slope, bits)
    if narrow is not None:
        return f"RescaleSlope {slope:g}", narrow
    out_of_range = hu_range_problem(slope, intercept, bits, image.get("PixelRepresentation"))
    if out_of_range is not None:
        return f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g}", out_of_range
    return None


def hu_range_problem(slope: float, intercept: float, bits_stored: object, pixel_representation: object) -> str | None:
    """Why a positive RescaleSlope and its RescaleIntercept cannot give CT values, or None: the values the pixels
    can take must reach down to air and up to water."""
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 32:
        return None  # checked, and named, by admission
    signed = pixel_representation == 1
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    lowest, highest = intercept + slope * low, intercept + slope * high
    kind = f"{'signed' if signed else 'unsigned'} {bits_stored}-bit pixels"
    if lowest > AIR_CEILING_HU:
        return (
            f"with {kind} its values start at {lowest:,.0f} HU, so it cannot show air ({AIR_CEILING_HU:,.0f} HU or "
            "below, around every patient): these are not Hounsfield units (a wrong RescaleIntercept, or "
            "PixelRepresentation); send the scanner's original reconstruction"
        )
    if highest < 0:
        return (
            f"with {kind} its values end at {highest:,.0f} HU, so it cannot show water (0 HU): these are not "
            "Hounsfield units (a wrong RescaleIntercept, or PixelRepresentation); send the scanner's original "
            "reconstruction"
        )
    return None


def narrow_rescale(slope: float, bits_stored: object) -> str | None:
    """Why a positive RescaleSlope is too small for a CT (its pixel values could not span air to water), or None."""
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 32:
        return None  # checked, and named, by admission
    span = slope * (2**bits_stored - 1)
    if span >= MINIMUM_HU_SPAN:
        return None
    return (
        f"with BitsStored {bits_stored} its pixel values span at most {span:.3g} HU, less than the "
        f"{MINIMUM_HU_SPAN:,.0f} HU from air to water that every CT holds, so these images cannot hold CT values "
        "(a wrong rescale, or an 8-bit export): send the scanner's original reconstruction"
    )


MINIMUM_HU_SPAN = 1000.0
"""Air (-1000 HU) to water (0 HU): every CT's pixel values can span this, whatever the scanner's scale."""
NON_POSITIVE_SLOPE = "CT values rise with density, so the slope must be positive: its pixel values cannot be read as HU"
