"""Structured logging: one line per event, ``event=name key=value ...`` or JSON.

Patient-identifying values (names, IDs, birth dates) are never logged at INFO:
log UIDs, AE titles and states instead; pass PHI only in DEBUG events.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event with its fields as structured data."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event_fields": fields})


class Throttle:
    """One event per key every ``seconds``; the rest are counted, and the next one let through says how many.

    For events a peer can repeat at will (refused connections and associations), so that a caller
    in a loop cannot fill the disk with log lines or audit rows. At most ``max_keys`` keys are held: a
    new key then takes the place of the one least recently used, whose uncounted events are reported
    with the next event let through (:attr:`evicted_events`), so nothing is dropped without a count.
    """

    def __init__(self, seconds: float, max_keys: int = 4096) -> None:
        self.seconds = seconds
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._keys: dict[Any, tuple[float, int]] = {}  # key -> (when one was last let through, dropped since)
        self._evicted = 0  # events dropped under keys that were later evicted, not yet reported

    def admit(self, key: Any) -> int | None:
        """None to drop this event (it is counted); else how many were dropped for ``key`` since the last one."""
        now = time.monotonic()
        with self._lock:
            last = self._keys.pop(key, None)  # re-inserted below: the dict stays ordered by last use
            if last is not None and now - last[0] < self.seconds:
                self._keys[key] = (last[0], last[1] + 1)
                return None
            while len(self._keys) >= self.max_keys:
                _oldest, (_when, dropped) = self._pop_oldest()
                self._evicted += dropped
            self._keys[key] = (now, 0)
            return last[1] if last is not None else 0

    def _pop_oldest(self) -> tuple[Any, tuple[float, int]]:
        oldest = next(iter(self._keys))
        return oldest, self._keys.pop(oldest)

    def evicted_events(self) -> int:
        """Events dropped under keys evicted since the last call (to be reported once, then reset)."""
        with self._lock:
            evicted, self._evicted = self._evicted, 0
            return evicted


REPEATED_REFUSALS = Throttle(10.0)
"""Refusals of connections and associations, per event and address: at most one line (and audit row) each 10 s."""


def log_throttled(logger: logging.Logger, level: int, event: str, key: Any, **fields: Any) -> bool:
    """:func:`log_event` through :data:`REPEATED_REFUSALS` (keyed by ``event`` and ``key``); whether it was logged.

    A line let through after others were dropped carries ``not_logged_since_last=N``.
    """
    dropped = REPEATED_REFUSALS.admit((event, key))
    if dropped is None:
        return False
    if dropped:
        fields = {**fields, "not_logged_since_last": dropped}
    if evicted := REPEATED_REFUSALS.evicted_events():
        fields = {**fields, "not_logged_from_other_addresses": evicted}
    log_event(logger, level, event, **fields)
    return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "event_fields", {})


MAX_VALUE_CHARS = 1000
"""The most characters of one field value (or message, or exception line) a log line holds; the rest are cut."""


def size_in_words(count: int) -> str:
    """A file's or data set's size for a sentence: ``512 bytes``, ``34 kB``, ``12.0 MB``, ``1.2 GB`` (decimal
    units), never ``0.0 MB``."""
    if count < 1000:
        return f"{count} bytes"
    if count < 999_500:  # what rounds to 1000 kB is 1.0 MB
        return f"{count / 1000:.0f} kB"
    if count < 999_950_000:
        return f"{count / 1_000_000:.1f} MB"
    return f"{count / 1_000_000_000:,.1f} GB"


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text``, or its first ``limit`` characters and a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} characters cut)"


REORDERING_CHARACTERS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Invisible characters that make text read as other text: the bidirectional embeddings, overrides and isolates (a
right-to-left override shows ``\u202e4321-NRM`` as ``MRN-1234``). The joiners, marks and zero-width spaces that
Persian, Devanagari, Hebrew or Thai text is written with reorder nothing."""


def without_reordering(text: str) -> str:
    """``text`` with each :data:`REORDERING_CHARACTERS` character shown as ``?``: what a screen shows is what is
    stored."""
    return "".join("?" if c in REORDERING_CHARACTERS else c for c in text)


def shown(text: Any, limit: int = 64) -> str:
    """A value a peer sent, for a message: quoted, its unprintable characters as ``?``, cut to ``limit``.

    A refusal's reason may quote what was sent, but never all of it: a peer can send megabytes.
    """
    text = str(text)
    printable = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    if len(text) <= limit:
        return repr(printable)
    return f"{printable[:limit]!r}... ({len(text)} characters)"


def os_error_text(exc: BaseException) -> str:
    """An operating-system error as words, for a reason or a log line: its description in lower case and the
    file it names, without the error number (``no such file or directory: /x``). A URL error's reason counts."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        exc = reason
    elif isinstance(reason, str) and not getattr(exc, "strerror", None):
        return reason
    strerror = getattr(exc, "strerror", None)
    if not strerror:
        return str(exc) or "an error of the operating system"
    text = strerror[:1].lower() + strerror[1:]
    filename = getattr(exc, "filename", None)
    return f"{text}: {filename}" if filename else text


def _escaped(text: str, also: str = "") -> str:
    """Each unprintable character (control characters, line and paragraph separators, format characters) and each
    character of ``also`` written as its JSON escape (``\\r``, ``\\u001b``, ``\\u2028``), so that a value is one line."""
    if text.isprintable() and not any(c in text for c in also):
        return text
    return "".join(c if c.isprintable() and c not in also else json.dumps(c)[1:-1] for c in text)


def _quote(value: Any) -> str:
    """A field value for the text format: as it is, or (when empty, or holding a space, a quote, ``=`` or an
    unprintable character) in double quotes with JSON escapes; at most :data:`MAX_VALUE_CHARS` characters."""
    text = cut(str(value))
    if text == "" or any(c in text for c in ' "=') or not text.isprintable():
        return '"' + _escaped(text, also='"\\') + '"'
    return text


def _exception(text: str) -> str:
    """A formatted exception with each line cut: a traceback's lines are short, unless one quotes what a peer sent."""
    return "\n".join(cut(line) for line in text.split("\n"))


