"""Read and check the header of a received data set, without touching its pixel data."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

from db.ingest import InstanceRecord, SeriesAttributes, StudyAttributes
from dicom_node import status

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PIXEL_DATA_GROUP = 0x7FE0
HEADER_KEYWORDS = (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "Modality", "Manufacturer", "ReferringPhysicianName", "StudyDescription",
    "SeriesDescription", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "SliceThickness",
    "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID", "StudyID", "SeriesNumber",
    "InstanceNumber", "ImagesInAcquisition", "NumberOfFrames",
)
HEADER_TAGS = [tag_for_keyword(keyword) for keyword in HEADER_KEYWORDS]
"""The only elements the receiver decodes: what the database records and routing reads."""


class InvalidInstance(ValueError):
    """The data set cannot be stored as it is; ``status`` is the DICOM failure status to answer."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status = status_code


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study: StudyAttributes
    series: SeriesAttributes
    instance_number: int | None
    image_type: str | None
    slice_thickness: float | None
    number_of_frames: int | None

    def record(self, transfer_syntax_uid: str, path: str, size_bytes: int, calling_ae_title: str | None) -> InstanceRecord:
        """What the database records for this instance once it is stored at ``path``."""
        return InstanceRecord(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            transfer_syntax_uid=str(transfer_syntax_uid),
            path=path,
            size_bytes=size_bytes,
            study=self.study,
            series=self.series,
            instance_number=self.instance_number,
            image_type=self.image_type,
            slice_thickness=self.slice_thickness,
            number_of_frames=self.number_of_frames,
            calling_ae_title=calling_ae_title,
        )


def is_valid_uid(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


def read_header(encoded: bytes, transfer_syntax: UID) -> Dataset:
    """Decode the data set's elements up to (not including) the pixel data.

    Raises
    ------
    InvalidInstance
        (Cannot understand) when the bytes are not a decodable data set.
    """
    try:
        if transfer_syntax.is_deflated:
            encoded = zlib.decompress(encoded, -zlib.MAX_WBITS)
        dataset = read_dataset(
            BytesIO(encoded),
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            stop_when=_at_pixel_data,
            specific_tags=HEADER_TAGS,
        )
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InvalidInstance(f"data set cannot be decoded: {exc}", status.CANNOT_UNDERSTAND) from None
    if len(dataset) == 0:
        raise InvalidInstance("data set is empty", status.CANNOT_UNDERSTAND)
    return dataset


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group >= PIXEL_DATA_GROUP


def check_header(dataset: Dataset, affected_sop_class: str, affected_sop_instance: str) -> InstanceHeader:
    """Validate the identifying attributes and gather what the database records.

    Raises
    ------
    InvalidInstance
        When a required UID is missing or malformed, or disagrees with the C-STORE request.
    """
    try:
        uids = {
            keyword: _text(dataset, keyword)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        for keyword, value in uids.items():
            if not is_valid_uid(value):
                shown = "empty" if not value else f"{value!r} is not a valid UID"
                raise InvalidInstance(f"{keyword} is {shown}", status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
        if uids["SOPInstanceUID"] != affected_sop_instance:
            raise InvalidInstance(
                f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the request's "
                f"Affected SOP Instance UID {affected_sop_instance}",
                status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            )
        if uids["SOPClassUID"] != affected_sop_class:
            raise InvalidInstance(
                f"SOPClassUID {uids['SOPClassUID']} differs from the request's Affected SOP Class UID "
                f"{affected_sop_class}",
                status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            )
        return _gather(dataset, uids)
    except InvalidInstance:
        raise
    except Exception as exc:  # a malformed value deep inside an element
        raise InvalidInstance(f"data set cannot be read: {exc}", status.CANNOT_UNDERSTAND) from None


def _gather(dataset: Dataset, uids: dict[str, str | None]) -> InstanceHeader:
    study = StudyAttributes(
        study_instance_uid=uids["StudyInstanceUID"] or "",
        patient_id=_text(dataset, "PatientID"),
        patient_name=_text(dataset, "PatientName"),
        patient_birth_date=_text(dataset, "PatientBirthDate"),
        patient_sex=_text(dataset, "PatientSex"),
        study_date=_text(dataset, "StudyDate"),
        study_time=_text(dataset, "StudyTime"),
        accession_number=_text(dataset, "AccessionNumber"),
        study_id=_text(dataset, "StudyID"),
        study_description=_text(dataset, "StudyDescription"),
        referring_physician_name=_text(dataset, "ReferringPhysicianName"),
    )
    series = SeriesAttributes(
        series_instance_uid=uids["SeriesInstanceUID"] or "",
        modality=_text(dataset, "Modality"),
        series_description=_text(dataset, "SeriesDescription"),
        series_number=_integer(dataset, "SeriesNumber"),
        body_part_examined=_text(dataset, "BodyPartExamined"),
        manufacturer=_text(dataset, "Manufacturer"),
        expected_instances=_integer(dataset, "ImagesInAcquisition"),
    )
    image_type = dataset.get("ImageType")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"] or "",
        sop_instance_uid=uids["SOPInstanceUID"] or "",
        study=study,
        series=series,
        instance_number=_integer(dataset, "InstanceNumber"),
        image_type="\\".join(str(v) for v in _as_list(image_type)) if image_type else None,
        slice_thickness=_decimal(dataset, "SliceThickness"),
        number_of_frames=_integer(dataset, "NumberOfFrames"),
    )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, MultiValue) else [value]


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip().strip("\x00")
    return text or None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _decimal(dataset: Dataset, keyword: str) -> float | None:
    try:
        value = dataset.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_file_header(path: str | Path) -> InstanceRecord:
    """What the database records for a DICOM file the node wrote itself (its results)."""
    dataset = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    header = check_header(dataset, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
    size = Path(path).stat().st_size
    return header.record(str(dataset.file_meta.TransferSyntaxUID), str(path), size, calling_ae_title=None)
