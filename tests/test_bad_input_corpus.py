"""The bad-input corpus: generated broken (and valid) CT series sent to a real running node.

Every case is built from a small valid phantom series, mutated one way, sent with DCMTK
``storescu`` (raw pynetdicom where storescu would refuse to read the file), and checked
for the C-STORE statuses, the series' final state and the exact reason. Refusals that
headers allow must happen before inference: a refused series' history is RECEIVING ->
COMPLETE -> FAILED, never PROCESSING. Two nodes take every case at once (strict defaults,
and one with the lenient admission settings and small limits), so the whole file runs in
about a minute.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from db.models import JobEvent, JobState, RejectedInstance, Series
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, Node, require_tool, send_file_raw, storescu, wait_for

QUIET_SECONDS = 1.0
EXPECTED_COUNT_TIMEOUT_SECONDS = 12.0  # well beyond the 4 s pause, whatever the load
SUCCESS, CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0x0000, 0xC000, 0xA900
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

Mutation = Callable[[list[Dataset]], None]


@dataclass
class Case:
    """One corpus entry: how the valid series is broken and what the node must do with it."""

    name: str
    mutate: Mutation | None = None
    state: JobState | None = JobState.QUEUED  # None: no series at all (every instance refused)
    reason: str | None = None  # exact job reason, or a regex when it starts with "re:"
    statuses: list[int] | None = None  # C-STORE statuses in sending order; default all Success
    refusal: str | None = None  # exact rejected_instances reason of the refused instances
    warnings: list[str] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    node: str = "strict"
    raw: bytes | None = None  # junk: this data set is sent instead of the series (pynetdicom)
    hidden: tuple[str, ...] = ()  # text that must not reach the log (patient identifiers)
    options: tuple[str, ...] = ()  # storescu options: which transfer syntax to propose
    rewrite: Callable[[Path], None] | None = None  # each saved file changed as bytes, where pydicom will not write it


def each(change: Callable[[Dataset], None]) -> Mutation:
    return lambda datasets: [change(ds) for ds in datasets] and None


def nth(index: int, change: Callable[[Dataset], None]) -> Mutation:
    return lambda datasets: change(datasets[index])


def setting(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return change


def put_raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Store ``text`` as the element's encoded value, unchecked, as a broken modality would write it."""
    value = text.encode("latin-1")
    value += b" " * (len(value) % 2)
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def raw_value(keyword: str, vr: str, text: str) -> Callable[[Dataset], None]:
    return lambda ds: put_raw(ds, keyword, vr, text)


