"""Logging set-up: pynetdicom's per-PDU log handlers are bound only when their lines are kept (DEBUG)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
import socket
import sqlite3
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory, migrate
from dicom_node.config import NetworkSettings, Settings
from dicom_node.logs import JsonFormatter, TextFormatter, configure_logging, log_event
from dicom_node.receive import scp
from dicom_node.security import start_guarded_server
from tests.conftest import free_port, wait_for


@pytest.fixture
def restored_logging(monkeypatch) -> Iterator[None]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", _config.LOG_HANDLER_LEVEL)
    root, pynetdicom_logger = logging.getLogger(), logging.getLogger("pynetdicom")
    saved = (root.handlers[:], root.level, pynetdicom_logger.level)
    yield
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    pynetdicom_logger.setLevel(saved[2])


def _echo_through_the_node(on_echo: Callable[[evt.Event], int], calling_ae: str = "PACS") -> int:
    """One C-ECHO association from ``calling_ae`` to the node's own server, whose handler is ``on_echo``; the status
    answered."""
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    server = start_guarded_server(
        scp.build_ae(network), (network.host, network.port), network, [(evt.EVT_C_ECHO, on_echo)]
    )
    try:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(Verification)
        assoc = ae.associate(network.host, network.port, ae_title=network.ae_title)
        assert assoc.is_established
        status = int(assoc.send_c_echo().Status)
        assoc.release()
    finally:
        server.shutdown()
    return status


def _accepted_association_after_echo() -> Any:
    """The node's side of one C-ECHO association, served by the node's own server."""
    accepted: list[Any] = []

    def on_echo(event: evt.Event) -> int:
        accepted.append(event.assoc)
        return 0x0000

    assert _echo_through_the_node(on_echo) == 0x0000
    return accepted[0]


def test_pynetdicom_per_pdu_log_handlers_are_bound_only_at_debug(restored_logging):
    configure_logging("INFO")
    quiet = _accepted_association_after_echo()
    configure_logging("DEBUG")
    verbose = _accepted_association_after_echo()

    assert quiet.get_handlers(evt.EVT_PDU_RECV) == []
    assert quiet.get_handlers(evt.EVT_DIMSE_SENT) == []
    assert (standard_pdu_recv_handler, None) in verbose.get_handlers(evt.EVT_PDU_RECV)
    assert logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)


def test_a_thread_that_fails_is_a_log_line_naming_it_not_pythons_bare_trace(restored_logging, monkeypatch, capsys):
    """Python printed 'Exception in thread instance-recorder: Traceback ...' on stderr, outside the log's format."""
    import threading

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    configure_logging("INFO")

    def fails() -> None:
        raise PermissionError(1, "Operation not permitted", "/storage/journal/1-0.journal")

    thread = threading.Thread(target=fails, name="instance-recorder")
    thread.start()
    thread.join()

    (line,) = capsys.readouterr().err.splitlines()
    assert line.split(" ", 2)[1:] == [
        "CRITICAL",
        "thread.failed thread=instance-recorder reason=\"the node's instance-recorder thread stopped because of an "
        "unexpected error (details follow); what it does is not done until the node is restarted: restart it and "
        'report the error" exception=' + line.split(" exception=", 1)[1],
    ]
    assert "PermissionError: [Errno 1] Operation not permitted" in line
    assert "Exception in thread" not in line


def test_the_throttle_lets_one_event_per_key_through_each_interval_and_counts_the_rest(monkeypatch):
    from dicom_node import logs

    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(10.0, max_keys=3)

    assert [throttle.admit(key) for key in ("a", "b", "c")] == [0, 0, 0]
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5  # counted, not let through
    clock[0] += 10.0
    assert throttle.admit("a") == 5  # the next one says how many were dropped

    assert [throttle.admit("a") for _ in range(2)] == [None, None]
    assert throttle.admit("d") == 0  # full: "b", used least recently, makes room; nothing of it was dropped
    assert throttle.admit("e") == 0 and throttle.admit("f") == 0  # "c", then "a" with its 2 dropped events
    assert throttle.evicted_events() == 2 and throttle.evicted_events() == 0  # reported once


