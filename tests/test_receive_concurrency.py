"""Receiving off the acknowledgement path and in several processes: nothing acknowledged is lost, caps hold.

The instance recorder writes the database after the C-STORE is answered; these tests hold the
database locked or kill receiving processes while it lags, and check that every acknowledged
instance ends up stored and recorded once, that no series completes before its instances are
recorded, and that the association caps count the connections of every receiving process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from db.jobs import job_for_series_uid
from db.models import JobEvent, JobState
from dicom_node import status
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.security import AssociationCaps
from tests.conftest import CT_RULES, storescu, wait_for
from tests.test_faults import (
    acknowledged_uids,
    assert_byte_identical,
    assert_no_temporary_files,
    hold_database_lock,
    recorded_uids,
    send_in_background,
    stored_instances,
)

pytestmark = pytest.mark.integration

SMALL_CT = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
LARGER_CT = PhantomSpec(rows=256, columns=256, slices=60, pixel_spacing=(1.5, 1.5), slice_spacing=2.0)
TWO_RECEIVERS = {"receive": {"processes": 2}}


def store_on_one_association(port: int, files: Sequence[Path]) -> tuple[list[int], AE]:
    """C-STORE each file on one association, not released yet; returns the statuses and the open association."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    answers = [int(assoc.send_c_store(path).Status) for path in files]
    return answers, assoc


def receiver_pids(log: str) -> dict[int, int]:
    """Receiving process number -> its latest pid, from the ``receiver.started`` lines."""
    return {int(number): int(pid) for number, pid in re.findall(r"receiver\.started receiver=(\d+) pid=(\d+)", log)}


def journal_entries(storage: Path) -> int:
    folder = storage / "journal"
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.journal")) if folder.is_dir() else 0


def test_instances_acknowledged_while_the_database_is_locked_are_recorded_later_and_the_series_waits(
    tmp_path, start_node
):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)  # ImagesInAcquisition says 12
    node = start_node(
        rules=CT_RULES,
        database={"busy_timeout_seconds": 1},
        completion={"quiet_seconds": 2, "expected_count_timeout_seconds": 2, "check_interval_seconds": 0.2},
    )
    assert storescu(node.port, series.files[:2]).returncode == 0  # the series exists, its clock is running
    assert sorted(recorded_uids(node.sessions)) == sorted(series.sop_instance_uids[:2])

    holder = hold_database_lock(node.storage / "dicom-node.db", seconds=8)
    answers, assoc = store_on_one_association(node.port, series.files[2:5])
    acknowledged_while_locked = holder.poll() is None
    said_while_locked = node.cli("status").stdout  # a reader: the lock does not stop it
    assoc.release()  # answered once the recorder caught up (after the lock) or after 10 s
    holder.wait(timeout=30)

    assert answers == [status.SUCCESS] * 3
    assert acknowledged_while_locked, "the C-STOREs must have been answered while the database was locked"
    wait_for(lambda: len(recorded_uids(node.sessions)) == 5, timeout=60, what="the recorder to catch up")
    node.wait_for_state(series.series_instance_uid, JobState.QUEUED)
    with node.sessions() as session:
        job = job_for_series_uid(session, series.series_instance_uid)
        assert job is not None
        reasons = [e.reason for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job.id))]
    # Completed once, with all five: never on the first two while three waited to be recorded.
    assert not any("re-opened" in (reason or "") for reason in reasons), reasons
    assert any("only 5 of 12 expected images" in (reason or "") for reason in reasons), reasons
    assert_byte_identical(series, stored_instances(node.storage), series.sop_instance_uids[:5])
    log = node.log()
    assert log.count("recorder.waiting") == 1 and "recorder.resumed" in log
    assert journal_entries(node.storage) == 0
    assert " ".join(said_while_locked.split()).endswith(  # status said where the three were, not only the two
        "up to 3 acknowledged image(s) are not in the database yet: they are safe on disk, named in the receiving "
        f"processes' journals ({node.storage / 'journal'}), and are recorded as soon as the database takes writes "
        "(they are not in the table above until then)"
    ), said_while_locked
    assert "not in the database yet" not in node.cli("status").stdout


