"""Write a job's DICOM results: a SEG per wanted encoding and the SR on its segments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.encode.measurements import StructureMeasurement
from dicom_node.encode.preview import write_preview
from dicom_node.encode.rtstruct import encode_rtstruct
from dicom_node.encode.seg import Algorithm, encode_segmentation, write_segmentation
from dicom_node.encode.sr import encode_measurement_report
from inference.models import Segmentation
from inference.volume import Volume


class EncodingError(RuntimeError):
    """Results could not be encoded; the job fails with this reason."""


def encode_results(
    volume: Volume,
    segmentation: Segmentation,
    measurements: Sequence[StructureMeasurement],
    model,  # noqa: ANN001 - a SegmentationModel
    folder: Path,
    segmentation_types: Sequence[str],
    attempt: int = 1,
    *,
    rtstruct: bool = False,
    warnings: Sequence[str] = (),
    partial: bool = False,
    replaces: Mapping[str, Dataset] | None = None,
) -> list[Path]:
    """SEG and SR files in ``folder`` for each type in ``segmentation_types``, and an RTSTRUCT if asked.

    ``measurements`` (from :func:`~dicom_node.encode.measurements.measure`) are the SR's figures.

    Every run makes new series (new UIDs). A run after the first (``attempt`` > 1) says
    "(re-run N)" in its series descriptions, and each SR names the SR it replaces
    (``replaces``: file name -> the earlier run's SR: its study, series, SOP class and instance UIDs) in its Predecessor Documents
    Sequence, so a PACS shows the newer results beside, not mixed into, the earlier ones.
    ``warnings`` go into each SR as a comment; ``partial`` adds "PARTIAL" to every description.
    """
    algorithm = Algorithm(model.algorithm_name, model.algorithm_version, model.is_baseline)
    sources, labels = _sources_and_frames(volume, segmentation.labels)
    replaces = replaces or {}
    written = []
    for kind in segmentation_types:
        seg = encode_segmentation(
            sources,
            labels,
            segmentation.classes,
            algorithm,
            segmentation_type=kind,
            series_description=algorithm.series_description("Segmentation", attempt, partial=partial),
        )
        seg_path = folder / f"seg-{kind.lower()}.dcm"
        write_segmentation(seg.dataset, seg_path)
        sr_path = folder / f"sr-{kind.lower()}.dcm"
        earlier = [replaces[sr_path.name]] if sr_path.name in replaces else []
        sr = encode_measurement_report(
            seg, sources, measurements, algorithm, notes=warnings, previous_versions=earlier
        )
        sr.SeriesDescription = algorithm.series_description("Measurements", attempt, partial=partial)
        sr.save_as(sr_path)
        written += [seg_path, sr_path]
    if rtstruct and all(ref.frame_number is None for ref in volume.slices):  # contours reference single-frame images
        rtstruct = encode_rtstruct(
            volume, sources, segmentation.labels, segmentation.classes, algorithm,
            series_description=algorithm.series_description("Structures", attempt, partial=partial),
        )
        rtstruct_path = folder / "rtstruct.dcm"
        rtstruct.save_as(rtstruct_path, enforce_file_format=True)
        written.append(rtstruct_path)
    write_preview(folder / "preview.png", volume, segmentation.labels, segmentation.classes)
    return written


def _sources_and_frames(volume: Volume, labels: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """Source headers in the order highdicom needs, and the label map's frames in that order."""
    headers: dict[str, Dataset] = {}
    for path in volume.source_paths:
        header = dcmread(path, stop_before_pixels=True)
        headers[str(header.SOPInstanceUID)] = header
    if all(ref.frame_number is None for ref in volume.slices):
        return [headers[ref.sop_instance_uid] for ref in volume.slices], labels
    if len(headers) != 1:
        raise EncodingError("a volume from several multi-frame instances cannot be encoded yet")
    frames = np.zeros_like(labels)
    for index, ref in enumerate(volume.slices):
        frames[ref.frame_number - 1] = labels[index]
    return list(headers.values()), frames