def removed(keyword: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        if keyword in ds:
            del ds[keyword]

    return change


def shared_group(sequence: str, keyword: str, vr: str, text: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        put_raw(ds.SharedFunctionalGroupsSequence[0][sequence][0], keyword, vr, text)

    return change


def same_position(datasets: list[Dataset]) -> None:
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient


def by_position(datasets: list[Dataset]) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def drifting_steps(datasets: list[Dataset]) -> None:
    """Five steps of 1.5 mm, then 1.62 mm ones: each within 10 % of the median step, but adding up."""
    ordered = by_position(datasets)
    z = float(ordered[0].ImagePositionPatient[2])
    for index, ds in enumerate(ordered):
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{z:.3f}"]
        z += 1.5 if index < 5 else 1.62


def middle_slice_shifted(datasets: list[Dataset]) -> None:
    """The second slice by position moved 2 mm to the patient's left (2.5 pixels)."""
    ds = by_position(datasets)[1]
    x, y, z = ds.ImagePositionPatient
    ds.ImagePositionPatient = [f"{float(x) + 2.0:.3f}", y, z]


def mr_image(ds: Dataset) -> None:
    """An MR image (its SOP class and Modality) among CT images."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"


def secondary_capture(ds: Dataset) -> None:
    """A dose screen among the CT images: Secondary Capture, Modality CT, its pixels and geometry kept."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage


def truncated_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def eight_bit(ds: Dataset) -> None:
    """16 HU per stored value: 8 bits span -1024 to 3056 HU, as an 8-bit CT export would."""
    pixels = np.frombuffer(ds.PixelData, dtype=np.int16)  # stored = HU + 1024
    ds.PixelData = (pixels // 16).clip(0, 255).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = "16", "-1024"


def thirty_two_bit(ds: Dataset) -> None:
    ds.PixelData = np.frombuffer(ds.PixelData, dtype=np.int16).astype(np.int32).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31


def rgb(ds: Dataset) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)


def smaller_matrix(ds: Dataset) -> None:
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.frombuffer(ds.PixelData, dtype=np.int16).reshape(16, 16)[::2, ::2].tobytes()


def no_rescale(ds: Dataset) -> None:
    del ds.RescaleSlope, ds.RescaleIntercept


def frame_without_position(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence


def japanese(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"


def in_utf8(keyword: str, value: str) -> Callable[[Dataset], None]:
    """``keyword`` set to ``value`` in a data set declaring UTF-8 (ISO_IR 192)."""

    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        setattr(ds, keyword, value)

    return change


def scripts_as_written(ds: Dataset) -> None:
    """A Persian issuer with its joiner (ZWNJ), a Thai name with its word break (ZWSP), in UTF-8."""
    in_utf8("IssuerOfPatientID", "\u0628\u06cc\u0645\u0627\u0631\u0633\u062a\u0627\u0646\u200c\u0647\u0627")(ds)
    in_utf8("PatientName", "\u0e2a\u0e21\u0e0a\u0e32\u0e22\u200b^\u0e43\u0e08\u0e14\u0e35")(ds)


REORDERING_REFUSED = (
    "holds an invisible character that changes how the text reads (a right-to-left override, zero-width space or "
    "similar), so it could show as another patient's; no ID or name may hold one; the sender must correct it"
)


def unencapsulated(path: Path) -> None:
    """The file's compressed codestream written as one Pixel Data value of defined length, under its compressed
    transfer syntax still, as a broken converter writes it (pydicom refuses to write that)."""
    dataset = pydicom.dcmread(path)
    (codestream,) = generate_frames(dataset.PixelData, number_of_frames=1)
    dataset["PixelData"] = DataElement(0x7FE00010, "OB", codestream + b"\0" * (len(codestream) % 2))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, dataset.file_meta)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue())


def one_number_and_another_patient(datasets: list[Dataset]) -> None:
    """Every image says InstanceNumber 1 (as some converters write), and the third another PatientID."""
    for dataset in datasets:
        dataset.InstanceNumber = 1
    datasets[2].PatientID = "OTHER-PATIENT-ID"


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def not_admitted(text: str) -> str:
    return f"not admitted: {text}"


CASES: list[Case] = [
    # --- valid variants: admitted and queued ---------------------------------------------------
    Case("valid_series_is_queued"),
    Case("valid_enhanced_ct_is_queued", spec={"enhanced": True}),
    Case("valid_implicit_vr_is_queued", spec={"compression": "implicit"}),
    Case("valid_deflated_is_queued", spec={"compression": "deflate"}, options=("-xd",)),
    Case("valid_jpeg2000_is_queued", spec={"compression": "jpeg2000", "rows": 64, "columns": 64}, options=("-xv",)),
    Case("valid_jpeg_ls_is_queued", spec={"compression": "jpegls"}, options=("-xt",)),
    Case("valid_series_with_localizer_is_queued", spec={"add_localizer": True}),
    Case("valid_monochrome1_is_queued", each(setting("PhotometricInterpretation", "MONOCHROME1"))),
    Case("valid_8_bit_pixels_are_queued", each(eight_bit)),
    Case("valid_32_bit_pixels_are_queued", each(thirty_two_bit)),
    Case("valid_japanese_character_set_is_queued", each(japanese)),
    Case("unknown_character_set_is_queued", each(setting("SpecificCharacterSet", "ISO_IR 999"))),
    Case("padded_decimal_strings_are_queued", each(raw_value("PixelSpacing", "DS", " 0.8 \\0.80 "))),
    Case("text_slice_thickness_is_queued", each(raw_value("SliceThickness", "DS", "thin"))),
    Case("long_series_description_is_stored_shortened", each(setting("SeriesDescription", "D" * 100))),
    # --- identity: one patient, one study per series ------------------------------------------
    Case(
        "an_image_labelled_mr_in_a_ct_series_is_refused",
        nth(2, setting("Modality", "MR")),
        JobState.FAILED,
        not_admitted(
            "Modality differs within the series: 1 of 4 instances (first: instance 3, Modality MR, CT Image Storage) are not CT, as the series is; "
            "one series holds images of one modality, so the sender must correct it"
        ),
    ),
    Case(
        "an_mr_image_sent_first_in_a_ct_series_is_refused_alike",
        nth(0, mr_image),
        JobState.FAILED,
        not_admitted(
            "Modality differs within the series: 1 of 4 instances (first: instance 1, Modality MR, MR Image Storage) are not CT, as the series is; "
            "one series holds images of one modality, so the sender must correct it"
        ),
    ),
    Case(
        "a_secondary_capture_among_ct_images_is_refused_naming_it",
        nth(3, secondary_capture),
        JobState.FAILED,
        not_admitted(
            "the series holds 1 instance(s) that are not CT images (Secondary Capture Image Storage; first: instance "
            "4) beside 3 CT images; a CT series is processed only when it holds CT images alone, so the sender must "
            "send the other objects as a series of their own"
        ),
    ),
    Case(
        "an_instance_among_images_of_one_instancenumber_is_named_by_its_uid",
        one_number_and_another_patient,
        JobState.FAILED,
        "re:"
        + re.escape(
            "not admitted: PatientID differs within the series: 1 of 4 instances (first: instance 1 (SOP Instance UID "
        )
        + r"[0-9.]+\)\) carry another value than the rest; one series must hold one patient$",
        hidden=("OTHER-PATIENT-ID",),
    ),
    Case(
        "two_patient_ids_are_refused",
        nth(2, setting("PatientID", "OTHER-PATIENT-ID")),
        JobState.FAILED,
        not_admitted(
            "PatientID differs within the series: 1 of 4 instances (first: instance 3) carry another value "
            "than the rest; one series must hold one patient"
        ),
        hidden=("OTHER-PATIENT-ID",),
    ),
    Case(
        "a_patient_id_with_a_trailing_tab_is_refused_for_what_it_is",
        each(raw_value("PatientID", "LO", "P1\t")),
        JobState.FAILED,
        not_admitted(
            "PatientID of instance 1 holds a control character (a tab, line break or similar), which no ID or name "
            "may hold; the sender must correct it"
        ),
    ),
    Case(
        "a_patient_id_of_only_line_breaks_is_refused",
        each(raw_value("PatientID", "LO", "\r\n")),
        JobState.FAILED,
        not_admitted(
            "PatientID of instance 1 holds a control character (a tab, line break or similar), which no ID or name "
            "may hold; the sender must correct it"
        ),
    ),
    Case(
        "a_patient_id_that_reads_as_another_is_refused",
        each(in_utf8("PatientID", "\u202e4321-NRM")),  # shown as MRN-1234
        JobState.FAILED,
        not_admitted(f"PatientID of instance 1 {REORDERING_REFUSED}"),
    ),
    Case(
        "a_patient_name_that_reads_as_another_is_refused",
        each(in_utf8("PatientName", "\u202eEOD^NHOJ")),  # shown as JOHN^DOE
        JobState.FAILED,
        not_admitted(f"PatientName of instance 1 {REORDERING_REFUSED}"),
    ),
    Case(
        "a_name_written_with_a_joiner_is_queued",
        each(in_utf8("PatientName", "\u0645\u06cc\u200c\u0631\u0627^\u0632\u0647\u0631\u0627")),
    ),
    Case(  # a Persian issuer with its joiner, a Thai name with its word break: scripts as written, not refused
        "an_issuer_with_a_joiner_and_a_name_with_a_word_break_are_queued",
        each(scripts_as_written),
    ),
    Case(
        "two_patient_ids_in_one_value_are_refused",
        each(raw_value("PatientID", "LO", "PAT-A1\\PAT-B2")),
        JobState.FAILED,
        not_admitted("PatientID of instance 1 has 2 values, where one patient has one; the sender must correct it"),
        hidden=("PAT-A1", "PAT-B2"),
    ),
    Case(
        "two_patient_names_in_one_value_are_refused_before_inference",
        each(raw_value("PatientName", "PN", "Doe^John\\Roe^Jane")),
        JobState.FAILED,
        not_admitted("PatientName of instance 1 has 2 values, where one patient has one; the sender must correct it"),
        hidden=("Roe^Jane",),
    ),
    Case(
        "two_patient_names_are_refused",
        nth(0, setting("PatientName", "Other^Person")),
        JobState.FAILED,
        not_admitted(
            "PatientName differs within the series: 1 of 4 instances (first: instance 1) carry another value "
            "than the rest; one series must hold one patient"
        ),
        hidden=("Other^Person",),
    ),
    Case(
        "two_birth_dates_are_refused",
        nth(1, setting("PatientBirthDate", "19800101")),
        JobState.FAILED,
        not_admitted(
            "PatientBirthDate differs within the series: 1 of 4 instances (first: instance 2) carry another "
            "value than the rest; one series must hold one patient"
        ),
    ),
    Case(
        "patient_id_missing_from_one_instance_is_refused",
        nth(3, removed("PatientID")),
        JobState.FAILED,
        not_admitted("1 of 4 instances have no PatientID (first: instance 4); a result must name its patient"),
    ),
    Case(
        "two_studies_are_refused",
        nth(1, setting("StudyInstanceUID", generate_uid())),
        JobState.FAILED,
        not_admitted(
            "StudyInstanceUID differs within the series: 1 of 4 instances (first: instance 2) carry another "
            "value than the rest; one series must hold one study"
        ),
    ),
    # --- geometry -------------------------------------------------------------------------------
    Case(
        "two_frames_of_reference_are_refused",
        nth(3, setting("FrameOfReferenceUID", generate_uid())),
        JobState.FAILED,
        not_admitted(
            "the series has 2 different FrameOfReferenceUIDs; its images do not share one coordinate system, "
            "so they cannot make one volume"
        ),
    ),
    Case(
        "missing_frame_of_reference_is_refused",
        nth(1, removed("FrameOfReferenceUID")),
        JobState.FAILED,
        not_admitted("1 of 4 images have no FrameOfReferenceUID (first: instance 2)"),
    ),
    Case(
        "two_orientations_are_refused",
        nth(1, setting("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"])),
        JobState.FAILED,
        not_admitted(
            "the series has 2 different ImageOrientationPatient values (first differing: instance 2); "
            "one volume needs one orientation"
        ),
    ),
    Case(
        "degenerate_orientation_is_refused",
        each(setting("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"])),
        JobState.FAILED,
        not_admitted(
            "ImageOrientationPatient of instance 1 does not describe a plane (its two directions are degenerate)"
        ),
    ),
    Case(
        "nan_position_is_refused",
        nth(2, raw_value("ImagePositionPatient", "DS", "NaN\\0\\0")),
        JobState.FAILED,
        not_admitted("ImagePositionPatient of instance 3 is not a finite number ('NaN')"),
    ),
    Case(
        "infinite_position_is_refused",
        nth(0, raw_value("ImagePositionPatient", "DS", "0\\-inf\\0")),
        JobState.FAILED,
        not_admitted("ImagePositionPatient of instance 1 is not a finite number ('-inf')"),
    ),
    Case(
        "position_with_two_values_is_refused",
        nth(1, raw_value("ImagePositionPatient", "DS", "0\\0")),
        JobState.FAILED,
        not_admitted("ImagePositionPatient of instance 2 has 2 value(s), not 3"),
    ),
    Case(
        "text_position_is_refused",
        nth(0, raw_value("ImagePositionPatient", "DS", "abc\\0\\0")),
        JobState.FAILED,
        not_admitted("ImagePositionPatient of instance 1 is not a number ('abc')"),
    ),
    Case(
        "text_orientation_is_refused",
        nth(3, raw_value("ImageOrientationPatient", "DS", "1\\0\\0\\0\\one\\0")),
        JobState.FAILED,
        not_admitted("ImageOrientationPatient of instance 4 is not a number ('one')"),
    ),
    Case(
        "missing_position_is_refused",
        nth(2, removed("ImagePositionPatient")),
        JobState.FAILED,
        not_admitted("instance 3 has no ImagePositionPatient"),
    ),
    Case(
        "missing_pixel_spacing_is_refused",
        each(removed("PixelSpacing")),
        JobState.FAILED,
        not_admitted("instance 1 has no PixelSpacing"),
    ),
    Case(
        "text_pixel_spacing_is_refused",
        nth(1, raw_value("PixelSpacing", "DS", "abc\\abc")),
        JobState.FAILED,
        not_admitted("PixelSpacing of instance 2 is not a number ('abc')"),
    ),
    Case(
        "decimal_comma_pixel_spacing_is_refused",
        each(raw_value("PixelSpacing", "DS", "0,8\\0,8")),
        JobState.FAILED,
        not_admitted("PixelSpacing of instance 1 is not a number ('0,8')"),
    ),
    Case(
        "zero_pixel_spacing_is_refused",
        each(raw_value("PixelSpacing", "DS", "0\\0")),
        JobState.FAILED,
        not_admitted("PixelSpacing of instance 1 is not positive (0 x 0 mm)"),
    ),
    Case(
        "negative_pixel_spacing_is_refused",
        nth(3, raw_value("PixelSpacing", "DS", "-0.8\\-0.8")),
        JobState.FAILED,
        not_admitted("PixelSpacing of instance 4 is not positive (-0.8 x -0.8 mm)"),
    ),
    Case(
        "pixel_spacing_with_one_value_is_refused",
        nth(0, raw_value("PixelSpacing", "DS", "0.8")),
        JobState.FAILED,
        not_admitted("PixelSpacing of instance 1 has 1 value(s), not 2"),
    ),
    Case(
        "single_image_is_refused",
        spec={"slices": 1},
        state=JobState.FAILED,
        reason=not_admitted("the series has a single image; a volume needs at least two slices"),
    ),
    Case(
        "mixed_matrix_sizes_are_refused",
        nth(3, smaller_matrix),
        JobState.FAILED,
        not_admitted(
            "the series mixes matrix sizes or pixel spacings (3 of 16 x 16 at 0.8 x 0.8 mm; 1 of 8 x 8 at "
            "0.8 x 0.8 mm); refused (admission.mixed_series: refuse)"
        ),
    ),
    Case(
        "mixed_pixel_spacings_are_refused",
        nth(0, raw_value("PixelSpacing", "DS", "0.5\\0.5")),
        JobState.FAILED,
        not_admitted(
            "the series mixes matrix sizes or pixel spacings (3 of 16 x 16 at 0.8 x 0.8 mm; 1 of 16 x 16 at "
            "0.5 x 0.5 mm); refused (admission.mixed_series: refuse)"
        ),
    ),
    Case(
        "enhanced_frame_without_position_is_refused",
        each(frame_without_position),
        JobState.FAILED,
        not_admitted("frame 2 of instance 1 has no ImagePositionPatient"),
        spec={"enhanced": True},
    ),
    Case(
        "enhanced_text_pixel_spacing_is_refused",
        each(shared_group("PixelMeasuresSequence", "PixelSpacing", "DS", "x\\0.8")),
        JobState.FAILED,
        not_admitted("PixelSpacing of frame 1 of instance 1 is not a number ('x')"),
        spec={"enhanced": True},
    ),
    Case(
        "missing_slice_is_refused",
        spec={"slices": 6, "gaps": (2,)},
        state=JobState.FAILED,
        reason=not_admitted(
            "about 1 missing slice(s): slices 2 and 3 (by position: instance 2 and instance 4) are 3.00 mm apart, "
            "the series' usual step is 1.50 mm"
        ),
    ),
    Case(
        "duplicate_slice_position_is_refused",
        same_position,
        JobState.FAILED,
        not_admitted(
            "1 slice position(s) occur twice in one acquisition: instance 1 and instance 2 are both at "
            "ImagePositionPatient (-6.00, -6.00, -2.25)"
        ),
    ),
    Case(
        "gantry_tilt_is_refused",
        spec={"gantry_tilt_degrees": 10.0},
        state=JobState.FAILED,
        reason=not_admitted(
            "gantry tilt of about 10.0 degrees (slices are sheared): not resampled; reconstruct the series "
            "without tilt on the scanner and send it again"
        ),
    ),
    Case(
        "uneven_steps_that_add_up_are_refused",
        drifting_steps,
        JobState.FAILED,
        not_admitted(
            "non-uniform spacing: slice 6 (by position) lies 0.33 mm from where a regular stack of 1.565 mm steps "
            "puts it (more than 0.16 mm): the uneven steps add up, and volumes and contours would be wrong"
        ),
        spec={"slices": 12},
    ),
    Case(
        "a_shifted_middle_slice_is_refused",
        middle_slice_shifted,
        JobState.FAILED,
        not_admitted(
            "slices are not stacked straight: slice 2 (by position) lies 2.00 mm beside the axis through the first "
            "slice along the slice normal (more than 0.40 mm); a sheared or shifted stack is not resampled: "
            "reconstruct the series on the scanner and send it again"
        ),
    ),
    Case(
        "a_slight_tilt_over_a_long_stack_is_refused",
        spec={"slices": 40, "slice_spacing": 5.0, "gantry_tilt_degrees": 0.3},
        state=JobState.FAILED,
        reason=not_admitted(
            "slices are not stacked straight: slice 40 (by position) lies 1.02 mm beside the axis through the first "
            "slice along the slice normal (more than 0.40 mm); a sheared or shifted stack is not resampled: "
            "reconstruct the series on the scanner and send it again"
        ),
    ),
    Case("two_acquisitions_are_left_to_the_volume_assembler", nth(0, setting("AcquisitionNumber", 2))),
    Case(
        "only_localizers_are_ignored",
        each(setting("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"])),
        JobState.IGNORED,
        "not processed: series is a localizer (ImageType LOCALIZER)",
    ),
    # --- pixel module ---------------------------------------------------------------------------
    Case(
        "rgb_ct_is_refused",
        each(rgb),
        JobState.FAILED,
        not_admitted("SamplesPerPixel of instance 1 is 3; CT images have 1 (grayscale)"),
    ),
    Case(
        "palette_color_ct_is_refused",
        each(setting("PhotometricInterpretation", "PALETTE COLOR")),
        JobState.FAILED,
        not_admitted(
            "PhotometricInterpretation of instance 1 is 'PALETTE COLOR'; CT images are MONOCHROME1 or MONOCHROME2"
        ),
    ),
    Case(
        "twelve_bits_allocated_is_refused",
        each(lambda ds: (setattr(ds, "BitsAllocated", 12), setattr(ds, "BitsStored", 12), setattr(ds, "HighBit", 11))),
        JobState.FAILED,
        not_admitted("BitsAllocated of instance 1 is 12; only 8, 16 or 32 are processed"),
    ),
    Case(
        "bits_stored_over_bits_allocated_is_refused",
        nth(2, setting("BitsStored", 20)),
        JobState.FAILED,
        not_admitted("BitsStored of instance 3 is 20, not between 1 and BitsAllocated (16)"),
    ),
    Case(
        "wrong_high_bit_is_refused",
        each(setting("HighBit", 7)),
        JobState.FAILED,
        not_admitted("HighBit of instance 1 is 7; with BitsStored 16 it must be 15"),
    ),
    Case(
        "zero_rows_are_refused",
        each(setting("Rows", 0)),
        JobState.FAILED,
        not_admitted("Rows of instance 1 is 0"),
    ),
    Case(
        "zero_rescale_slope_is_refused",
        nth(1, raw_value("RescaleSlope", "DS", "0")),
        JobState.FAILED,
        not_admitted("RescaleSlope of instance 2 is 0: every pixel would have the same value"),
    ),
    Case(
        "negative_rescale_slope_is_refused",
        nth(1, raw_value("RescaleSlope", "DS", "-1")),
        JobState.FAILED,
        not_admitted(
            "instance 2 has RescaleSlope -1 (top level); CT values rise with density, so the slope must be "
            "positive: its pixel values cannot be read as HU"
        ),
    ),
    Case(
        "rescale_slope_too_small_for_any_ct_is_refused",
        nth(1, raw_value("RescaleSlope", "DS", "0.000001")),
        JobState.FAILED,
        not_admitted(
            "instance 2 has RescaleSlope 1e-06 (top level); with BitsStored 16 its pixel values span at most "
            "0.0655 HU, less than the 1,000 HU from air to water that every CT holds, so these images cannot hold "
            "CT values (a wrong rescale, or an 8-bit export): send the scanner's original reconstruction"
        ),
    ),
    Case(
        "rescale_intercept_whose_values_cannot_show_air_is_refused",
        nth(1, raw_value("RescaleIntercept", "DS", "40000")),
        JobState.FAILED,
        not_admitted(
            "instance 2 has RescaleSlope 1 and RescaleIntercept 40000 (top level); with signed 16-bit pixels its "
            "values start at 7,232 HU, so it cannot show air (-1,000 HU or below, around every patient): these are "
            "not Hounsfield units (a wrong RescaleIntercept, or PixelRepresentation); send the scanner's original "
            "reconstruction"
        ),
    ),
    Case(
        "padding_value_that_reads_as_tissue_is_refused",
        nth(1, lambda ds: ds.add_new("PixelPaddingValue", "SS", 1024)),
        JobState.FAILED,
        not_admitted(
            "instance 2: its padding (PixelPaddingValue 1024) reads as 0 HU, a value of the patient's tissue: those "
            "pixels would be taken for the area outside the field and read as air; correct the padding value in "
            "the export"
        ),
    ),
    Case(
        "study_date_that_is_no_date_is_refused",
        each(raw_value("StudyDate", "DA", "20240230")),
        JobState.FAILED,
        not_admitted(
            "StudyDate of instance 1 is not a date in the DICOM form YYYYMMDD; the results carry it, so the sender "
            "(or the RIS) must correct it"
        ),
    ),
    Case(
        "patient_sex_the_results_cannot_carry_is_refused",
        each(raw_value("PatientSex", "CS", "QQ")),
        JobState.FAILED,
        not_admitted(
            "PatientSex of instance 1 is not M, F, O or empty; the results carry it, so the sender (or the RIS) "
            "must correct it"
        ),
    ),
    Case(
        "eight_bit_pixels_read_as_hu_are_refused",
        each(lambda ds: (eight_bit(ds), setattr(ds, "RescaleSlope", "1"))),
        JobState.FAILED,
        not_admitted(
            "instance 1 has RescaleSlope 1 (top level); with BitsStored 8 its pixel values span at most 255 HU, "
            "less than the 1,000 HU from air to water that every CT holds, so these images cannot hold CT values "
            "(a wrong rescale, or an 8-bit export): send the scanner's original reconstruction"
        ),
    ),
    Case(
        "missing_rescale_is_refused",
        each(no_rescale),
        JobState.FAILED,
        not_admitted(
            "instance 1 has no RescaleSlope/RescaleIntercept, so its pixel values cannot be read as HU "
            "(admission.missing_rescale: refuse)"
        ),
    ),
    Case(
        "text_rescale_slope_is_refused",
        nth(3, raw_value("RescaleSlope", "DS", "abc")),
        JobState.FAILED,
        not_admitted("RescaleSlope of instance 4 is not a number ('abc')"),
    ),
    Case(
        "nan_rescale_intercept_is_refused",
        nth(0, raw_value("RescaleIntercept", "DS", "nan")),
        JobState.FAILED,
        not_admitted("RescaleIntercept of instance 1 is not a finite number ('nan')"),
    ),
    Case(
        "enhanced_zero_rescale_slope_is_refused",
        each(shared_group("PixelValueTransformationSequence", "RescaleSlope", "DS", "0")),
        JobState.FAILED,
        not_admitted("RescaleSlope of frame 1 of instance 1 is 0: every pixel would have the same value"),
        spec={"enhanced": True},
    ),
    # --- pixel data checked at C-STORE ------------------------------------------------------------
    Case(
        "truncated_pixel_data_is_refused_at_store",
        each(truncated_pixels),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
    ),
    Case(
        "truncated_implicit_vr_pixel_data_is_refused_at_store",
        each(truncated_pixels),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
        spec={"compression": "implicit"},
    ),
    Case(
        "truncated_deflated_pixel_data_is_refused_at_store",
        each(truncated_pixels),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
        spec={"compression": "deflate"},
        options=("-xd",),
    ),
    Case(
        "missing_pixel_data_is_refused_at_store",
        each(removed("PixelData")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="image has no Pixel Data (its header declares Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
    ),
    Case(
        "compressed_pixel_data_not_encapsulated_is_refused_at_store",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Pixel Data is not encapsulated as its transfer syntax JPEG 2000 Image Compression (Lossless Only) "
        "requires (it is one value of defined length, not compressed fragments), so its frames cannot be found; the "
        "image was refused, ask the sender to send it again",
        spec={"compression": "jpeg2000", "rows": 64, "columns": 64},
        rewrite=unencapsulated,
    ),
    Case(
        "huge_declared_matrix_is_refused_at_store",
        each(lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535))),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Pixel Data is truncated: 512 of 8589672450 bytes (Rows 65535 x Columns 65535 x "
        "SamplesPerPixel 1 x BitsAllocated 16 x 1 frame(s))",
    ),
    Case(
        "enhanced_frames_beyond_pixel_data_are_refused_at_store",
        each(setting("NumberOfFrames", 400)),
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="Pixel Data is truncated: 2048 of 204800 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 400 frame(s))",
        spec={"enhanced": True},
    ),
    Case(
        "text_number_of_frames_is_refused_at_store",
        each(raw_value("NumberOfFrames", "IS", "many")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="NumberOfFrames is not a whole number ('many')",
    ),
    Case(
        "one_truncated_instance_leaves_a_partial_series",
        nth(3, truncated_pixels),  # the last slice: the three others still make a regular stack
        JobState.QUEUED,
        statuses=[SUCCESS, SUCCESS, SUCCESS, CANNOT_UNDERSTAND],
        refusal="Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
        warnings=[
            r"re:partial series: 1 image\(s\) sent for this series were refused or set aside on receipt and are not "
            r"in it; the result covers the 3 stored \(first, SOP Instance UID [0-9.]+: Pixel Data is truncated: 256 "
            r"of 512 bytes \(Rows 16 x Columns 16 x SamplesPerPixel 1 x BitsAllocated 16 x 1 frame\(s\)\)\)$"
        ],
    ),
    Case(
        "one_truncated_middle_instance_leaves_a_gap_that_is_refused",
        nth(1, truncated_pixels),
        JobState.FAILED,
        not_admitted(
            "non-uniform spacing: slices 1 and 2 (by position: instance 1 and instance 3) are 3.00 mm apart, the "
            "series' usual step is 2.25 mm"
        ),
        statuses=[SUCCESS, CANNOT_UNDERSTAND, SUCCESS, SUCCESS],
        refusal="Pixel Data is truncated: 256 of 512 bytes (Rows 16 x Columns 16 x SamplesPerPixel 1 x "
        "BitsAllocated 16 x 1 frame(s))",
        warnings=[
            r"re:partial series: 1 image\(s\) sent for this series were refused or set aside on receipt and are not "
            r"in it; the result covers the 3 stored \(first, SOP Instance UID [0-9.]+: Pixel Data is truncated: 256 "
            r"of 512 bytes \(Rows 16 x Columns 16 x SamplesPerPixel 1 x BitsAllocated 16 x 1 frame\(s\)\)\)$"
        ],
    ),
    # --- values the database cannot hold, refused at C-STORE --------------------------------------
    Case(
        "huge_series_number_is_refused_at_store",
        each(raw_value("SeriesNumber", "IS", "99999999999999999999")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="SeriesNumber '99999999999999999999' is out of range: integer strings hold at most 2147483647",
    ),
    Case(
        "huge_negative_instance_number_is_refused_at_store",
        each(raw_value("InstanceNumber", "IS", "-3000000000")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="InstanceNumber '-3000000000' is out of range: integer strings hold at most 2147483647",
    ),
    Case(
        "huge_images_in_acquisition_is_refused_at_store",
        each(raw_value("ImagesInAcquisition", "IS", "1000000000000")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="ImagesInAcquisition '1000000000000' is out of range: integer strings hold at most 2147483647",
    ),
    Case(
        "long_accession_number_is_refused_at_store",
        each(raw_value("AccessionNumber", "SH", "A" * 20)),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="AccessionNumber is 20 characters long; at most 16 are accepted",
        hidden=("A" * 20,),
    ),
    Case(
        "long_patient_sex_is_refused_at_store",
        each(raw_value("PatientSex", "CS", "UNKNOWN OR OTHER X")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="PatientSex is 18 characters long; at most 16 are accepted",
        hidden=("UNKNOWN OR OTHER X",),
    ),
    Case(
        "long_modality_is_refused_at_store",
        each(raw_value("Modality", "CS", "COMPUTEDTOMOGRAPHY")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="Modality is 18 characters long ('COMPUTEDTOMOGRAPHY'); at most 16 are accepted",
    ),
    Case(
        "old_style_study_date_is_refused_at_store",
        each(raw_value("StudyDate", "DA", "2020.01.01")),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="StudyDate is 10 characters long; at most 8 are accepted",
        hidden=("2020.01.01",),
    ),
    Case(
        "long_patient_id_is_refused_without_showing_it",
        each(raw_value("PatientID", "LO", "P" * 70)),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="PatientID is 70 characters long; at most 64 are accepted",
        hidden=("P" * 70,),
    ),
    Case(
        "long_study_id_is_refused_at_store",
        each(raw_value("StudyID", "SH", "S" * 17)),
        None,
        statuses=[CANNOT_UNDERSTAND] * 4,
        refusal="StudyID is 17 characters long; at most 16 are accepted",
        hidden=("S" * 17,),
    ),
    Case(
        "invalid_series_uid_is_refused_at_store",
        each(raw_value("SeriesInstanceUID", "UI", "1.2.abc")),
        None,
        statuses=[DOES_NOT_MATCH] * 4,
        refusal="SeriesInstanceUID '1.2.abc' is not a valid UID",
    ),
    # --- junk sent as a data set (raw pynetdicom) --------------------------------------------------
    Case(
        "random_bytes_are_not_a_data_set",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="re:^not a DICOM data set: (no preamble/meta, no recognisable element|its elements cannot be "
        "decoded as Explicit VR Little Endian)$",
        raw=random_bytes(9, 4000),
    ),
    Case(
        "zero_bytes_are_not_a_data_set",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="not a DICOM data set: no preamble/meta, no recognisable element",
        raw=bytes(600),
    ),
    Case(
        "text_is_not_a_data_set",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="re:^not a DICOM data set: (no preamble/meta, no recognisable element|its elements cannot be "
        "decoded as Explicit VR Little Endian)$",
        raw=b"Patient report: nothing to see here.\n" * 20,
    ),
    Case(
        "empty_data_set_is_refused",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="not a DICOM data set: it is empty (0 bytes)",
        raw=b"",
    ),
    Case(
        "whole_file_sent_as_data_set_is_refused",
        None,
        None,
        statuses=[CANNOT_UNDERSTAND],
        refusal="not a DICOM data set: it starts with a file preamble and meta header (a whole file was sent "
        "as the data set)",
        raw=b"FILE",  # replaced by a whole phantom file when built
    ),
    # --- the lenient node: mixed series and missing rescale admitted with warnings; small limits ----
    Case(
        "mixed_matrix_sizes_keep_the_largest_group_with_a_warning",
        nth(3, smaller_matrix),
        warnings=["processed 3 of 4 images: the largest group with the same matrix and pixel spacing"],
        node="lenient",
    ),
    Case(
        "two_matrix_sizes_of_equal_count_are_refused_not_chosen_by_arrival_order",
        lambda datasets: [smaller_matrix(ds) for ds in datasets[2:]] and None,
        JobState.FAILED,
        not_admitted(
            "the series mixes matrix sizes or pixel spacings (2 of 8 x 8 at 0.8 x 0.8 mm; 2 of 16 x 16 at 0.8 x 0.8 "
            "mm) and the largest groups are the same size, so which one to process cannot be told; send each as "
            "its own series"
        ),
        node="lenient",
    ),
    Case(
        "missing_rescale_is_assumed_identity_with_a_warning",
        each(no_rescale),
        warnings=[
            "rescale attributes missing: pixel values were read as HU with slope 1 and intercept 0 "
            "(admission.missing_rescale: assume_identity)"
        ],
        node="lenient",
    ),
    Case(
        "eight_bit_pixels_without_rescale_are_refused_though_identity_is_assumed",
        each(lambda ds: (eight_bit(ds), no_rescale(ds))),
        JobState.FAILED,
        not_admitted(
            "instance 1 has no RescaleSlope, read as 1 (admission.missing_rescale: assume_identity); with BitsStored "
            "8 its pixel values span at most 255 HU, less than the 1,000 HU from air to water that every CT holds, "
            "so these images cannot hold CT values (a wrong rescale, or an 8-bit export): send the scanner's "
            "original reconstruction"
        ),
        node="lenient",
    ),
    Case(
        "too_many_images_are_refused",
        spec={"slices": 14},
        state=JobState.FAILED,
        reason=not_admitted("the series has 14 images; at most 12 are processed (admission.max_instances)"),
        node="lenient",
    ),
    Case(
        "memory_estimate_over_the_limit_is_refused",
        spec={"rows": 64, "columns": 64, "slices": 8},
        state=JobState.FAILED,
        reason=not_admitted(
            "processing 8 images of 64 x 64 pixels needs about 0.8 MB of memory, over the 0.5 MB limit "
            "(admission.max_memory_gigabytes)"
        ),
        node="lenient",
    ),
    Case("valid_series_is_queued_on_the_lenient_node", node="lenient"),
]

TIMING_CASES = ("pause_longer_than_quiet_period_then_rest", "expected_images_never_arrive")
"""Arrival-timing cases, sent by the fixture in two parts (see ``corpus``)."""


@dataclass
class Outcome:
    statuses: list[int]
    series_instance_uid: str | None
    sop_instance_uids: list[str]
    state: JobState | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    history: list[JobState] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    state_after_pause: JobState | None = None


def _build(case: Case, folder: Path) -> list[Path]:
    spec = PhantomSpec(**{"rows": 16, "columns": 16, "slices": 4, "noise_sd": 0.0, **case.spec})
    series = write_phantom_series(folder, spec)
    if case.mutate is not None:
        datasets = [pydicom.dcmread(path) for path in series.files]
        case.mutate(datasets)
        for path, dataset in zip(series.files, datasets, strict=True):
            dataset.save_as(path)
    for path in series.files if case.rewrite else []:
        case.rewrite(path)
    return series.files


def _statuses(storescu_output: str) -> list[int]:
    """C-STORE response statuses from storescu -d output, in sending order."""
    return [int(code, 16) for code in re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", storescu_output)]


def _send_raw(node: Node, case: Case, folder: Path) -> Outcome:
    """Send ``case.raw`` as the data set of a C-STORE, with pynetdicom (storescu reads files, not junk)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = case.raw or b""
    if payload == b"FILE":
        payload = _build(Case("whole-file"), folder)[0].read_bytes()
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    carrier = Dataset()
    carrier.file_meta = meta
    path = folder / "raw.dcm"
    carrier.save_as(path, enforce_file_format=True)
    with open(path, "ab") as stream:  # the data set after the meta header is the payload, as sent
        stream.write(payload)
    response = send_file_raw(
        node.port, path, CT_IMAGE, ExplicitVRLittleEndian, calling_ae=_sender(case), called_ae=node.ae_title
    )
    return Outcome([int(response.Status)], None, [sop_instance])


def _sender(case: Case) -> str:
    """Each case's own calling AE title: the cases are unrelated senders, sent seconds apart. From one AE title, an
    image refused with no series in one case would mark the series of the cases sent just before and after it
    partial ("may belong to this one"), as the node must for one sender."""
    return f"CASE{CASES.index(case):03d}" if case in CASES else "SENDER"


def _send(node: Node, case: Case, folder: Path) -> Outcome:
    if case.raw is not None:
        return _send_raw(node, case, folder)
    files = _build(case, folder)
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    if (
        case.rewrite is not None
    ):  # storescu will not send what it finds malformed: pynetdicom sends the bytes as they are
        statuses = [
            int(
                send_file_raw(
                    node.port, path, CT_IMAGE, ds.file_meta.TransferSyntaxUID, calling_ae=_sender(case)
                ).Status
            )
            for path, ds in zip(files, datasets, strict=True)
        ]
    else:
        result = storescu(node.port, files, calling_ae=_sender(case), extra=["-d", "--no-halt", *case.options])
        statuses = _statuses(result.stdout + result.stderr)
    return Outcome(
        statuses,
        str(datasets[0].SeriesInstanceUID) if "SeriesInstanceUID" in datasets[0] else None,
        [str(ds.SOPInstanceUID) for ds in datasets],
    )


def _settle(node: Node, outcome: Outcome) -> bool:
    """True once the series has left RECEIVING and COMPLETE (or never existed)."""
    if outcome.series_instance_uid is None:
        return True
    return node.job_state(outcome.series_instance_uid) not in (JobState.RECEIVING, JobState.COMPLETE)


def _collect(node: Node, outcome: Outcome) -> None:
    with node.sessions() as session:
        query = select(Series).where(Series.series_instance_uid == outcome.series_instance_uid)
        series = session.scalars(query).first()
        if series is not None and series.job is not None:
            job = series.job
            outcome.state, outcome.reason, outcome.warnings = job.state, job.reason, list(job.warnings or [])
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
            outcome.history = [event.to_state for event in events]
        rows = session.scalars(
            select(RejectedInstance.reason)
            .where(RejectedInstance.sop_instance_uid.in_(outcome.sop_instance_uids))
            .order_by(RejectedInstance.id)
        )
        outcome.refusals = list(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Node, Outcome]]:
    """Start both nodes, send every case, let every series settle, and gather what the node did."""
    require_tool("storescu")
    previous_mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    root = tmp_path_factory.mktemp("corpus")
    completion = {
        "quiet_seconds": QUIET_SECONDS,
        "check_interval_seconds": 0.2,
        "expected_count_timeout_seconds": EXPECTED_COUNT_TIMEOUT_SECONDS,
    }
    nodes = {
        "strict": Node(root / "strict", {"rules": CT_RULES, "completion": completion}),
        "lenient": Node(
            root / "lenient",
            {
                "rules": CT_RULES,
                "completion": completion,
                "admission": {
                    "mixed_series": "largest",
                    "missing_rescale": "assume_identity",
                    "max_instances": 12,
                    "max_memory_gigabytes": 0.5 / 1024,
                },
            },
        ),
    }
    for node in nodes.values():
        node.start()
    try:
        outcomes: dict[str, tuple[Node, Outcome]] = {}
        for case in CASES:
            outcomes[case.name] = (nodes[case.node], _send(nodes[case.node], case, root / case.name))
        # Timing: half of two series whose ImagesInAcquisition says 4; one gets the rest after a
        # pause of several quiet periods (shorter than the expected-count timeout).
        strict = nodes["strict"]
        timing: dict[str, tuple[list[Path], Outcome]] = {}
        for name in TIMING_CASES:
            files = _build(Case(name), root / name)
            first = storescu(strict.port, files[:2], calling_ae=name[:16].upper(), extra=["-d", "--no-halt"])
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            timing[name] = (files, Outcome(_statuses(first.stdout + first.stderr), uid, []))
        time.sleep(3 * QUIET_SECONDS + 1)
        for name, (_files, outcome) in timing.items():
            outcome.state_after_pause = strict.job_state(outcome.series_instance_uid)
            outcomes[name] = (strict, outcome)
        files, outcome = timing["pause_longer_than_quiet_period_then_rest"]
        rest = storescu(strict.port, files[2:], calling_ae="PAUSE_LONGER_THA", extra=["-d", "--no-halt"])
        outcome.statuses += _statuses(rest.stdout + rest.stderr)
        for name, (node, outcome) in outcomes.items():
            wait_for(
                lambda node=node, outcome=outcome: _settle(node, outcome),
                timeout=EXPECTED_COUNT_TIMEOUT_SECONDS + 60,
                what=f"{name} to settle",
            )
        for node, outcome in outcomes.values():
            _collect(node, outcome)
        yield outcomes
    finally:
        pydicom.config.settings.writing_validation_mode = previous_mode
        for node in nodes.values():
            node.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_outcome(corpus: dict[str, tuple[Node, Outcome]], case: Case) -> None:
    node, outcome = corpus[case.name]
    expected_statuses = case.statuses or [SUCCESS] * len(outcome.sop_instance_uids)
    assert outcome.statuses == expected_statuses
    assert outcome.state == case.state, outcome.reason
    if case.reason is not None and case.reason.startswith("re:"):
        assert outcome.reason is not None and re.match(case.reason[3:], outcome.reason), outcome.reason
    elif case.reason is not None:
        assert outcome.reason == case.reason
    elif case.state is JobState.QUEUED:
        assert outcome.reason == "rule 'ct': process with model 'baseline'"
    assert len(outcome.warnings) == len(case.warnings), outcome.warnings
    for warning, expected in zip(outcome.warnings, case.warnings, strict=True):
        if expected.startswith("re:"):
            assert re.match(expected[3:], warning), warning
        else:
            assert warning == expected
    if case.refusal is not None:
        assert outcome.refusals, "no rejected_instances row"
        for refusal in outcome.refusals:
            if case.refusal.startswith("re:"):
                assert re.match(case.refusal[3:], refusal), refusal
            else:
                assert refusal == case.refusal
    else:
        assert outcome.refusals == []
    # Nothing refusable from headers costs inference time: the history never passes PROCESSING.
    assert JobState.PROCESSING not in outcome.history
    if case.state is JobState.FAILED:
        assert outcome.history == [JobState.RECEIVING, JobState.COMPLETE, JobState.FAILED]
    log = node.log()
    for secret in case.hidden:
        assert secret not in log


def test_quiet_period_does_not_complete_a_series_short_of_images_in_acquisition(corpus) -> None:
    """Half of a 4-image series, a pause of 3 quiet periods, then the rest: one completion, no warning."""
    _node, outcome = corpus["pause_longer_than_quiet_period_then_rest"]
    assert outcome.state_after_pause is JobState.RECEIVING
    assert outcome.statuses == [SUCCESS] * 4
    assert outcome.state is JobState.QUEUED
    assert outcome.history == [JobState.RECEIVING, JobState.COMPLETE, JobState.QUEUED]
    assert outcome.warnings == []


def test_expected_count_timeout_completes_a_partial_series_with_a_warning(corpus) -> None:
    """2 of 4 expected images and silence: RECEIVING past the quiet period, then QUEUED marked partial."""
    node, outcome = corpus["expected_images_never_arrive"]
    assert outcome.state_after_pause is JobState.RECEIVING
    assert outcome.state is JobState.QUEUED
    assert outcome.warnings == [
        "partial series: 2 of 4 expected images (ImagesInAcquisition) had arrived when the completion timeout ran out"
    ]
    with node.sessions() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == outcome.series_instance_uid)).one()
        completed = [e.reason for e in series.job.events if e.to_state is JobState.COMPLETE]
    assert completed == [
        f"only 2 of 4 expected images (ImagesInAcquisition) after {EXPECTED_COUNT_TIMEOUT_SECONDS:g} s "
        "without a new one (partial series)"
    ]