def test_receiver_sigkilled_while_its_recorder_lags_loses_nothing_and_serve_indexes_its_files(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", SMALL_CT)
    node = start_node(**TWO_RECEIVERS, database={"busy_timeout_seconds": 1}, completion={"quiet_seconds": 600})
    serve_pid = node.process.pid if node.process else None
    pids = wait_for(lambda: len(receiver_pids(node.log())) == 2 and receiver_pids(node.log()), what="two receivers")

    holder = hold_database_lock(node.storage / "dicom-node.db", seconds=6)
    answers, assoc = store_on_one_association(node.port, series.files[:8])  # acknowledged, not recorded
    assert answers == [status.SUCCESS] * 8
    assert journal_entries(node.storage) == 8
    for pid in pids.values():  # whichever served the association: kill both, no clean-up of any kind
        os.kill(pid, signal.SIGKILL)
    assoc.abort()
    holder.wait(timeout=30)

    wait_for(lambda: len(recorded_uids(node.sessions)) == 8, timeout=90, what="serve to index the journals")
    assert node.process is not None and node.process.pid == serve_pid and node.process.poll() is None
    wait_for(
        lambda: set(receiver_pids(node.log()).values()).isdisjoint(pids.values()),
        timeout=90,
        what="both receivers started again",
    )
    assert sorted(recorded_uids(node.sessions)) == sorted(series.sop_instance_uids[:8])
    assert_byte_identical(series, stored_instances(node.storage), series.sop_instance_uids[:8])
    assert journal_entries(node.storage) == 0
    log = node.log()
    assert log.count("receiver.died") == 2 and "recorder.recovered" in log

    assert storescu(node.port, series.files).returncode == 0  # the rest, and the first eight again
    assert sorted(recorded_uids(node.sessions)) == sorted(series.sop_instance_uids)
    assert_no_temporary_files(node.storage)


def test_ten_concurrent_senders_across_receivers_store_everything_once(tmp_path, start_node):
    series = [write_phantom_series(tmp_path / f"ct{n}", SMALL_CT) for n in range(10)]
    node = start_node(**TWO_RECEIVERS, network={"maximum_associations_per_host": 16}, completion={"quiet_seconds": 600})
    senders = [send_in_background(node.port, s.files) for s in series]
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]

    for one, output in zip(series, outputs, strict=True):
        assert sorted(acknowledged_uids(one, output)) == sorted(one.sop_instance_uids), output[-2000:]
    every_uid = [uid for one in series for uid in one.sop_instance_uids]
    assert sorted(recorded_uids(node.sessions)) == sorted(every_uid)
    for one in series:
        assert_byte_identical(one, stored_instances(node.storage), one.sop_instance_uids)
    served_by = set(re.findall(r"association\.accepted calling_ae=PACS address=\S+ receiver=(\d+)", node.log()))
    print(f"associations served by receiving processes {sorted(served_by)}")
    assert served_by <= set(map(str, receiver_pids(node.log()).values()))


def test_the_per_host_cap_counts_the_connections_of_every_receiving_process(tmp_path, start_node):
    node = start_node(
        **TWO_RECEIVERS, network={"maximum_associations_per_host": 4, "association_request_timeout_seconds": 1}
    )
    wait_for(lambda: "node.ready" in node.log(), what="both receivers listening")
    time.sleep(2)  # the start-up port probe (connect, close) holds its place until its request times out
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held = []
    for _ in range(10):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        if assoc.is_established:
            held.append(assoc)
    refused_lines = node.log().count("network.maximum_associations_per_host is 4")
    served_by = set(re.findall(r"association\.accepted calling_ae=PACS address=\S+ receiver=(\d+)", node.log()))
    for assoc in held:
        assoc.release()

    assert len(held) == 4
    assert 1 <= refused_lines <= 2  # the six refusals: one line per receiving process, the rest counted
    print(f"the four held associations were served by receiving processes {sorted(served_by)}")

    def associates() -> bool:  # places are given back as the released associations end
        again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        established = again.is_established
        if established:
            again.release()
        return established

    wait_for(associates, timeout=30, interval=0.5, what="a new association after the four were released")


def _hold_places(caps: AssociationCaps, count: int) -> None:
    for _ in range(count):
        assert caps.hold("10.0.0.7", per_host=3) is None


