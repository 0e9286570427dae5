"""A series whose images came on an association cut short (the sender's A-ABORT, a dropped connection) is not
processed after the quiet period as if whole: completion waits as for an expected count, then marks it partial; a
sender that sends it again on an association it releases makes it whole and it completes as usual."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from db import transfers
from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.open_transfers import series_being_sent
from dicom_node.watcher import receiving_progress
from tests.conftest import CT_RULES, wait_for
from tests.test_receiver_restarts import receiving_processes

pytestmark = pytest.mark.integration

# without ImagesInAcquisition, as most CT series come: only the quiet period tells they are whole
SPEC = PhantomSpec(
    rows=32,
    columns=32,
    slices=12,
    pixel_spacing=(8.0, 8.0),
    slice_spacing=5.0,
    noise_sd=5.0,
    images_in_acquisition=False,
)
QUIET_SECONDS = 1.0
WAIT_FOR_THE_REST_SECONDS = 8.0


def _associate(port: int, files) -> Any:
    """An association from MODALITY (pynetdicom) that can send ``files``, left open."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    for syntax in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(datasets[0].SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _store(assoc: Any, files) -> None:
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000


def _send(port: int, files, *, abort: bool) -> None:
    """C-STORE ``files`` on one association as a sender does (pynetdicom), then release it, or abort it."""
    assoc = _associate(port, files)
    _store(assoc, files)
    if abort:
        assoc.abort()
    else:
        assoc.release()


COMPLETION = {
    "quiet_seconds": QUIET_SECONDS,
    "check_interval_seconds": 0.2,
    "expected_count_timeout_seconds": WAIT_FOR_THE_REST_SECONDS,
}


@pytest.fixture
def node(start_node):
    return start_node(rules=CT_RULES, completion=COMPLETION)


def _partial_warning_of(node, series_instance_uid: str) -> str:
    """The partial-series warning of a series that waited for the rest of a transfer cut short, once it is QUEUED."""
    node.wait_for_state(series_instance_uid, JobState.QUEUED, timeout=60)
    with node.sessions() as session:
        job = job_for_series_uid(session, series_instance_uid)
        assert job is not None
        [warning] = job.warnings
    return warning


def _waits_for_the_rest(node, series_instance_uid: str) -> None:
    """Well past the quiet period the series still receives, its status saying the transfer was cut short."""
    time.sleep(QUIET_SECONDS * 3)
    assert node.job_state(series_instance_uid) is JobState.RECEIVING
    with node.sessions() as session:
        job = job_for_series_uid(session, series_instance_uid)
        assert job is not None
        progress = receiving_progress(session, job.series, QUIET_SECONDS)
    assert progress.endswith("; the association from MODALITY sending it was cut short: waiting for the rest")


def test_a_series_cut_short_waits_for_the_rest_then_is_marked_partial(node, tmp_path):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    started = time.monotonic()
    _send(node.port, series.files[:5], abort=True)

    time.sleep(QUIET_SECONDS * 3)  # well past the quiet period
    assert node.job_state(series.series_instance_uid) is JobState.RECEIVING
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        progress = receiving_progress(session, job.series, QUIET_SECONDS)
    assert progress.endswith("; the association from MODALITY sending it was cut short: waiting for the rest")

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=60)
    assert time.monotonic() - started >= WAIT_FOR_THE_REST_SECONDS
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        warnings, events = job.warnings, [event.reason for event in job.events]
    assert warnings == [
        "partial series: the association from MODALITY that sent images of it ended without a release (MODALITY at "
        "127.0.0.1 aborted the association (it sent an A-ABORT) instead of releasing it), and no image came in the "
        f"{WAIT_FOR_THE_REST_SECONDS:g} s after; the result covers the 5 received and may lack the rest"
    ]
    assert (
        f"no new instance for {WAIT_FOR_THE_REST_SECONDS:g} s after an association sending it was cut short (5 "
        "received; partial series)"
    ) in events
    assert "series.interrupted calling_ae=MODALITY" in node.log()


def test_a_series_cut_short_and_sent_again_whole_completes_after_the_quiet_period_without_a_warning(node, tmp_path):
    series = write_phantom_series(tmp_path / "ct", SPEC)
    _send(node.port, series.files[:5], abort=True)
    _send(node.port, series.files, abort=False)  # the sender's retry: the whole series, released
    sent_again = time.monotonic()

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=30)
    assert time.monotonic() - sent_again < WAIT_FOR_THE_REST_SECONDS
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and not job.warnings
        assert job.series.instance_count == SPEC.slices


