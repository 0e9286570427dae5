"""The typed description of a job's results: which files a run made, and what each destination has of them.

One place says what a result file is (:class:`ResultFile`: its kind, its SEG encoding,
its path) and which files a destination takes (:func:`files_for`); the worker's pipeline
writes it, the dispatcher reads it, and nothing works it out again from file names.
Per destination, :class:`DeliveryRecord` holds the plan, the attempts and the last error
(the per-file truth is the ``deliveries`` table). Both are stored as JSON in ``jobs``
through the column types at the end of this module.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class ResultKind(str, enum.Enum):
    """What a result file is; the names destinations use in their ``send`` list."""

    SEG = "seg"
    SR = "sr"
    RTSTRUCT = "rtstruct"


@dataclass(frozen=True)
class ResultFile:
    """One DICOM result of a run: its kind, the SEG encoding it belongs to (SEG and SR), and its path.

    It is path-like (``Path(result)`` and ``open(result)`` work).
    """

    kind: ResultKind
    path: str
    encoding: str | None = None  # "BINARY" or "LABELMAP" for a SEG and the SR on it; None for the RTSTRUCT

    def __fspath__(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        return Path(self.path).name

    def taken_by(self, send: Iterable[str], segmentation_type: str) -> bool:
        """Whether a destination sending ``send`` kinds in ``segmentation_type`` encoding takes this file."""
        if self.kind.value not in set(send):
            return False
        return self.kind is ResultKind.RTSTRUCT or self.encoding == segmentation_type.upper()

    def as_json(self) -> dict[str, str | None]:
        return {"kind": self.kind.value, "path": self.path, "encoding": self.encoding}

    @classmethod
    def from_json(cls, value: dict[str, Any] | str) -> ResultFile:
        """A stored entry; a bare path (rows written before this description) is read from its file name."""
        if isinstance(value, str):
            return _from_legacy_path(value)
        return cls(ResultKind(value["kind"]), str(value["path"]), value.get("encoding"))


def _from_legacy_path(path: str) -> ResultFile:
    """Rows written before typed results held paths only: ``seg-binary.dcm``, ``sr-labelmap.dcm``, ``rtstruct.dcm``."""
    stem = Path(path).name.removesuffix(".dcm")
    kind, _, encoding = stem.partition("-")
    return ResultFile(ResultKind(kind), path, encoding.upper() or None)


def files_for(files: Sequence[ResultFile], send: Iterable[str], segmentation_type: str) -> list[ResultFile]:
    """The result files a destination takes (its ``send`` kinds, its SEG encoding), in the run's order."""
    wanted = list(send)
    return [f for f in files if f.taken_by(wanted, segmentation_type)]


def kinds_missing(files: Sequence[ResultFile], send: Iterable[str], segmentation_type: str) -> list[str]:
    """The kinds a destination takes of which the run made no file in its encoding ("seg (LABELMAP)",
    "rtstruct"): results made under another configuration than the destination's."""
    missing = []
    for kind in dict.fromkeys(send):
        if not any(f.taken_by([kind], segmentation_type) for f in files):
            missing.append(kind if kind == ResultKind.RTSTRUCT.value else f"{kind} ({segmentation_type.upper()})")
    return missing


class DeliveryRecord(BaseModel):
    """One destination's side of a job: the files it takes, attempts, last error, when to try next."""

    model_config = ConfigDict(extra="ignore")

    files: dict[str, str] | None = None  # SOP Instance UID -> path, planned before the first file is sent
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None  # every planned file accepted
    sent: list[str] = Field(default_factory=list)  # accepted paths, from records older than per-file rows
    lacking: list[str] = Field(default_factory=list)  # kinds it takes that the run did not make (kinds_missing)
    unreachable_since: datetime | None = None  # first of the attempts in a row that found no association
    unreachable_last_at: datetime | None = None  # the latest of them
    unreachable_attempts: int = 0  # those attempts: they do not count against dispatch.max_attempts
    peer: str | None = None  # the destination as the plan was made for it: "AE@host:port" (None: older records)

    def due(self, now: datetime, longest_wait: timedelta | None = None) -> bool:
        """Whether the next attempt is due at ``now``. A next attempt further off than ``longest_wait`` (the
        longest wait between attempts) was planned before the clock was set back: it is due now, rather than
        once the clock catches up."""
        if self.next_attempt_at is None or self.next_attempt_at <= now:
            return True
        return longest_wait is not None and self.next_attempt_at - now > longest_wait


class ResultFilesType(TypeDecorator[list[ResultFile]]):
    """``jobs.result_files``: a JSON list of :class:`ResultFile` (plain paths are accepted and read as such)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Sequence[ResultFile | str] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return [(f if isinstance(f, ResultFile) else _from_legacy_path(str(f))).as_json() for f in value]

    def process_result_value(self, value: Any, dialect: Dialect) -> list[ResultFile] | None:
        return None if value is None else [ResultFile.from_json(v) for v in value]


class DeliveriesType(TypeDecorator[dict[str, DeliveryRecord]]):
    """``jobs.deliveries``: destination name -> :class:`DeliveryRecord`, stored as JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Mapping[str, DeliveryRecord | dict[str, Any]] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return {
            name: DeliveryRecord.model_validate(record).model_dump(mode="json", exclude_defaults=True)
            for name, record in value.items()
        }

    def process_result_value(self, value: Any, dialect: Dialect) -> dict[str, DeliveryRecord] | None:
        return None if value is None else {name: DeliveryRecord.model_validate(r) for name, r in value.items()}