def _one_event(fmt: str, level: int = logging.WARNING, exc: BaseException | None = None, **fields: Any) -> str:
    """What the node's formatter for ``fmt`` writes for one event with ``fields``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger(f"tests.logs.{fmt}")
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    try:
        if exc is None:
            log_event(logger, level, "instance.refused", **fields)
        else:
            try:
                raise exc
            except type(exc):
                logger.exception("query.failed", extra={"event_fields": fields})
    finally:
        logger.handlers[:] = []
    return stream.getvalue()


def _text_value(line: str, key: str) -> str:
    """One field of a text line, as it was logged: a quoted value read back as JSON."""
    raw = line.split(f" {key}=", 1)[1]
    if raw.startswith('"'):
        value, _ = json.JSONDecoder().raw_decode(raw)
        return str(value)
    return raw.split(" ", 1)[0].rstrip("\n")


# every character str.splitlines() breaks at, a terminal escape, and format characters that reorder text
SEPARATORS = "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029\x1b\x00\x7f\u202e\u200b"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_peers_control_characters_never_break_a_log_line(fmt):
    forged = "1.2.3\rFAKE\x1b[2J"
    every = "".join(f"a{c}b" for c in SEPARATORS)
    written = _one_event(fmt, sop_instance_uid=forged, every_separator=every, calling_ae="A\u2028B")

    assert len(written.splitlines()) == 1, written
    assert written.endswith("\n") and written[:-1].isprintable(), repr(written)
    if fmt == "text":
        assert [_text_value(written, k) for k in ("sop_instance_uid", "every_separator", "calling_ae")] == [
            forged,
            every,
            "A\u2028B",
        ]
        assert ' sop_instance_uid="1.2.3\\rFAKE\\u001b[2J"' in written
    else:
        fields = json.loads(written)
        assert (fields["sop_instance_uid"], fields["every_separator"], fields["calling_ae"]) == (
            forged,
            every,
            "A\u2028B",
        )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_unprintable_message_or_exception_stays_on_one_line(fmt):
    written = _one_event(fmt, exc=ValueError("bad value 1.2\r\n\u2028FAKE " + "9" * 50_000), calling_ae="PACS")

    assert len(written.splitlines()) == 1 and written[:-1].isprintable(), repr(written[:300])
    assert len(written) < 5000 and written.count("characters cut)") == 1  # the long line of the traceback

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("tests.logs.foreign")  # a library's own line, with what a peer sent in it
    logger.handlers[:], logger.propagate = [handler], False
    logger.warning("peer %s said %s", "A\rB\x1b[2J", "X" * 5000)
    logger.handlers[:] = []
    line = stream.getvalue()
    assert len(line.splitlines()) == 1 and line[:-1].isprintable() and len(line) < 1300, repr(line[:300])
    assert "(4018 characters cut)" in line


def test_legitimate_values_stay_readable():
    written = _one_event(
        "text",
        sop_instance_uid="1.2.840.113619.2.55.3.604688119.1",
        calling_ae="PACS",
        uids="1.2\\1.3",
        reason='QueryRetrieveLevel "FRAME" is not one of PATIENT, STUDY',
        description="Thorax nativ für Planung",
        empty="",
        count=3,
    )

    assert written.split(" ", 2)[2] == (
        "instance.refused sop_instance_uid=1.2.840.113619.2.55.3.604688119.1 calling_ae=PACS uids=1.2\\1.3 "
        'reason="QueryRetrieveLevel \\"FRAME\\" is not one of PATIENT, STUDY" '
        'description="Thorax nativ für Planung" empty="" count=3\n'
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_value_is_cut_to_a_thousand_characters_saying_how_many_were_cut(fmt):
    written = _one_event(fmt, reason="X" * 900_000, listed=["Y" * 500] * 10, calling_ae="PACS", matches=12)

    assert len(written) < 3000, len(written)
    values = json.loads(written) if fmt == "json" else {k: _text_value(written, k) for k in ("reason", "listed")}
    assert values["reason"] == "X" * 1000 + "...(899000 characters cut)"
    assert str(values["listed"]).endswith("characters cut)") and len(str(values["listed"])) < 1100
    if fmt == "json":
        assert (values["calling_ae"], values["matches"]) == ("PACS", 12)  # short values keep their JSON types
    else:
        assert " calling_ae=PACS matches=12\n" in written


def test_a_library_line_repeated_by_one_data_set_is_logged_once_a_minute_with_a_count(
    restored_logging, monkeypatch, capsys
):
    """pydicom writes a line for each odd escape sequence in a value: a peer's one data set wrote 2,003 lines."""
    import warnings

    from dicom_node import logs

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logs, "LIBRARY_LINES", logs.Throttle(60.0))
    configure_logging("INFO")
    pydicom_logger = logging.getLogger("pydicom")
    for _ in range(2000):
        pydicom_logger.warning("Found unknown escape sequence in encoded string value - using encoding latin_1")
    log_event(logging.getLogger("dicom_node.test"), logging.WARNING, "own.event", note="never throttled")
    log_event(logging.getLogger("dicom_node.test"), logging.WARNING, "own.event", note="never throttled")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Invalid value for VR UI: '1.2.3.x'", UserWarning, stacklevel=1)
        warnings.warn("Invalid value for VR UI: '1.2.3.y'", UserWarning, stacklevel=1)  # the same remark
        warnings.warn("The PN component length (300) exceeds 64 characters", UserWarning, stacklevel=1)  # another
        warnings.warn("Value of 50% is odd", UserWarning, stacklevel=1)

    lines = capsys.readouterr().err.splitlines()
    assert sum("Found unknown escape sequence" in line for line in lines) == 1
    assert sum("own.event" in line for line in lines) == 2
    (warned,) = [line for line in lines if "Invalid value for VR UI" in line]
    assert "UserWarning" not in warned and ".py" not in warned
    assert sum("PN component length (300)" in line for line in lines) == 1
    assert sum("Value of 50% is odd" in line for line in lines) == 1


