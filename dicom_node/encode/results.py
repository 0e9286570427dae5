"""Write a job's DICOM results: a SEG per wanted encoding and the SR on its segments."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from copy import deepcopy
from datetime import datetime, timedelta, timezone
from functools import partial as partial_function
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from db.names import name_groups, other_person
from db.results import ResultFile, ResultKind
from dicom_node.encode.codes import display_label
from dicom_node.encode.lossy import (
    HTJ2K,
    JPEG_2000_IRREVERSIBLE,
    JPEG_LOSSY,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_XL,
    LossyHistory,
    lossy_history,
)
from dicom_node.encode.measurements import StructureMeasurement
from dicom_node.encode.preview import write_preview
from dicom_node.encode.rtstruct import ContourBudget, encode_rtstruct
from dicom_node.encode.seg import (
    Algorithm,
    SegmentationType,
    encode_segmentation,
    tracking_uids,
    write_segmentation,
)
from dicom_node.encode.sources import text_in_utf8
from dicom_node.encode.sr import encode_measurement_report
from inference.models import Segmentation, run_parameters
from inference.volume import Volume, raw_text, read_header, several_sources_problem


class EncodingError(RuntimeError):
    """Results could not be encoded; the job fails with this reason."""


RESULT_SERIES_OFFSETS = {"seg-binary": 1, "sr-binary": 2, "rtstruct": 3, "seg-labelmap": 4, "sr-labelmap": 5}
"""Each result object's series number within a run: 9701.. for the first run, 9801.. for the second, ..."""
RESULT_TITLES = {
    "seg-binary": "Segmentation",
    "sr-binary": "Measurements",
    "rtstruct": "Structures",
    "seg-labelmap": "Label map",
    "sr-labelmap": "Label map measurements",
}
"""The first words of each result's SeriesDescription: BINARY and LABELMAP copies read differently."""


def result_series_number(name: str, run: int = 1) -> int:
    """Distinct per object and per run, so a PACS lists each result series apart: 9700 + 100 x (run - 1) + offset."""
    return 9700 + 100 * (max(run, 1) - 1) + RESULT_SERIES_OFFSETS[name]


MADE_AT_PREFIXES = ("InstanceCreation", "Series", "Content", "StructureSet")
"""The dates and times (``<prefix>Date``/``<prefix>Time``) that say when a result was made."""
UTC_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment.value
"""The purpose of highdicom's own ContributingEquipmentSequence item (DCM 109102, "Processing Equipment")."""


def stamp_date_time(dataset: Dataset, source: Dataset) -> None:
    """When the result was made, all in one time zone named by TimezoneOffsetFromUTC.

    The creation, series, content and (RTSTRUCT) structure set dates and times are set to one instant: in the
    source's own TimezoneOffsetFromUTC when it has a valid one (the copied StudyDate/StudyTime keep their meaning),
    else in the encoding host's zone, whose offset then is recorded, so workers in different zones agree in UTC.
    """
    zone = _source_zone(source)
    made = datetime.now(zone) if zone is not None else datetime.now().astimezone()
    for prefix in MADE_AT_PREFIXES:
        if prefix in ("InstanceCreation", "Series") or f"{prefix}Date" in dataset:
            setattr(dataset, f"{prefix}Date", made.strftime("%Y%m%d"))
            setattr(dataset, f"{prefix}Time", made.strftime("%H%M%S"))
    dataset.TimezoneOffsetFromUTC = utc_offset_text(made)
    for item in dataset.get("ContributingEquipmentSequence", []):
        if _is_processing_now(item):  # highdicom's own item: the host's local time, without an offset
            item.ContributionDateTime = made.strftime("%Y%m%d%H%M%S.%f") + utc_offset_text(made)


def _is_processing_now(item: Dataset) -> bool:
    """Whether a ContributingEquipmentSequence item is the processing that made this result (not the scanner that
    acquired the source, whose ContributionDateTime is the acquisition's)."""
    purpose = item.get("PurposeOfReferenceCodeSequence") or []
    return bool(purpose) and purpose[0].get("CodeValue") == PROCESSING_EQUIPMENT and "ContributionDateTime" in item