def _json_value(value: Any) -> Any:
    """A field value for the JSON format: strings cut; numbers, booleans and None as they are; anything else
    as JSON would write it, or as a cut string when that is longer than :data:`MAX_VALUE_CHARS`."""
    if isinstance(value, str):
        return cut(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    written = json.dumps(value, default=str)
    return value if len(written) <= MAX_VALUE_CHARS else cut(written)


class TextFormatter(logging.Formatter):
    """``2026-11-23T14:00:00.123Z INFO instance.stored sop=1.2.3 calling_ae=PACS``; a library's line as
    ``library.line logger=pynetdicom.dsutils text="..."``: its text may quote what a peer sent, so it is one quoted
    field, never read as fields of its own (``reason="forged"``)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        message = record.getMessage()
        if record.name.split(".")[0] in OWN_LOGGERS or hasattr(record, "event_fields"):
            parts = [stamp, record.levelname, _escaped(cut(message))]
        else:
            parts = [
                stamp,
                record.levelname,
                "library.line",
                f"logger={_quote(record.name)}",
                f"text={_quote(message)}",
            ]
        parts += [f"{key}={_quote(value)}" for key, value in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += " exception=" + json.dumps(_exception(self.formatException(record.exc_info)))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": cut(record.getMessage()),
            **{key: _json_value(value) for key, value in _fields(record).items()},
        }
        if record.exc_info:
            payload["exception"] = _exception(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


LIBRARY_LINES = Throttle(60.0, max_keys=1024)
"""Lines of the libraries the node uses, per logger and message: one a minute (pydicom writes a line for each
odd escape sequence in a value, so one data set sent by a peer could otherwise write thousands)."""
OWN_LOGGERS = ("dicom_node", "db", "inference", "__main__")


class LibraryLines(logging.Filter):
    """Lets through one line a minute per library message, errors too (a peer can provoke them in a loop); the
    next one says how many were not logged. A library error's traceback is cut to what the error says, unless
    the node logs at DEBUG: a stranger's malformed requests must not write a traceback each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "pynetdicom":
            _name_the_peer(record)
        if record.name.split(".")[0] in OWN_LOGGERS or hasattr(record, "event_fields"):
            return True
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the line: the handler reports it, as before
            text = str(record.msg)
        dropped = LIBRARY_LINES.admit((record.name, record.levelno, _kind_of_line(text)))
        if dropped is None:
            return False
        if record.exc_info and not logging.getLogger().isEnabledFor(logging.DEBUG):
            error = record.exc_info[1]
            said = first_line(error) if error is not None else ""
            text = f"{text}: {said}" if said and said not in text else text
            record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        if dropped:
            record.msg = f"{text} (the same line {dropped} more time(s) in the last minute, not logged)"
            record.args = ()
        return True


def _name_the_peer(record: logging.LogRecord) -> None:
    """End a pynetdicom line logged on an association's thread (or its PDU reader's) with the peer it talks to."""
    thread = threading.current_thread()
    association: Any = getattr(thread, "assoc", thread)  # a PDU reader names its association
    try:
        remote = association.remote if hasattr(association, "is_acceptor") else None
        if not remote:
            return
        title = shown(str(remote.get("ae_title") or "").strip(), limit=16)
        record.msg = f"{record.getMessage()} (peer AE title {title} at {remote.get('address')}:{remote.get('port')})"
        record.args = ()
    except Exception:  # noqa: BLE001 - an association not yet set up: the line stays as it was
        return


def _kind_of_line(text: str) -> str:
    """What a library line says, without the values it names (quoted text, numbers): its throttle key."""
    return _VALUES.sub("_", text[:400])[:160]


_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>|\d+")


def _log_warning(message: Warning | str, category: type[Warning], *_where: Any, **_more: Any) -> None:
    """``warnings.showwarning``: a library's warning (pydicom's remarks on a value it reads) as a log line,
    without the library's file path and line."""
    logging.getLogger("py.warnings").warning("%s", str(message))


def _log_thread_failure(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: a thread that ends with an error nothing caught, as a log line naming the thread
    (its trace follows), in place of Python's bare ``Exception in thread ...`` on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    reason = (
        f"the node's {name} thread stopped because of an unexpected error (details follow); what it does is not "
        "done until the node is restarted: restart it and report the error"
    )
    logging.getLogger("dicom_node").critical(
        "thread.failed",
        exc_info=args.exc_value if args.exc_value is not None else True,
        extra={"event_fields": {"thread": name, "reason": reason}},
    )


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the node's log lines to stderr in the chosen format; libraries' warnings go there too, throttled;
    a thread that fails is logged (:func:`_log_thread_failure`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(LibraryLines())
    warnings.showwarning = _log_warning
    threading.excepthook = _log_thread_failure
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; keep its warnings and errors only. Its handlers that write those
    # lines run on every PDU whether or not the lines are kept, so they are bound only when they are kept.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    from pynetdicom import _config as pynetdicom_config  # here: not every process that logs talks DICOM

    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if level == "DEBUG" else "none"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs every copied module at INFO


def first_line(error: BaseException) -> str:
    """The first line of what an error says (a database driver's message, not its class), for a log sentence."""
    original = getattr(error, "orig", None) or error
    return (str(original).strip().splitlines() or ["unknown error"])[0]