def test_the_count_of_library_lines_not_logged_comes_with_the_next_one(monkeypatch):
    from dicom_node import logs

    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(logs, "LIBRARY_LINES", logs.Throttle(60.0))
    library = logs.LibraryLines()

    def record() -> logging.LogRecord:
        return logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "odd value %s", ("x",), None)

    kept = [library.filter(record()) for _ in range(5)]
    clock[0] += 61
    later = record()
    assert kept == [True, False, False, False, False] and library.filter(later)
    assert later.getMessage() == "odd value x (the same line 4 more time(s) in the last minute, not logged)"


def test_a_loop_whose_passes_keep_failing_logs_one_line_a_minute_with_a_count(tmp_path, caplog, monkeypatch):
    """A damaged database under a running node wrote a traceback every 0.2 s (watcher.pass_failed)."""
    import threading

    from sqlalchemy.exc import OperationalError

    from dicom_node import periodic
    from dicom_node.config import Settings

    clock = [1000.0]
    monkeypatch.setattr(periodic.time, "monotonic", lambda: clock[0])
    passes = [0]
    done = threading.Event()

    class Flaky(periodic.PeriodicTask):
        name = "flaky"
        interval_seconds = 0.0

        def run_once(self) -> None:
            passes[0] += 1
            clock[0] += 1.0  # one second a pass
            if passes[0] > 150:
                done.set()
                self._stop.set()
                return
            if passes[0] > 100:
                raise RuntimeError("another error")  # a new error: its trace is logged at once
            raise OperationalError("SELECT 1", {}, Exception("file is not a database"))

    task = Flaky(Settings(storage={"directory": str(tmp_path)}), None)
    with caplog.at_level(logging.INFO, logger="dicom_node.test_logs"):
        task._log = logging.getLogger("dicom_node.test_logs")
        task.start()
        assert done.wait(30)
        task.stop()

    failed = [r for r in caplog.records if r.getMessage() == "flaky.pass_failed"]
    assert [r.event_fields["failed_passes"] for r in failed] == [1, 61, 101]  # 150 failed passes, one a second
    assert [bool(r.exc_info) for r in failed] == [True, False, True]
    assert failed[0].event_fields["reason"].startswith("the database could not be read or written")
    assert "the same error as logged before" in failed[1].event_fields["reason"]
    (recovered,) = [r for r in caplog.records if r.getMessage() == "flaky.recovered"]
    assert recovered.event_fields == {"failed_passes": 150}