def _source_zone(source: Dataset) -> timezone | None:
    """The fixed zone of the source's TimezoneOffsetFromUTC ("+HHMM"/"-HHMM", -1200 to +1400); None (this host's
    local zone) when it has none or one that is not a valid offset."""
    found = UTC_OFFSET.match(str(source.get("TimezoneOffsetFromUTC", "") or "").strip())
    if found is None or int(found.group(3)) >= 60:
        return None
    minutes = int(found.group(2)) * 60 + int(found.group(3))
    offset = timedelta(minutes=-minutes if found.group(1) == "-" else minutes)
    if not timedelta(hours=-12) <= offset <= timedelta(hours=14):
        return None
    return timezone(offset)


def utc_offset_text(moment: datetime) -> str:
    """The UTC offset of an aware ``moment`` as TimezoneOffsetFromUTC writes it: "+HHMM" or "-HHMM"."""
    offset = moment.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


LOSSY_METHOD_NAMES = {
    JPEG_LOSSY: "JPEG",
    JPEG_LS_NEAR_LOSSLESS: "JPEG-LS near-lossless",
    JPEG_2000_IRREVERSIBLE: "JPEG 2000",
    HTJ2K: "HTJ2K",
    JPEG_XL: "JPEG XL",
}


def lossy_caveat(history: LossyHistory | None) -> str | None:
    """The sentence a result's SR carries when its source images went through lossy compression (the SEG says so in
    LossyImageCompression; the SR and RTSTRUCT define no such attribute), naming methods and ratios where known."""
    if history is None:
        return None
    methods = [LOSSY_METHOD_NAMES.get(method, method) for method in history.methods]
    if history.ratios:
        methods = [f"{method}, ratio {ratio}:1" for method, ratio in zip(methods, history.ratios, strict=True)]
    how = f" ({'; '.join(methods)})" if methods else ""
    return (
        f"the CT images were lossy compressed{how} before they reached the node: volumes and mean HU are measured on "
        "the decompressed images and can differ slightly from measurements on the original images"
    )