def test_association_caps_are_shared_between_processes():
    caps = AssociationCaps(slots=8, processes=2)
    other = multiprocessing.get_context("spawn").Process(target=_hold_places, args=(caps.for_process(1), 2))
    other.start()
    other.join(timeout=60)
    assert other.exitcode == 0

    assert caps.held("10.0.0.7") == 2  # taken by the other process
    assert caps.hold("10.0.0.7", per_host=3) is None
    assert caps.hold("10.0.0.7", per_host=3) == 3  # the fourth is refused, counting both processes
    assert caps.hold("::1", per_host=3) is None and caps.total() == 4
    caps.release("10.0.0.7")
    assert caps.held("10.0.0.7") == 2 and caps.total() == 3
    caps.release("10.0.0.7")  # this process holds none any more: the other's two are not its to give back
    assert caps.held("10.0.0.7") == 2 and caps.total() == 3

    caps.forget(1)  # the other process died: its places are free again, this one's stay
    assert caps.held("10.0.0.7") == 0 and caps.total() == 1 and caps.held("::1") == 1


def _die_holding_the_lock(caps: AssociationCaps) -> None:
    assert caps.hold("10.0.0.7", per_host=3) is None
    caps._lock.acquire()
    os._exit(0)  # killed between taking the lock and giving it back


def test_a_receiving_process_killed_while_it_held_the_shared_lock_does_not_stop_the_others(caplog):
    caps = AssociationCaps(slots=8, processes=2)
    dying = multiprocessing.get_context("spawn").Process(target=_die_holding_the_lock, args=(caps.for_process(1),))
    dying.start()
    dying.join(timeout=60)
    assert dying.exitcode == 0  # holding one place, and the lock

    caps.forget(1)

    assert caps.hold("10.0.0.7", per_host=3) is None  # the lock works again, and the dead one's place is free
    assert caps.held("10.0.0.7") == 1 and caps.total() == 1
    (recovered,) = [record for record in caplog.records if record.msg == "receiver.lock_recovered"]
    assert "died while it held the lock on the shared connection counts" in recovered.event_fields["note"]


def _hold_the_lock_for(caps: AssociationCaps, seconds: float, started: Any) -> None:
    with caps._locked():
        started.set()
        time.sleep(seconds)  # a live process, slow inside the lock (paused, swapped out)


def test_forgetting_a_dead_process_never_takes_the_lock_from_a_live_one_that_is_slow_inside_it(caplog):
    caps = AssociationCaps(slots=8, processes=2)
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    slow = context.Process(target=_hold_the_lock_for, args=(caps.for_process(0), 4.0, started))
    slow.start()
    assert started.wait(60)

    began = time.monotonic()
    caps.forget(1)  # process 1 died; process 0 still holds the lock, for longer than ORPHANED_LOCK_SECONDS
    waited = time.monotonic() - began

    slow.join(timeout=60)
    assert slow.exitcode == 0  # its own release of the lock worked: nobody released it under it
    assert waited > AssociationCaps.ORPHANED_LOCK_SECONDS
    assert not [record for record in caplog.records if record.msg == "receiver.lock_recovered"]


def test_bytes_in_flight_are_summed_over_processes_and_forgotten_with_a_dead_one():
    caps = AssociationCaps(slots=8, processes=3)
    assert caps.for_process(2).set_in_flight(5_000) == 5_000
    assert caps.for_process(0).set_in_flight(1_000) == 6_000
    assert caps.for_process(0).set_in_flight(0) == 5_000  # each process writes its own total, not a difference
    caps.forget(2)
    assert caps.set_in_flight(7) == 7
    with pytest.raises(ValueError, match="receiving process 3 has no row"):
        caps.for_process(3)


def test_in_flight_limit_must_hold_the_largest_data_set():
    from pydantic import ValidationError

    from dicom_node.config import NetworkSettings

    with pytest.raises(ValidationError, match=r"maximum_in_flight_megabytes \(2000\) must be at least"):
        NetworkSettings(maximum_data_set_megabytes=3000, maximum_in_flight_megabytes=2000)
    # a configuration written before the setting, with a larger data set limit, still loads
    assert NetworkSettings(maximum_data_set_megabytes=8000).maximum_in_flight_megabytes == 8000
    assert NetworkSettings().maximum_in_flight_megabytes == 6000


@pytest.mark.parametrize(("cores", "configured", "expected"), [(2, 0, 4), (1, 0, 2), (16, 0, 8), (2, 1, 1), (2, 3, 3)])
def test_receiving_processes_default_to_two_per_core_at_most_eight(monkeypatch, cores, configured, expected):
    from dicom_node.config import Settings
    from dicom_node.receive import processes

    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    settings = Settings.model_validate({"receive": {"processes": configured}})
    assert processes.receiving_processes(settings) == expected


