"""Planning systems get what they can read: DCMTK getscu and movescu with no extra options, from a node
that stored JPEG 2000 CT and a LABELMAP SEG (which DCMTK 3.6.7 does not know)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage
from sqlalchemy import select

from db.models import Instance, JobState, Series
from tests.conftest import Node, free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
PLANNER = "PLANNER"


@pytest.fixture(scope="module")
def node_with_j2k_ct_and_labelmap(tmp_path_factory, shared_fixtures):
    workdir = tmp_path_factory.mktemp("readable")
    planner_port = free_port()
    node = Node(
        workdir / "node",
        {
            "destinations": {"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}},
            "rules": [{"name": "ct", "match": {"modality": "CT"}, "action": "process", "model": "baseline"}],
            "results": {"segmentation_types": ["BINARY", "LABELMAP"]},
            "inference": {"workers": 1},
        },
    ).start()
    files = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))
    assert storescu(node.port, files, extra=["-xv"]).returncode == 0
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for_state(series_uid, JobState.DONE, timeout=180)
    yield node, files, planner_port
    node.stop()


def _series_of(node: Node, sop_class: str) -> tuple[str, str]:
    with node.sessions() as session:
        series = session.scalars(
            select(Series).join(Instance, Instance.series_id == Series.id).where(Instance.sop_class_uid == sop_class)
        ).first()
        return series.study.study_instance_uid, series.series_instance_uid


def _getscu(node: Node, out: Path, study: str, series: str | None) -> list[pydicom.Dataset]:
    """getscu by series, or by study when ``series`` is None; the data sets it received."""
    out.mkdir()
    level = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series}"] if series else []
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += [*(level or ["-k", "QueryRetrieveLevel=STUDY"]), "-k", f"StudyInstanceUID={study}"]
    result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.iterdir())]


def test_getscu_receives_the_jpeg2000_ct_decompressed_with_the_same_pixels(node_with_j2k_ct_and_labelmap, tmp_path):
    node, files, _ = node_with_j2k_ct_and_labelmap
    original = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f) for f in files)}
    study, series = _series_of(node, "1.2.840.10008.5.1.4.1.1.2")

    received = _getscu(node, tmp_path / "ct", study, series)

    assert len(received) == len(files)
    for dataset in received:
        assert dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        np.testing.assert_array_equal(dataset.pixel_array, original[str(dataset.SOPInstanceUID)].pixel_array)
    assert "retrieve.converted" in node.log()


def test_getscu_asking_for_the_labelmap_seg_gets_its_binary_twin(node_with_j2k_ct_and_labelmap, tmp_path):
    node, _, _ = node_with_j2k_ct_and_labelmap
    study, labelmap_series = _series_of(node, LABEL_MAP_SEGMENTATION)

    received = _getscu(node, tmp_path / "seg", study, labelmap_series)

    assert [d.SOPClassUID for d in received] == [SegmentationStorage]
    assert received[0].SegmentationType == "BINARY"


def test_getscu_of_the_whole_study_gets_each_instance_once(node_with_j2k_ct_and_labelmap, tmp_path):
    """The study holds a BINARY and a LABELMAP SEG of one run: a peer that cannot read LABELMAP gets the BINARY SEG
    once, not once for itself and once more standing in for the LABELMAP."""
    node, files, _ = node_with_j2k_ct_and_labelmap
    study, _series = _series_of(node, LABEL_MAP_SEGMENTATION)

    received = _getscu(node, tmp_path / "study", study, None)

    uids = [str(d.SOPInstanceUID) for d in received]
    assert len(uids) == len(set(uids))
    assert [d.SOPClassUID for d in received].count(SegmentationStorage) == 1
    assert LABEL_MAP_SEGMENTATION not in {d.SOPClassUID for d in received}
    sent = [line for line in node.log().splitlines() if "retrieve.sent" in line and "operation=get" in line][-1]
    assert f"instances={len(uids)} failed=0" in sent, sent
    assert len([d for d in received if d.Modality == "CT"]) == len(files)


def test_movescu_to_a_storescp_gets_the_ct_and_the_seg_in_forms_it_accepts(node_with_j2k_ct_and_labelmap, tmp_path):
    node, files, planner_port = node_with_j2k_ct_and_labelmap
    received = tmp_path / "planner"
    received.mkdir()
    scp = subprocess.Popen(
        [require_tool("storescp"), "-aet", PLANNER, "-od", str(received), str(planner_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for sop_class in ("1.2.840.10008.5.1.4.1.1.2", LABEL_MAP_SEGMENTATION):
            study, series = _series_of(node, sop_class)
            command = [
                require_tool("movescu"),
                "-v",
                "-S",
                "-aet",
                PLANNER,
                "-aec",
                node.ae_title,
                "-aem",
                PLANNER,
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study}",
                "-k",
                f"SeriesInstanceUID={series}",
                "127.0.0.1",
                str(node.port),
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert "Received Final Move Response (Success)" in result.stdout + result.stderr, (
                result.stdout + result.stderr
            )
        arrived = wait_for(lambda: len(list(received.iterdir())) == len(files) + 1, timeout=30, what="moved files")
        assert arrived
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    classes = sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in received.iterdir())
    assert classes.count(SegmentationStorage) == 1 and LABEL_MAP_SEGMENTATION not in classes