def encode_results(
    volume: Volume,
    segmentation: Segmentation,
    measurements: Sequence[StructureMeasurement],
    model,  # a SegmentationModel
    folder: Path,
    segmentation_types: Sequence[SegmentationType],
    attempt: int = 1,
    *,
    rtstruct: bool = False,
    warnings: list[str] | None = None,
    partial: bool = False,
    rtstruct_budget: ContourBudget | None = None,
    replaces: Mapping[str, Dataset] | None = None,
    device_uid: str | None = None,
    patient_name: str | None = None,
) -> list[ResultFile]:
    """SEG and SR files in ``folder`` for each type in ``segmentation_types``, and an RTSTRUCT if asked.

    ``measurements`` (from :func:`~dicom_node.encode.measurements.measure`) are the SR's figures.

    Returns the files written, each with its kind and encoding (the order they are sent in).

    Every run makes new series (new UIDs); a structure has one Tracking UID in all the SEGs and SRs of a
    run. A run after the first (``attempt`` > 1) says "(re-run N)" in its series descriptions, and each SR names the SR it replaces
    (``replaces``: SEG encoding -> the earlier run's SR on it: its study, series, SOP class and instance UIDs) in its Predecessor Documents
    Sequence, so a PACS shows the newer results beside, not mixed into, the earlier ones.
    ``warnings`` go into each SR as a comment; ``partial`` adds "PARTIAL" to every description.
    The RTSTRUCT is made first, within ``rtstruct_budget``: a structure it had to simplify
    further adds a sentence to ``warnings`` (the list is extended in place), so the SR says so.
    ``device_uid`` is the node's Device Observer UID, named by every SR
    (:func:`~dicom_node.encode.sr.node_device_uid`). ``patient_name`` is the name the series' study records: the
    results of a series whose images spell the patient's name two ways carry it (:func:`_one_name`).
    """
    warnings = warnings if warnings is not None else []
    algorithm = Algorithm(
        model.algorithm_name,
        model.algorithm_version,
        model.is_baseline,
        getattr(model, "is_test_weights", False),
        parameters=tuple(run_parameters(model).items()),
    )
    sources, labels = _sources_and_frames(volume, segmentation.labels, warnings)
    _one_name(sources, patient_name)
    caveat = lossy_caveat(lossy_history(sources))
    if caveat is not None and caveat not in warnings:
        warnings.append(caveat)  # the SR's comment says so: its figures come from the decompressed images
    source_series = str(sources[0].get("SeriesNumber", "") or "").strip() or None
    describe = partial_function(
        algorithm.series_description, attempt=attempt, partial=partial, source_series=source_series
    )
    replaces = replaces or {}
    found = {m.label for m in measurements}
    not_found = [
        display_label(name) for label, name in sorted(segmentation.classes.items()) if label and label not in found
    ]
    tracking = tracking_uids(segmentation.classes)  # one per structure: the same in every SEG and SR of this run
    written: list[ResultFile] = []
    if rtstruct:  # contours reference single-frame images, or the frames of a multi-frame one
        structure_set = encode_rtstruct(
            volume,
            sources,
            segmentation.labels,
            segmentation.classes,
            algorithm,
            series_number=result_series_number("rtstruct", attempt),
            series_description=describe(RESULT_TITLES["rtstruct"]),
            budget=rtstruct_budget,
            notes=warnings,
        )
        stamp_date_time(structure_set, sources[0])
        rtstruct_path = folder / "rtstruct.dcm"
        structure_set.save_as(rtstruct_path, enforce_file_format=True)
    for kind in segmentation_types:
        seg = encode_segmentation(
            sources,
            labels,
            segmentation.classes,
            algorithm,
            segmentation_type=kind,
            series_number=result_series_number(f"seg-{kind.lower()}", attempt),
            series_description=describe(RESULT_TITLES[f"seg-{kind.lower()}"]),
            tracking_uids=tracking,
            notes=warnings,
        )
        stamp_date_time(seg.dataset, sources[0])
        seg_path = folder / f"seg-{kind.lower()}.dcm"
        write_segmentation(seg.dataset, seg_path)
        sr_path = folder / f"sr-{kind.lower()}.dcm"
        earlier = [replaces[kind]] if kind in replaces else []
        sr = encode_measurement_report(
            seg,
            sources,
            measurements,
            algorithm,
            notes=warnings,
            previous_versions=earlier,
            series_number=result_series_number(f"sr-{kind.lower()}", attempt),
            partial=partial,
            not_found=not_found,
            device_uid=device_uid,
        )
        sr.SeriesDescription = describe(RESULT_TITLES[f"sr-{kind.lower()}"])
        stamp_date_time(sr, sources[0])
        sr.save_as(sr_path)
        written += [ResultFile(ResultKind.SEG, str(seg_path), kind), ResultFile(ResultKind.SR, str(sr_path), kind)]
    if rtstruct:
        written.append(ResultFile(ResultKind.RTSTRUCT, str(folder / "rtstruct.dcm")))  # sent after the SEG and SR
    write_preview(folder / "preview.png", volume, segmentation.labels, segmentation.classes)
    return written


def _slice_measures_as_volume(measures: Sequence[Dataset], step: float, warnings: list[str]) -> None:
    """The SEG copies its PixelMeasures from the first source's header (single-frame images) or from the shared
    functional group (one multi-frame image), ``measures``: SpacingBetweenSlices is set to the slice step the volume
    has from the slices' positions (a header's own value may be wrong, and the SEG would carry it), and a
    SliceThickness the SEG must state but the source lacks, or gives as something other than one positive number
    (text, NaN, several values, zero, negative), becomes that step, with a warning naming the value."""
    text = f"{step:.6g}"
    given = raw_text(measures[0], "SliceThickness") or ""
    unusable = _positive_number(given) is None
    for item in measures:
        if "SpacingBetweenSlices" in item:
            item.SpacingBetweenSlices = text
        if unusable:
            item.SliceThickness = text
    if unusable:
        what = (
            "missing from the source images"
            if not given
            else f"'{given[:32]}' in the source images, not a positive number"
        )
        warnings.append(
            f"SliceThickness is {what}: the segmentation states the slice step ({text} mm) as its slice thickness"
        )


def _one_name(sources: list[Dataset], study_name: str | None) -> None:
    """Name the patient in the results (which copy the first source's name) as the study records it, ``study_name``,
    where the sources spell the name two ways: one person's name by :mod:`db.names` (``Müller^Jürgen`` and
    ``MÜLLER^JÜRGEN``, a series completed by a PACS re-sending it in its own form), as admission admits them, so
    the results never carry whichever spelling the first slice has. A series of one spelling keeps its own, and a
    study name of another person (never admitted) or none changes nothing."""
    spellings = {_spelling(header) for header in sources}
    if len(spellings) < 2 or not study_name or other_person(study_name, _spelling(sources[0])):
        return
    sources[0].PatientName = study_name


