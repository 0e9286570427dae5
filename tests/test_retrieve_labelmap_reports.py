"""A peer that does not read Label Map Segmentation (DCMTK 3.6.7 getscu and storescp do not know it) retrieves a
study whose job made a BINARY and a LABELMAP SEG, each with its measurement SR: it gets the BINARY SEG once, with
its SR, and never the SR on the LABELMAP SEG, which would report on a segmentation it never gets."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlalchemy import select

from db.models import Instance, JobState, Series, Study
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.retrieve.reports import evidence_uids
from tests.conftest import (
    CT_RULES,
    Node,
    free_port,
    require_tool,
    storescp_destination,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PLANNER = "PLANNER"


@pytest.fixture(scope="module")
def node_with_both_encodings(tmp_path_factory):
    """A node whose one job made a BINARY and a LABELMAP SEG and an SR on each, of a small phantom CT."""
    workdir = tmp_path_factory.mktemp("labelmap-reports")
    planner_port = free_port()
    node = Node(
        workdir / "node",
        {
            "destinations": {"planner": {"ae_title": PLANNER, "host": "127.0.0.1", "port": planner_port}},
            "rules": CT_RULES,
            "results": {"segmentation_types": ["BINARY", "LABELMAP"]},
            "inference": {"workers": 1},
        },
    ).start()
    series = write_phantom_series(workdir / "ct", PhantomSpec(rows=64, columns=64, slices=12))
    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    yield node, series.study_instance_uid, planner_port
    node.stop()


def _stored(node: Node, study: str) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, stored path) of every instance of the study the node serves."""
    with node.sessions() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Study.study_instance_uid == study, Series.superseded_at.is_(None))
        ).all()
    return {uid: (sop_class, path) for uid, sop_class, path in rows}


def _labelmap_report(stored: dict[str, tuple[str, str]]) -> str:
    """The SR naming the LABELMAP SEG as evidence."""
    labelmap = {uid for uid, (sop_class, _) in stored.items() if sop_class == LABEL_MAP_SEGMENTATION}
    [report] = [uid for uid, (_, path) in stored.items() if labelmap & set(evidence_uids(path))]
    return report