def test_operating_system_errors_are_words_without_their_numbers(tmp_path):
    import urllib.error
    import urllib.request

    from dicom_node.logs import os_error_text

    try:
        (tmp_path / "missing").read_bytes()
    except OSError as exc:
        missing = os_error_text(exc)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{free_port()}/readyz", timeout=5)
    except urllib.error.URLError as exc:
        refused = os_error_text(exc)

    assert missing == f"no such file or directory: {tmp_path / 'missing'}"
    assert refused == "connection refused"


def test_a_pynetdicom_line_logged_during_an_association_names_the_peer(restored_logging, capsys):
    configure_logging("INFO")

    def failing_echo(event: evt.Event) -> int:
        raise RuntimeError("the handler failed")

    _echo_through_the_node(failing_echo, calling_ae="MONITOR")

    (line,) = [line for line in capsys.readouterr().err.splitlines() if "Exception in the handler bound to" in line]
    assert "(peer AE title 'MONITOR' at 127.0.0.1:" in line


def _association_request(called: bytes, calling: bytes) -> bytes:
    """A raw A-ASSOCIATE-RQ PDU for Verification, with AE titles as given (not necessarily valid)."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, struct.pack(">BBHL", 0x51, 0, 4, 16384))
    application = item(0x10, b"1.2.840.10008.3.1.1.1")
    body = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + b"\0" * 32
    body += application + context + user
    return struct.pack(">BBL", 1, 0, len(body)) + body


def test_a_stranger_sending_malformed_association_requests_in_a_loop_writes_few_lines_and_no_traceback(
    restored_logging, monkeypatch, capsys
):
    """A calling AE title that is not text makes pynetdicom log an error with a traceback: 591 lines in 2.6 s
    from one host before library errors were throttled too."""
    from dicom_node import logs

    monkeypatch.setattr(logs, "LIBRARY_LINES", logs.Throttle(60.0))
    monkeypatch.setattr(logs, "REPEATED_REFUSALS", logs.Throttle(10.0))
    configure_logging("INFO")
    network = NetworkSettings(ae_title="NODE", host="127.0.0.1", port=free_port())
    server = start_guarded_server(scp.build_ae(network), (network.host, network.port), network, [])
    try:
        for number in range(40):
            with socket.create_connection((network.host, network.port), timeout=5) as connection:
                connection.sendall(_association_request(b"NODE", b"\xff\xfe" + str(number).encode()))
                with contextlib.suppress(OSError):
                    connection.recv(100)
    finally:
        server.shutdown()

    written = capsys.readouterr().err
    assert "Traceback" not in written
    errors = [line for line in written.splitlines() if " ERROR " in line]
    assert len(errors) == 1  # the error is still said, once a minute
    assert "peer AE title" in errors[0]
    assert len(written.splitlines()) <= 4  # and the connections aborted: one line, counting the rest later


def test_a_library_line_quoting_a_peer_is_one_quoted_field_that_forges_no_field():
    """pynetdicom quotes an Affected SOP Instance UID a peer sent: ``1.2 series.failed reason="forged"`` made a
    logfmt reader see fields ``reason`` and ``calling_ae`` of the node's own. The text is one quoted field now."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("pynetdicom.tests_forged")
    logger.handlers[:], logger.propagate = [handler], False
    logger.warning("Non-conformant value '%s'", '1.2 series.failed reason="forged" calling_ae=PACS')
    logger.handlers[:] = []
    line = stream.getvalue().rstrip("\n")

    _stamp, level, rest = line.split(" ", 2)
    assert (level, rest) == (
        "WARNING",
        "library.line logger=pynetdicom.tests_forged "
        'text="Non-conformant value \'1.2 series.failed reason=\\"forged\\" calling_ae=PACS\'"',
    )
    assert shlex.split(rest)[2:] == ["text=Non-conformant value '1.2 series.failed reason=\"forged\" calling_ae=PACS'"]