def _spelling(header: Dataset) -> str:
    """The source's PatientName as written, without its padding and empty trailing components."""
    return "=".join(name_groups(str(header.get("PatientName") or ""))).rstrip("=")


def _one_orientation(sources: list[Dataset]) -> None:
    """Every slice takes the first one's ImageOrientationPatient: admission found one orientation, to 3 decimals,
    and highdicom requires it exactly equal."""
    orientation = list(sources[0].ImageOrientationPatient)
    for header in sources:
        header.ImageOrientationPatient = orientation


def _positive_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _sources_and_frames(volume: Volume, labels: np.ndarray, warnings: list[str]) -> tuple[list[Dataset], np.ndarray]:
    """Source headers in the order highdicom needs, and the label map's frames in that order.

    Single-frame sources: one header per slice, in slice order, with ``labels`` as is.
    One multi-frame source (Enhanced or Legacy Converted Enhanced CT): its header, and
    one label frame per source frame in source-frame order (frames the volume did not
    use stay empty and are left out of the SEG).
    Either way the slice measures are the volume's (:func:`_slice_measures_as_volume`).

    Raises
    ------
    EncodingError
        If the slices come from several multi-frame instances (highdicom references
        the frames of one multi-frame source only), or from a mix of single- and
        multi-frame instances.
    """
    headers: dict[str, Dataset] = {}
    for path in volume.source_paths:  # every source at once (highdicom takes them all): without private elements
        header: Dataset = read_header(path)
        header.remove_private_tags()
        headers[str(header.SOPInstanceUID)] = header
    if all(ref.frame_number is None for ref in volume.slices):
        sources = [headers[ref.sop_instance_uid] for ref in volume.slices]
        text_in_utf8(sources[0])  # the results copy patient and study text from the first source
        _one_orientation(sources)
        _slice_measures_as_volume(sources, float(volume.spacing[2]), warnings)
        return sources, labels
    problem = several_sources_problem(set(headers), multiframe=True)
    if problem is not None:  # the volume refuses such sources first: kept for a volume made elsewhere
        raise EncodingError(problem)
    (header,) = headers.values()
    frames = np.zeros((int(header.get("NumberOfFrames", 1)), *labels.shape[1:]), dtype=labels.dtype)
    for index, ref in enumerate(volume.slices):
        assert ref.frame_number is not None  # every slice of a multi-frame source names its frame
        frames[ref.frame_number - 1] = labels[index]
    shared = _plane_macros_shared_as_read(header, volume.slices[0].frame_number or 1)
    _slice_measures_as_volume(shared.PixelMeasuresSequence, float(volume.spacing[2]), warnings)
    return [text_in_utf8(header)], frames


PLANE_MACROS = ("PlaneOrientationSequence", "PixelMeasuresSequence")
"""Functional groups the SEG copies from a multi-frame source's shared group only (highdicom)."""


def _plane_macros_shared_as_read(header: Dataset, frame_number: int) -> Dataset:
    """An Enhanced CT's orientation and pixel measures, in its shared functional group as the volume read them;
    returns that group.

    The volume takes each attribute from a frame's per-frame item first, else from the shared one (admission
    checked they agree); highdicom reads the shared group only, and fails on a source that gives them per frame (as
    some scanners write). The per-frame values of ``frame_number`` (a frame the volume holds: frames of another
    matrix may have been left out) join the shared ones, in this in-memory header only."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    if "SharedFunctionalGroupsSequence" not in header or not header.SharedFunctionalGroupsSequence:
        header.SharedFunctionalGroupsSequence = [Dataset()]
    shared = header.SharedFunctionalGroupsSequence[0]
    for macro in PLANE_MACROS:
        own = per_frame[frame_number - 1].get(macro) if len(per_frame) >= frame_number else None
        if not own:
            continue
        item = deepcopy(shared[macro][0]) if shared.get(macro) else Dataset()
        for element in own[0]:
            item[element.tag] = deepcopy(element)
        setattr(shared, macro, [item])
    return shared