def test_places_held_by_a_killed_receiving_process_are_given_back_when_it_is_started_again(tmp_path, start_node):
    node = start_node(**TWO_RECEIVERS, network={"maximum_associations_per_host": 4})
    pids = wait_for(lambda: len(receiver_pids(node.log())) == 2 and receiver_pids(node.log()), what="two receivers")
    time.sleep(2)  # the start-up port probe (connect, close) holds its place until its request times out
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(4)]
    assert all(assoc.is_established for assoc in held)
    for pid in pids.values():  # the processes that hold the four places die without giving any back
        os.kill(pid, signal.SIGKILL)
    for assoc in held:
        assoc.abort()
    wait_for(
        lambda: set(receiver_pids(node.log()).values()).isdisjoint(pids.values()),
        timeout=90,
        what="both receivers started again",
    )

    again = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(4)]
    established = [assoc.is_established for assoc in again]
    for assoc in again:
        if assoc.is_established:
            assoc.release()
    assert established == [True] * 4, node.log()[-3000:]


def test_a_receiver_started_again_stops_as_the_others_do_not_killed_with_the_supervisor(tmp_path):
    """Linux kills a process started with PR_SET_PDEATHSIG when the thread that started it ends: a receiver the
    supervisor started again must outlive the supervisor's stop request, so shutdown stops it as it stops the
    others (it records what it acknowledged first), not by a SIGKILL."""
    from db.session import make_engine, make_session_factory, migrate
    from dicom_node.config import Settings
    from dicom_node.receive.processes import ReceiverPool
    from dicom_node.receive.storage import InstanceStore
    from tests.conftest import free_port

    settings = Settings(storage={"directory": tmp_path / "storage"}, network={"port": free_port()}, **TWO_RECEIVERS)
    migrate(settings.database_url)
    pool = ReceiverPool(
        settings, InstanceStore(settings.storage.directory), make_session_factory(make_engine(settings.database_url)), 2
    )
    pool.start()
    try:
        first = pool._processes[0]
        os.kill(first.pid, signal.SIGKILL)
        restarted = wait_for(
            lambda: pool._processes[0] is not first and pool._processes[0].is_alive() and pool._processes[0],
            timeout=60,
            what="the receiver started again",
        )
        pool._stop.set()  # what shutdown asks first
        pool._thread.join(timeout=2 * pool.CHECK_SECONDS + 1)
        time.sleep(0.5)
        assert restarted.is_alive()
    finally:
        pool.shutdown()
    assert restarted.exitcode == 0  # stopped by SIGTERM, as the other receiver
    assert pool._processes[1].exitcode == 0


def test_a_receiver_killed_while_starting_is_started_again_and_start_up_goes_on(tmp_path, caplog):
    """serve once stopped with a traceback (``receiving process 0 did not start (exit status -9)``) when a
    receiving process was killed during start-up."""
    from db.session import make_engine, make_session_factory, migrate
    from dicom_node.config import Settings
    from dicom_node.receive.processes import ReceiverPool
    from dicom_node.receive.storage import InstanceStore
    from tests.conftest import free_port

    settings = Settings(storage={"directory": tmp_path / "storage"}, network={"port": free_port()}, **TWO_RECEIVERS)
    migrate(settings.database_url)
    pool = ReceiverPool(
        settings, InstanceStore(settings.storage.directory), make_session_factory(make_engine(settings.database_url)), 2
    )
    spawn, killed = pool._spawn, []

    def spawn_and_kill_the_first(number: int):
        process, ready = spawn(number)
        if not killed:
            os.kill(process.pid, signal.SIGKILL)  # killed before it listens
            killed.append(process.pid)
        return process, ready

    pool._spawn = spawn_and_kill_the_first  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="dicom_node.receive.processes")
    pool.start()
    try:
        assert all(process.is_alive() for process in pool._processes) and len(pool._processes) == 2
        assert killed[0] not in pool.pids
        (said,) = [r for r in caplog.records if r.getMessage() == "receiver.start_failed"]
        assert said.event_fields["reason"] == (  # type: ignore[attr-defined]
            "receiving process 0 stopped while starting: it was killed (signal 9, SIGKILL), most often by the "
            "kernel's out-of-memory killer (see `journalctl -k` or `dmesg`), else by an operator's kill -9; "
            "starting it again (attempt 2 of 3)"
        )
    finally:
        pool.shutdown()
