"""Results say in which time zone their dates and times are (TimezoneOffsetFromUTC).

Workers may run on hosts in other time zones than the node: each encodes its results in its own local time, so
without the offset the same moment reads differently from one worker to the next. Each result (SEG, SR, RTSTRUCT)
is encoded here by a separate process with its own TZ, as a worker on such a host would, and read back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import ROOT

ENCODE = """
import sys
from pathlib import Path
from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume

volume = load_series_volume(sorted(Path(sys.argv[1]).glob("*.dcm")))
model = ThresholdModel()
segmentation = model.segment(volume)
out = Path(sys.argv[2])
out.mkdir(parents=True)
measured = measure(volume, segmentation.labels, segmentation.classes)
for result in encode_results(volume, segmentation, measured, model, out, ["BINARY"], rtstruct=True):
    print(result.path)
"""
ZONES = {"EST5": "-0500", "JST-9": "+0900"}  # POSIX TZ: New York in winter and Tokyo, without any zone database
MADE_AT = ("InstanceCreation", "Series", "Content", "StructureSet")


def encode_in_zone(series: Path, out: Path, zone: str) -> list[pydicom.Dataset]:
    """SEG, SR and RTSTRUCT of the phantom, encoded by a process whose local time zone is ``zone``."""
    environment = {**os.environ, "TZ": zone}
    done = subprocess.run(
        [sys.executable, "-c", ENCODE, str(series), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(path) for path in done.stdout.split()]


def made_at_in_utc(dataset: pydicom.Dataset, prefix: str) -> datetime:
    """``<prefix>Date`` and ``<prefix>Time`` read in the result's TimezoneOffsetFromUTC."""
    offset = str(dataset.TimezoneOffsetFromUTC)
    sign = -1 if offset.startswith("-") else 1
    shift = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])) * sign
    date, time = str(dataset[f"{prefix}Date"].value), str(dataset[f"{prefix}Time"].value)
    local = datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")
    return (local - shift).replace(tzinfo=UTC)


@pytest.mark.integration
def test_results_encoded_in_two_time_zones_give_their_offset_and_agree_in_utc(tmp_path):
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12))
    before = datetime.now(UTC).replace(microsecond=0)
    results = {zone: encode_in_zone(series.files[0].parent, tmp_path / zone, zone) for zone in ZONES}
    after = datetime.now(UTC)

    for zone, datasets in results.items():
        assert sorted(d.Modality for d in datasets) == ["RTSTRUCT", "SEG", "SR"]
        for dataset in datasets:
            assert dataset.TimezoneOffsetFromUTC == ZONES[zone], (zone, dataset.Modality)
            for prefix in MADE_AT:
                if f"{prefix}Date" in dataset:
                    assert before <= made_at_in_utc(dataset, prefix) <= after, (zone, dataset.Modality, prefix)
    # The local clock readings differ by the 14 hours between the zones; their UTC meaning does not.
    east = {d.Modality: d for d in results["JST-9"]}
    west = {d.Modality: d for d in results["EST5"]}
    assert east["SEG"].ContentTime[:2] != west["SEG"].ContentTime[:2]


@pytest.mark.integration
def test_results_of_a_source_with_its_own_offset_are_written_in_that_offset(tmp_path):
    """A CT that names its own zone: the results keep it, so the study date and time they copy keep their meaning."""
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12))
    for path in series.files:
        dataset = pydicom.dcmread(path)
        dataset.TimezoneOffsetFromUTC = "+0100"
        dataset.save_as(path)
    before = datetime.now(UTC).replace(microsecond=0)
    datasets = encode_in_zone(series.files[0].parent, tmp_path / "out", "JST-9")
    after = datetime.now(UTC)

    for dataset in datasets:
        assert dataset.TimezoneOffsetFromUTC == "+0100", dataset.Modality
        assert before <= made_at_in_utc(dataset, "Series") <= after, dataset.Modality
        for item in dataset.get("ContributingEquipmentSequence", []):  # highdicom's item: the same instant
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102":  # Processing Equipment
                contributed = datetime.strptime(str(item.ContributionDateTime), "%Y%m%d%H%M%S.%f%z")
                assert str(item.ContributionDateTime).endswith("+0100"), dataset.Modality
                assert before <= contributed <= after, dataset.Modality
    assert any("ContributingEquipmentSequence" in dataset for dataset in datasets)