def test_a_series_released_whole_is_not_held_by_an_earlier_interruption_of_another_series(node, tmp_path):
    cut = write_phantom_series(tmp_path / "cut", SPEC)
    whole = write_phantom_series(tmp_path / "whole", SPEC)
    _send(node.port, cut.files[:3], abort=True)
    _send(node.port, whole.files, abort=False)

    node.wait_for_state(whole.series_instance_uid, JobState.QUEUED, timeout=30)
    assert node.job_state(cut.series_instance_uid) is JobState.RECEIVING
    wait_for(
        lambda: node.job_state(cut.series_instance_uid) is JobState.QUEUED,
        timeout=60,
        what="the series cut short to complete after the wait",
    )


def test_a_series_whose_receiving_process_is_killed_mid_association_waits_for_the_rest(start_node, tmp_path):
    """A receiving process killed (as the out-of-memory killer does) takes its open association with it, and no
    abort is ever handled for it: the supervisor marks the series it was storing cut short, naming how it ended."""
    node = start_node(rules=CT_RULES, completion=COMPLETION, receive={"processes": 2})
    assert node.process is not None
    wait_for(lambda: "scp.listening" in node.log(), timeout=60, what="both receiving processes to listen")
    series = write_phantom_series(tmp_path / "ct", SPEC)
    assoc = _associate(node.port, series.files)
    _store(assoc, series.files[:5])
    killed = receiving_processes(node.process.pid)
    for pid in killed:  # the one holding the association among them
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not assoc.is_alive(), timeout=30, what="the sender to see its association end")

    _waits_for_the_rest(node, series.series_instance_uid)
    warning = _partial_warning_of(node, series.series_instance_uid)
    assert any(
        warning.startswith(
            "partial series: the association from MODALITY that sent images of it ended without a release (the "
            f"node's receiving process (pid {pid}) stopped while the association from MODALITY at 127.0.0.1 was "
            "open: it was killed (signal 9, SIGKILL)"
        )
        for pid in killed
    ), warning
    assert warning.endswith("the result covers the 5 received and may lack the rest")


def test_a_receiving_process_stopped_past_its_limit_is_ended_and_its_series_waits_for_the_rest(start_node, tmp_path):
    """A receiving process that stops running (SIGSTOP here; a hang alike) answers nothing on the associations it
    holds and was counted as up: the supervisor ends it once its accepting loop has not run for
    receive.unresponsive_seconds, marks its series cut short and starts it again. A shorter stop is waited out."""
    completion = {**COMPLETION, "expected_count_timeout_seconds": 20.0}  # still waiting once the stop is ended
    node = start_node(rules=CT_RULES, completion=completion, receive={"processes": 2, "unresponsive_seconds": 5})
    assert node.process is not None
    wait_for(lambda: "scp.listening" in node.log(), timeout=60, what="both receiving processes to listen")
    series = write_phantom_series(tmp_path / "ct", SPEC)
    assoc = _associate(node.port, series.files)
    _store(assoc, series.files[:4])
    stopped = receiving_processes(node.process.pid)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(1)
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    _store(assoc, series.files[4:5])  # a stop shorter than the limit: the same association goes on
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not assoc.is_alive(), timeout=30, what="the sender to see its association end")
        wait_for(
            lambda: (
                len(receiving_processes(node.process.pid)) == 2
                and not set(receiving_processes(node.process.pid)) & set(stopped)
            ),
            timeout=30,
            what="both receiving processes to be ended and started again",
        )
    finally:
        for pid in stopped:
            if pid in receiving_processes(node.process.pid):
                os.kill(pid, signal.SIGCONT)  # one the node did not end: let the node stop in order
    assert "receiver.unresponsive" in node.log()

    _waits_for_the_rest(node, series.series_instance_uid)
    warning = _partial_warning_of(node, series.series_instance_uid)
    assert "its accepting loop had not run for " in warning, warning
    assert "(the process was stopped or hung), so the node ended it" in warning, warning
    assert warning.endswith("the result covers the 5 received and may lack the rest")
    echo = AE(ae_title="MODALITY")
    echo.add_requested_context("1.2.840.10008.1.1")
    answering = echo.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert answering.is_established
    assert answering.send_c_echo().Status == 0x0000
    answering.release()


