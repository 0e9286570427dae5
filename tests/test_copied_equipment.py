"""The source scanner's description the SEG and SR copy (ContributingEquipmentSequence): a value that breaks its VR
is left out with a warning naming it, never copied as it is and never silently taking the whole description along."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import dciodvfy, free_port, require_tool, storescu, succeeded_files

SMALL_CT = PhantomSpec(rows=32, columns=32, slices=4, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
CONTROL_CHARACTERS = {
    "InstitutionName": b"inst\x07\x1b]0;title\x07",  # a bell and a terminal title sequence
    "InstitutionalDepartmentName": b"dep\r\nFAKE",
}
TOO_LONG = {"ManufacturerModelName": b"M" * 300, "InstitutionName": b"I" * 300}
"""Each alone made highdicom leave out the whole description of the scanner, without a word."""
HOLDS_CONTROL = "holds a control character (a tab, line break or similar): left out of the results"
WARNINGS = {
    "control": [f"{keyword} of the source images {HOLDS_CONTROL}" for keyword in CONTROL_CHARACTERS],
    "long": [
        f"{keyword} of the source images is 300 characters long, more than the 64 DICOM allows: left out of the results"
        for keyword in TOO_LONG
    ],
}


def equipment_series(folder: Path, values: dict[str, bytes]) -> tuple[str, list[Path]]:
    """A small phantom CT series whose every image has ``values`` written as the sender's bytes."""
    series = write_phantom_series(folder, SMALL_CT)
    for path in series.files:
        dataset = pydicom.dcmread(path)
        for keyword, raw in values.items():
            tag = tag_for_keyword(keyword)
            dataset[tag] = DataElement(tag, dictionary_VR(tag), raw)
        dataset.save_as(path)
    return series.series_instance_uid, series.files


def acquisition_equipment(dataset: Dataset) -> Dataset:
    """The result's item describing the scanner that made its source images."""
    items = [
        item
        for item in dataset.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.AcquisitionEquipment.value
    ]
    assert len(items) == 1, f"no description of the source's scanner in the {dataset.Modality}"
    return items[0]


def job_warnings(node, series_instance_uid: str) -> list[str]:
    with node.sessions() as session:
        job = job_for_series_uid(session, series_instance_uid)
        assert job is not None
        return list(job.warnings or [])


@pytest.mark.integration
def test_invalid_equipment_values_are_left_out_of_the_results_sent_to_pacs_and_named(tmp_path, start_node):
    pacs_port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    series = {
        "control": equipment_series(tmp_path / "control", CONTROL_CHARACTERS),
        "long": equipment_series(tmp_path / "long", TOO_LONG),
    }
    destination = {"ae_title": "PACSSCP", "host": "127.0.0.1", "port": pacs_port, "send": ["seg", "sr", "rtstruct"]}
    rule = {"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}
    node = start_node(
        rules=[{**rule, "destinations": ["pacs"]}], destinations={"pacs": destination}, inference={"workers": 1}
    )
    # -pm: the results' SOP classes may be newer than this DCMTK's storescp
    pacs = subprocess.Popen([require_tool("storescp"), "-pm", "-aet", "PACSSCP", "-od", str(received), str(pacs_port)])
    try:
        for _, files in series.values():
            sent = storescu(node.port, files)
            assert len(succeeded_files(sent.stdout + sent.stderr)) == len(files)
        for uid, _ in series.values():
            node.wait_for_state(uid, JobState.DONE, timeout=240)
    finally:
        pacs.terminate()
        pacs.wait()

    results = {path: pydicom.dcmread(path) for path in sorted(received.iterdir())}
    for name, values in (("control", CONTROL_CHARACTERS), ("long", TOO_LONG)):
        uid, files = series[name]
        assert all(warning in job_warnings(node, uid) for warning in WARNINGS[name]), job_warnings(node, uid)
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        mine = {path: result for path, result in results.items() if result.StudyInstanceUID == source.StudyInstanceUID}
        assert sorted(result.Modality for result in mine.values()) == ["RTSTRUCT", "SEG", "SR"], name
        for path, result in mine.items():
            errors, _ = dciodvfy(path)
            assert errors == [], (name, result.Modality)
            if result.Modality == "RTSTRUCT":  # it describes this node only, never the source's scanner
                assert all(result.get(keyword) != source.get(keyword) for keyword in values), name
                continue
            scanner = acquisition_equipment(result)  # kept, with the source's valid values
            assert (scanner.Manufacturer, scanner.StationName) == (source.Manufacturer, source.StationName)
            assert all(keyword not in scanner for keyword in values), (name, result.Modality)


EDGE_CASES = {
    "backslash": (
        {"InstitutionAddress": b"Street 1\\Town"},  # a valid ST value that highdicom refuses in the item
        "InstitutionAddress of the source images cannot be written in the acquisition equipment's description: "
        "left out of the results",
        True,
    ),
    "manufacturer": (
        {"Manufacturer": b"AC\x07ME"},  # the item cannot be written without it
        f"Manufacturer of the source images {HOLDS_CONTROL.removesuffix(': left out of the results')}: the "
        "acquisition equipment of the source images is left out of the results",
        False,
    ),
    "escape": (
        {"StationName": b"st\x1b[2J"},  # an ESC left after decoding switches no character set: a terminal's command
        f"StationName of the source images {HOLDS_CONTROL}",
        True,
    ),
    "date": (
        {"AcquisitionDateTime": b"20261345"},  # the item's ContributionDateTime
        "AcquisitionDateTime of the source images is not a date and time in the DICOM form YYYYMMDDHHMMSS: left out "
        "of the results",
        True,
    ),
}


@pytest.mark.parametrize("values, warning, described", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_the_scanner_is_never_left_out_unsaid(tmp_path, values, warning, described):
    _, files = equipment_series(tmp_path / "ct", values)
    volume = load_series_volume(files)
    model = ThresholdModel()
    segmentation = model.segment(volume)
    warnings: list[str] = []

    written = encode_results(
        volume,
        segmentation,
        measure(volume, segmentation.labels, segmentation.classes),
        model,
        tmp_path,
        ["BINARY"],
        warnings=warnings,
    )

    assert warnings == [warning]
    for result in written:
        errors, _ = dciodvfy(Path(result.path))
        assert errors == [], result.path
        dataset = pydicom.dcmread(result.path)
        purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in dataset.ContributingEquipmentSequence]
        assert (codes.DCM.AcquisitionEquipment.value in purposes) == described, result.path
        if described:
            assert all(keyword not in acquisition_equipment(dataset) for keyword in values), result.path