def _check_received(received: list[Path], stored: dict[str, tuple[str, str]]) -> None:
    """Each instance once; the BINARY SEG, never a LABELMAP one; no SR naming a SEG the peer did not get."""
    datasets = [pydicom.dcmread(path) for path in received]
    uids = [str(d.SOPInstanceUID) for d in datasets]
    assert len(uids) == len(set(uids)), sorted(uids)
    classes = [str(d.SOPClassUID) for d in datasets]
    assert classes.count(SEGMENTATION) == 1 and LABEL_MAP_SEGMENTATION not in classes
    reports = [
        path
        for path, d in zip(received, datasets, strict=True)
        if str(d.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88.")
    ]
    assert len(reports) == 1, "the SR on the BINARY SEG, and not the one on the LABELMAP SEG"
    segmentations = {
        uid for uid, (sop_class, _) in stored.items() if sop_class.startswith("1.2.840.10008.5.1.4.1.1.66.")
    }
    for report in reports:
        missing = segmentations.intersection(evidence_uids(str(report))) - set(uids)
        assert not missing, f"{report.name} reports on segmentations the peer never got: {missing}"
    assert _labelmap_report(stored) not in uids
    expected = {uid for uid, (sop_class, _) in stored.items() if sop_class != LABEL_MAP_SEGMENTATION}
    assert set(uids) == expected - {_labelmap_report(stored)}


def _left_out_line(node: Node, report: str, operation: str) -> str:
    lines = [line for line in node.log().splitlines() if "retrieve.report_left_out" in line and report in line]
    assert lines, node.log()[-4000:]
    line = lines[-1]
    assert operation in line and "does not get as itself" in line and "this is not a failure" in line, line
    return line


def test_getscu_of_the_study_gets_no_sr_on_the_labelmap_seg_it_never_gets(node_with_both_encodings, tmp_path):
    node, study, _ = node_with_both_encodings
    stored = _stored(node, study)
    out = tmp_path / "get"
    out.mkdir()
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    received = sorted(out.iterdir())
    _check_received(received, stored)
    final = output.split("Received C-GET Response (Success)")[-1]
    assert "Final status report" in final, output
    assert re.search(rf"Completed Suboperations : {len(received)}\n", final), final
    assert re.search(r"Failed Suboperations +: 0\n", final), final
    assert re.search(r"Remaining Suboperations : 0\n", final), final
    line = _left_out_line(node, _labelmap_report(stored), "operation=get")
    assert f"{PLANNER} at 127.0.0.1" in line, line


def test_movescu_of_the_study_stores_the_binary_seg_once_and_no_sr_on_the_labelmap_seg(
    node_with_both_encodings, tmp_path
):
    node, study, planner_port = node_with_both_encodings
    stored = _stored(node, study)
    out = tmp_path / "planner"
    out.mkdir()
    with storescp_destination(out, planner_port, PLANNER):
        command = [require_tool("movescu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-aem", PLANNER]
        command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
        result = subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        assert "Received Final Move Response (Success)" in output, output
        expected = len(stored) - 2  # neither the LABELMAP SEG nor its SR
        wait_for(lambda: len(list(out.iterdir())) >= expected, timeout=30, what="moved files")

    _check_received(sorted(out.iterdir()), stored)
    sent = [line for line in node.log().splitlines() if "retrieve.sent" in line and f"move to {PLANNER}" in line][-1]
    assert f"instances={expected} failed=0" in sent, sent
    _left_out_line(node, _labelmap_report(stored), f"move to {PLANNER}")


def test_a_c_move_with_a_damaged_image_counts_it_alone_as_failed(node_with_both_encodings, tmp_path):
    """An instance that cannot be sent fails the C-MOVE's sub-operation; the LABELMAP SEG and its SR, left out after
    the count because the destination gets the BINARY SEG and its SR, are not counted as failed with it."""
    node, study, planner_port = node_with_both_encodings
    stored = _stored(node, study)
    image, image_path = next((uid, path) for uid, (sop_class, path) in stored.items() if sop_class == CT_IMAGE)
    original = Path(image_path).read_bytes()
    out = tmp_path / "planner"
    out.mkdir()
    try:
        with storescp_destination(out, planner_port, PLANNER):
            Path(image_path).write_bytes(original[:-100])  # shortened on disk: the node does not send it
            ae = AE(ae_title=PLANNER)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            assert assoc.is_established
            query = Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
            answers = list(assoc.send_c_move(query, PLANNER, StudyRootQueryRetrieveInformationModelMove))
            assoc.release()
    finally:
        Path(image_path).write_bytes(original)

    final, failed_list = answers[-1]
    assert final.Status == 0xB000, final
    assert final.NumberOfFailedSuboperations == 1, final
    assert final.NumberOfCompletedSuboperations == len(stored) - 3, final
    failed = failed_list.FailedSOPInstanceUIDList
    assert ([failed] if isinstance(failed, str) else list(failed)) == [image], failed_list
    _check_received(sorted(out.iterdir()), {uid: v for uid, v in stored.items() if uid != image})


def _labelmap_series(node: Node, stored: dict[str, tuple[str, str]]) -> tuple[str, str, list[str]]:
    """The LABELMAP SEG, the SR on it, and the SeriesInstanceUIDs of both."""
    report = _labelmap_report(stored)
    [labelmap] = [uid for uid, (sop_class, _) in stored.items() if sop_class == LABEL_MAP_SEGMENTATION]
    with node.sessions() as session:
        series = session.scalars(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid.in_([labelmap, report]))
        ).all()
    return labelmap, report, list(series)


def test_the_sr_on_a_labelmap_seg_retrieved_without_the_binary_segs_sr_is_a_failed_sub_operation(
    node_with_both_encodings, tmp_path
):
    """getscu of the LABELMAP SEG's series and its SR's only: the SEG goes as its BINARY twin, and its SR, which
    names the LABELMAP SEG, is left out; the SR on the twin was not asked for, so the peer gets no measurements and
    is told so (a failed sub-operation), rather than Success as if it had them."""
    node, study, _ = node_with_both_encodings
    stored = _stored(node, study)
    labelmap, report, series = _labelmap_series(node, stored)
    out = tmp_path / "get"
    out.mkdir()
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}"]
    command += ["-k", "SeriesInstanceUID=" + "\\".join(series), "127.0.0.1", str(node.port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr

    received = [pydicom.dcmread(path) for path in out.iterdir()]
    assert [str(d.SOPClassUID) for d in received] == [SEGMENTATION], output  # the BINARY twin, in its place
    final = output.split("Final status report")[-1]
    assert re.search(r"Failed Suboperations +: 1\n", final), output
    assert re.search(r"Completed Suboperations : 1\n", final), output
    line = [line for line in node.log().splitlines() if "retrieve.report_left_out" in line and report in line][-1]
    assert labelmap in line and "no SR on the BINARY SEG that goes instead is retrieved with it" in line, line


def test_the_sr_on_a_labelmap_seg_that_cannot_be_sent_is_a_failed_sub_operation_too(node_with_both_encodings, tmp_path):
    """getscu of the LABELMAP SEG's series and its SR's: the SEG would go as its BINARY twin, whose file is damaged,
    so neither is sent and both are failed sub-operations."""
    node, study, _ = node_with_both_encodings
    stored = _stored(node, study)
    labelmap, report, series = _labelmap_series(node, stored)
    [binary_path] = [path for sop_class, path in stored.values() if sop_class == SEGMENTATION]
    original = Path(binary_path).read_bytes()
    out = tmp_path / "get"
    out.mkdir()
    command = [require_tool("getscu"), "-v", "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}"]
    command += ["-k", "SeriesInstanceUID=" + "\\".join(series), "127.0.0.1", str(node.port)]
    try:
        Path(binary_path).write_bytes(original[:-100])  # shortened on disk: the node does not send it
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        Path(binary_path).write_bytes(original)
    output = result.stdout + result.stderr

    assert list(out.iterdir()) == []
    final = output.split("Final status report")[-1]
    assert re.search(r"Failed Suboperations +: 2\n", final), output
    assert re.search(r"Completed Suboperations : 0\n", final), output
    line = [line for line in node.log().splitlines() if "retrieve.report_left_out" in line and report in line][-1]
    assert labelmap in line and "it counts as a failed sub-operation" in line, line


@pytest.mark.parametrize("damaged", [False, True], ids=["all-readable", "binary-seg-damaged"])
def test_a_cancelled_c_move_counts_no_left_out_instance_as_remaining(node_with_both_encodings, tmp_path, damaged):
    """The requestor sends C-CANCEL as the destination gets the first instance, which it takes a second to store:
    the node sends nothing more, and the instances said to remain are those the destination would have got, not
    the LABELMAP SEG left out for its BINARY twin. An instance that could not be sent before the cancel (the BINARY
    SEG, damaged on disk, goes first) is a failed sub-operation and listed, not remaining."""
    node, study, planner_port = node_with_both_encodings
    stored = _stored(node, study)
    [binary_path] = [path for sop_class, path in stored.values() if sop_class == SEGMENTATION]
    original = Path(binary_path).read_bytes()
    if damaged:
        Path(binary_path).write_bytes(original[:-100])  # shortened on disk: the node does not send it
    received: list[str] = []
    cancel: list[Any] = []  # the requestor's C-CANCEL, sent from the destination's first C-STORE

    def cancel_and_store_slowly(event: Any) -> int:
        if not received:
            cancel[0]()
        received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(1.0)
        return 0x0000

    planner = AE(ae_title=PLANNER)
    planner.supported_contexts = StoragePresentationContexts  # no Label Map Segmentation, as DCMTK 3.6.7
    handlers = [(evt.EVT_C_STORE, cancel_and_store_slowly)]
    server = planner.start_server(("127.0.0.1", planner_port), block=False, evt_handlers=handlers)
    try:
        ae = AE(ae_title=PLANNER)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        context = assoc.accepted_contexts[0].context_id
        message_id = 7
        cancel.append(lambda: assoc.send_c_cancel(message_id, context))
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
        moving = assoc.send_c_move(query, PLANNER, StudyRootQueryRetrieveInformationModelMove, msg_id=message_id)
        answers = list(moving)
        assoc.release()
    finally:
        server.shutdown()
        Path(binary_path).write_bytes(original)

    final, report = answers[-1]
    assert final.Status == 0xFE00, final
    assert len(received) == final.NumberOfCompletedSuboperations == 1, final
    listed = report.get("FailedSOPInstanceUIDList") or []
    failed = {listed} if isinstance(listed, str) else {str(uid) for uid in listed}
    assert final.NumberOfFailedSuboperations == len(failed), report
    if not damaged:  # the BINARY SEG went first; all else remains but the LABELMAP SEG
        assert failed == set() and final.NumberOfRemainingSuboperations == len(stored) - 2, final
        return
    # the BINARY SEG failed and so did the SR on it; the SR on the LABELMAP SEG was left out; one CT image was sent
    [binary] = [uid for uid, (sop_class, _) in stored.items() if sop_class == SEGMENTATION]
    [binary_report] = [uid for uid, (_, path) in stored.items() if binary in evidence_uids(path)]
    assert failed == {binary, binary_report}, report
    images = sum(sop_class == CT_IMAGE for sop_class, _ in stored.values())
    assert final.NumberOfRemainingSuboperations == images - 1, final