@pytest.fixture
def locked_database(tmp_path) -> Iterator[tuple[Settings, sessionmaker[Session], sqlite3.Connection]]:
    """A node's settings and SQLite database (busy timeout 0.2 s), which another process holds locked."""
    settings = Settings(
        storage={"directory": str(tmp_path)},
        completion={"check_interval_seconds": 0.1},
        inference={"workers": 0, "job_timeout_minutes": 1},
    )
    migrate(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url, busy_timeout_seconds=0.2))
    holder = sqlite3.connect(tmp_path / "dicom-node.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    yield settings, sessions, holder
    holder.close()


def test_a_pass_that_finds_the_database_locked_by_another_process_says_so_in_a_warning_without_a_trace(
    locked_database, caplog
):
    """The watcher logged an ERROR ``(damaged, locked or unreachable; its details are in this line's exception
    field)`` with SQLAlchemy's traceback while another process held the database locked."""
    from dicom_node.watcher import SeriesWatcher

    settings, sessions, holder = locked_database
    watcher = SeriesWatcher(settings, sessions)
    with caplog.at_level(logging.INFO, logger="dicom_node.watcher"):
        watcher.start()
        try:
            wait_for(lambda: [r for r in caplog.records if r.getMessage() == "watcher.pass_failed"])
            holder.rollback()
            wait_for(lambda: [r for r in caplog.records if r.getMessage() == "watcher.recovered"])
        finally:
            watcher.stop()

    failed = [r for r in caplog.records if r.getMessage() == "watcher.pass_failed"]
    assert [(r.levelname, r.exc_info) for r in failed] == [("WARNING", None)]
    assert failed[0].event_fields["reason"] == (
        "the database is locked by another process; the pass is tried again in 0.1 s; while the database stays "
        "locked, one line a minute counts the failed passes"
    )


def test_a_look_for_hung_workers_that_finds_the_database_locked_says_so_once_in_a_warning_without_a_trace(
    locked_database, caplog
):
    """serve's look for hung workers logged ``the look for hung workers failed`` at ERROR with SQLAlchemy's
    traceback, not saying the database was locked."""
    from dicom_node.service import WorkerSupervisor

    settings, sessions, _holder = locked_database
    supervisor = WorkerSupervisor(settings, sessions)
    with caplog.at_level(logging.INFO, logger="dicom_node.service"):
        supervisor.check_hung_workers()
        supervisor.check_hung_workers()  # still locked: not said again

    failed = [r for r in caplog.records if r.getMessage() == "worker.hang_check_failed"]
    assert [(r.levelname, r.exc_info) for r in failed] == [("WARNING", None)]
    expected = "the database is locked by another process; the look for hung workers is tried again every "
    assert failed[0].event_fields["reason"].startswith(expected)


def test_sizes_in_sentences_are_never_zero_megabytes():
    """A dispatch failure of a 40 kB SR said ``(0.0 MB)``."""
    from dicom_node.logs import size_in_words
    from dicom_node.stall import stalled

    sizes = [0, 512, 999, 1000, 34_567, 999_499, 999_500, 12_000_000, 999_949_999, 1_234_000_000]
    assert [size_in_words(n) for n in sizes] == [
        "0 bytes",
        "512 bytes",
        "999 bytes",
        "1 kB",
        "35 kB",
        "999 kB",
        "1.0 MB",
        "12.0 MB",
        "999.9 MB",
        "1.2 GB",
    ]
    assert stalled("PACS at 10.0.0.5:104", "sr.dcm", 41_200, 32.4) == (
        "PACS at 10.0.0.5:104 stopped taking data for 32 s while sr.dcm (41 kB) was being sent, so the node closed "
        "the connection"
    )