def test_a_series_being_received_when_the_whole_node_is_killed_waits_for_the_rest_after_the_restart(
    start_node, tmp_path
):
    node = start_node(rules=CT_RULES, completion=COMPLETION)
    series = write_phantom_series(tmp_path / "ct", SPEC)
    assoc = _associate(node.port, series.files)
    _store(assoc, series.files[:5])
    node.kill()
    assoc.abort()
    node.start()

    _waits_for_the_rest(node, series.series_instance_uid)
    warning = _partial_warning_of(node, series.series_instance_uid)
    assert "was open: the node stopped without ending its associations in order (it was killed or crashed" in warning


def test_a_release_beside_an_association_cut_short_does_not_make_the_series_whole(node, tmp_path):
    """Two associations send halves of one series at once; the first (the upper half) is cut short after 3 of its 6
    images, the other releases after its 6: the release did not send the first one's images again, so the series waits for
    them and is then marked partial (it was processed after the quiet period as whole, 9 of 12 images)."""
    series = write_phantom_series(tmp_path / "ct", SPEC)
    first, second = _associate(node.port, series.files), _associate(node.port, series.files)
    _store(first, series.files[6:9])  # the upper half, cut short: the series' last 3 images never come
    _store(second, series.files[:6])
    first.abort()
    time.sleep(0.5)  # the node has handled the abort
    second.release()

    _waits_for_the_rest(node, series.series_instance_uid)
    warning = _partial_warning_of(node, series.series_instance_uid)
    assert warning.endswith("the result covers the 9 received and may lack the rest")


def test_a_series_whose_sender_pauses_longer_than_the_quiet_period_on_an_open_association_is_completed_once(
    node, tmp_path
):
    """A scanner sending images as it reconstructs them pauses between them on one association: each pause longer
    than the quiet period completed the series, and each later image reopened it (one CT, five runs, fifteen
    result series at the PACS). While the association is open and has sent nothing else since, it waits."""
    series = write_phantom_series(tmp_path / "ct", SPEC)
    assoc = _associate(node.port, series.files)
    _store(assoc, series.files[:4])
    time.sleep(QUIET_SECONDS * 4)
    assert node.job_state(series.series_instance_uid) is JobState.RECEIVING
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        being_sent = series_being_sent(node.storage / "journal")
        progress = receiving_progress(session, job.series, QUIET_SECONDS, being_sent)
    assert progress.endswith(
        f"; the association sending it is still open: it completes once that ends and {QUIET_SECONDS:g} s passed "
        "without a new image"
    )
    _store(assoc, series.files[4:])
    assoc.release()

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=30)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and not job.warnings and job.series.instance_count == SPEC.slices
        completions = [event for event in job.events if event.to_state is JobState.COMPLETE]
    assert len(completions) == 1


def test_a_series_whose_sender_leaves_its_association_idle_completes_after_the_nodes_idle_abort_without_a_warning(
    start_node, tmp_path
):
    """The node aborts an association idle for network.network_timeout_seconds; that abort once read as a transfer
    cut short (the idle timer had started again by the time the series was marked), so the whole series waited
    expected_count_timeout_seconds and was marked partial."""
    wait_for_the_rest = 60.0  # an open association holds its series this long at most: far from the 2 s + 1 s
    completion = {**COMPLETION, "expected_count_timeout_seconds": wait_for_the_rest}
    node = start_node(rules=CT_RULES, completion=completion, network={"network_timeout_seconds": 2})
    series = write_phantom_series(tmp_path / "ct", SPEC)
    assoc = _associate(node.port, series.files)
    _store(assoc, series.files)  # then nothing: the sender keeps the association open
    started = time.monotonic()

    node.wait_for_state(series.series_instance_uid, JobState.QUEUED, timeout=wait_for_the_rest + 30)
    assert time.monotonic() - started < wait_for_the_rest  # completed once the abort ended the association
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and not job.warnings
    assert "series.interrupted" not in node.log()


def test_a_released_association_leaves_the_open_transfers_before_the_sender_hears_the_release(start_node, tmp_path):
    """A node killed in the moment after a release was answered, before the release's handlers ran, marked the
    series it had just received whole as cut short at its next start."""
    node = start_node(rules=CT_RULES, completion={"quiet_seconds": 600, "expected_count_timeout_seconds": 600})
    series = write_phantom_series(tmp_path / "ct", SPEC)
    _send(node.port, series.files, abort=False)
    assert series_being_sent(node.storage / "journal") == set()  # read the moment release() returned
    node.kill()
    node.start()
    time.sleep(2)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None and job.state is JobState.RECEIVING
        assert transfers.interruption_of(session, series.series_instance_uid) is None
