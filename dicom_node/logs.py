"""Structured logging: one line per event, ``event=name key=value ...`` or JSON.

Patient-identifying values (names, IDs, birth dates) are never logged at INFO:
log UIDs, AE titles and states instead; pass PHI only in DEBUG events.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event with its fields as structured data."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event_fields": fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "event_fields", {})


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-23T14:00:00.123Z INFO instance.stored sop=1.2.3 calling_ae=PACS``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [stamp, record.levelname, record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += " exception=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the node's log lines to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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
