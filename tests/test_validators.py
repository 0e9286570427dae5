"""Every result object against the validators sites use: dciodvfy, PixelMed and DCMTK's dsrdump.

The baseline's results run in the default suite; a TotalSegmentator model with random
weights (100+ structures) runs with ``-m validators_long``: PixelMed needs minutes and
several GB of heap for an SR of that size.

Validators that predate Sup 243 (Label Map Segmentation): dciodvfy 2022 does not know the
Label Map SEG IOD ("Information Object Not found"), and both dciodvfy and dsrdump 3.6.7
refuse a ReferencedSegmentNumber that points at a SOP class they do not know as a
segmentation. The LABELMAP SEG and its SR are therefore checked by highdicom round trip,
and those two known findings are asserted to be the only ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import ROOT, dciodvfy, dsrdump, pixelmed, require_extra

LABELMAP_SEGMENT_REFERENCE = (
    "ReferencedSegmentNumber(0062,000b)> - Shall not be present for Referenced SOP Class that is not segmentation"
)


def _results(volume, model, folder: Path) -> dict[str, Path]:
    segmentation = model.segment(volume)
    folder.mkdir(parents=True, exist_ok=True)
    files = encode_results(
        volume,
        segmentation,
        measure(volume, segmentation.labels, segmentation.classes),
        model,
        folder,
        ["BINARY", "LABELMAP"],
        rtstruct=True,
        warnings=["2 localizer image(s) left out of the volume"],
    )
    return {Path(result).stem: Path(result) for result in files}


def _check(results: dict[str, Path], heap: str = "2g") -> None:
    for name in ("seg-binary", "sr-binary", "rtstruct"):
        errors, _ = dciodvfy(results[name])
        assert errors == [], f"dciodvfy {name}"
    errors, _ = pixelmed(results["seg-binary"], heap=heap)
    assert errors == [], "PixelMed SEG"
    for name in ("sr-binary", "sr-labelmap"):
        errors, _ = pixelmed(results[name], sr=True, heap=heap)
        assert errors == [], f"PixelMed SR {name}"
    parsed = dsrdump(results["sr-binary"])
    assert parsed.returncode == 0
    assert not [line for line in (parsed.stdout + parsed.stderr).splitlines() if line.startswith("E: ")]

    # LABELMAP: validators before Sup 243 know neither the IOD nor segment references into it
    errors, _ = dciodvfy(results["sr-labelmap"])
    assert errors and all(LABELMAP_SEGMENT_REFERENCE in line for line in errors)
    labelmap = hd.seg.segread(results["seg-labelmap"])
    numbers = [int(item.SegmentNumber) for item in labelmap.SegmentSequence]
    assert numbers == list(range(1, len(numbers) + 1))
    report = hd.sr.srread(results["sr-labelmap"])
    groups = report.content.get_volumetric_roi_measurement_groups()
    references = [
        item.ReferencedSOPSequence[0] for g in groups for item in g.referenced_segment if item.ValueType == "IMAGE"
    ]
    referenced = {int(ref.ReferencedSegmentNumber) for ref in references}
    assert referenced <= set(numbers) and len(referenced) == len(groups) == len(references)
    assert all(ref.ReferencedSOPInstanceUID == labelmap.SOPInstanceUID for ref in references)


@pytest.mark.integration
def test_baseline_results_pass_dciodvfy_pixelmed_and_dsrdump(tmp_path):
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=128, columns=128, slices=20))
    _check(_results(load_series_volume(series.files), ThresholdModel(), tmp_path / "out"))


@pytest.mark.validators_long
def test_totalsegmentator_results_with_over_100_structures_pass_the_validators(shared_fixtures, tmp_path):
    require_extra("nnunetv2")
    from inference.models.totalsegmentator import TotalSegmentatorModel

    weights = tmp_path / "weights"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_test_weights.py"), str(weights), "--task", "total_fast"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    volume = load_series_volume(sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm")))
    results = _results(volume, TotalSegmentatorModel("total_fast", weights, device="cpu"), tmp_path / "out")
    assert len(pydicom.dcmread(results["seg-binary"], stop_before_pixels=True).SegmentSequence) > 100
    _check(results, heap="12g")
