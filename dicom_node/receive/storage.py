"""Durable storage of received instances: atomic, fsynced writes, a quarantine, and start-up repair.

Layout under the storage directory::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    incoming/<pid>-<n>.spare           empty files created ahead of writes; a write fills one, then renames it
    incoming/<pid>-<thread>-<n>.partial  writes that found no spare ready (one unique name per write)
    quarantine/<UTC time>-<n>.dcm      instances answered with a failure status, or not recordable; each has a
                                       rejected_instances row (start-up repair writes any a stopped process left out)
    dicom-node.db                      the default SQLite database

UIDs are checked against the UID grammar before they become path parts, so a
data set cannot steer a write outside these folders. Temporary files live in
``incoming/`` only, on the same file system as ``instances/`` (the rename into
place is atomic), so start-up finds them with one directory listing.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from io import BytesIO
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread, read_dataset, read_preamble, read_sequence
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from db import jobs
from db.ingest import (
    InstanceRecord,
    RecordOutcome,
    record_new_instances,
    record_rejection,
    recorded_paths,
)
from db.models import Instance, Job, JobState, RejectedInstance, Series
from db.session import read_outside_transaction, transaction
from dicom_node import __version__, status
from dicom_node.logs import log_event, shown, size_in_words
from dicom_node.receive.header import (
    PATIENT_IDENTITY_ATTRIBUTES,
    InstanceHeader,
    InvalidInstance,
    check_header,
    identity_conflict,
    identity_differs,
    is_valid_uid,
    stored_header,
)
from inference.frames import encapsulated_problem
from inference.volume import VOLUME_SOURCE_KEYWORDS

LOG = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = UID("2.25.164173183506782941066573606072145849055")
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"
TEMP_SUFFIX = ".partial"
SPARE_SUFFIX = ".spare"
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK)
"""What ``os.link`` answers on file systems (or folders) that do not support hard links."""
TEMPORARY_SUFFIXES = (TEMP_SUFFIX, SPARE_SUFFIX)
"""Files in ``incoming/`` with these endings were never acknowledged: whoever finds them of a stopped process deletes them."""
SPARE_FILES = 4
"""Empty temporary files each process keeps created ahead of its writes. Creating a file took 0.6-1.5 ms on
this project's ext4 disk, as long as writing 512 KiB durably (2026-11-30); with a spare ready, that time
is spent beside the acknowledgement path instead of on it."""
_SPARE_NAMES = itertools.count()  # one sequence per process: two stores on one folder never pick the same name


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str | None
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1) for a received data set.

    Encoded directly rather than through ``pydicom.filewriter.write_file_meta_info``:
    this runs for every received instance and the group's layout is fixed, and the
    direct encoding took 0.01 ms against 0.9 ms. ``tests/test_storage.py`` checks it is
    byte-identical to pydicom's writer.
    """
    elements = [
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _uid(sop_class_uid)),
        _element(0x0003, b"UI", _uid(sop_instance_uid)),
        _element(0x0010, b"UI", _uid(transfer_syntax_uid)),
        _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
    ]
    if source_ae:
        elements.append(_element(0x0016, b"AE", _text(source_ae)))
    body = b"".join(elements)
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + group_length + body


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def _text(value: str) -> bytes:
    encoded = value.strip().encode("ascii")
    return encoded + b" " if len(encoded) % 2 else encoded


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) means the disk or quota is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        message = str(seen).lower()
        if "no space left on device" in message or "database or disk is full" in message:  # ITK, SQLite
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SpareFiles:
    """Empty temporary files in ``incoming/``, created by a helper thread ahead of the writes that take them.

    The thread starts with the first :meth:`take` and keeps :data:`SPARE_FILES` ready.
    A spare whose file may have been deleted meanwhile (:meth:`forget`) is never handed out.
    """

    def __init__(self, folder: Path, flags: int, keep: int = SPARE_FILES) -> None:
        self._folder = folder
        self._flags = flags
        self._keep = keep
        self._lock = threading.Lock()
        self._ready: list[tuple[int, Path]] = []
        self._generation = 0  # raised by forget(): spares created before it may have lost their files
        self._wanted = threading.Event()
        self._filler: threading.Thread | None = None
        self._closed = False

    def take(self) -> tuple[int, Path] | None:
        """An open spare and its path, or None when none is ready (the caller creates its own file)."""
        with self._lock:
            spare = self._ready.pop() if self._ready else None
            if self._filler is None and not self._closed:
                self._filler = threading.Thread(target=self._fill, name="spare-files", daemon=True)
                self._filler.start()
        self._wanted.set()
        return spare

    def forget(self) -> None:
        """Close the ready spares without deleting their files (the caller is about to delete them)."""
        with self._lock:
            ready, self._ready = self._ready, []
            self._generation += 1
        for descriptor, _ in ready:
            os.close(descriptor)

    def close(self) -> None:
        """Delete the ready spares and stop making more."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        self._wanted.set()
        for descriptor, path in ready:
            os.close(descriptor)
            path.unlink(missing_ok=True)
        if self._filler is not None:
            self._filler.join(timeout=5)

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._ready) >= self._keep:
                        break
                    generation = self._generation
                path = self._folder / f"{os.getpid()}-{next(_SPARE_NAMES)}{SPARE_SUFFIX}"
                try:
                    descriptor = os.open(path, self._flags, 0o666)  # less the umask, as open() did
                except OSError:
                    break  # a full disk, for one: each write then creates its own file and reports the error
                with self._lock:
                    if generation == self._generation and not self._closed:
                        self._ready.append((descriptor, path))
                        continue
                os.close(descriptor)
                path.unlink(missing_ok=True)


class QuarantineFull(OSError):
    """Keeping a refused instance's bytes would eat into the space kept for accepted images."""


class InstanceStore:
    """Writes instance files so that a success status always means 'on disk'."""

    def __init__(self, root: Path, *, fsync: bool = True, quarantine_reserve_gigabytes: float = 0.0) -> None:
        self.root = root
        self.quarantine_reserve_gigabytes = quarantine_reserve_gigabytes
        self.instances_dir = root / "instances"
        self.incoming_dir = root / "incoming"
        self.quarantine_dir = root / "quarantine"
        self.fsync = fsync
        self._counter = itertools.count()
        self._quarantine_lock = threading.Lock()
        for folder in (self.instances_dir, self.incoming_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._spares = SpareFiles(self.incoming_dir, self._temporary_flags)

    @property
    def _temporary_flags(self) -> int:
        return os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DSYNC if self.fsync else 0)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"not a valid UID for a path: {uid!r}")
        return self.instances_dir / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def write(self, path: Path, file_meta: bytes, encoded: bytes) -> int:
        """Write file meta + data set to ``path`` atomically; returns the file size.

        The bytes go to a unique temporary file in ``incoming/``, are fsynced,
        renamed into place, and the folder is fsynced, so the file is either
        whole or absent. On any error the temporary file is removed.
        """
        temporary = self.write_temporary(file_meta, encoded)
        try:
            self.install(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        self.sync_folder(path.parent)
        return len(file_meta) + len(encoded)

    def write_temporary(self, file_meta: bytes, encoded: bytes) -> Path:
        """Write the bytes durably under a name no other write uses; returns that path.

        The caller renames it into place (:meth:`install`) or unlinks it. Nothing
        is left behind if writing fails (a full disk, for one).

        With ``fsync`` the file is opened ``O_DSYNC``: each write returns once its data
        and the size needed to read it back are on disk, as ``fdatasync`` promises,
        in one system call. (Separate write and fsync calls each wait to retake the
        interpreter lock from the thread checking the header meanwhile: 1.9 ms per
        512x512 image instead of 0.9, measured 2026-11-30.)
        """
        spare = self._spares.take()  # an empty file made ahead of need, if one is ready
        if spare is None:
            temporary = self.incoming_dir / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}{TEMP_SUFFIX}"
            descriptor = os.open(temporary, self._temporary_flags, 0o666)  # less the umask, as open() did
        else:
            descriptor, temporary = spare
        try:
            try:
                _write_all(descriptor, file_meta, encoded)
            finally:
                os.close(descriptor)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary

    def close(self) -> None:
        """Remove this store's spare files (:data:`SPARE_FILES`); call it when the process stops writing."""
        self._spares.close()

    def _make_folder(self, folder: Path) -> None:
        """Create an instance's series folder (and study folder) if absent, durably when ``fsync`` is on."""
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                fsync_folder(folder.parent)
                fsync_folder(folder.parent.parent)

    def install(self, temporary: Path, path: Path) -> None:
        """Rename a temporary file to ``path`` (atomic: same file system), creating its folders.

        The folder itself is fsynced by :meth:`sync_folder`, which callers run after
        their database commit, before they answer success.
        """
        self._make_folder(path.parent)
        os.replace(temporary, path)

    def install_new(self, temporary: Path, path: Path) -> bool:
        """Give the temporary file the name ``path`` unless a file has it already; whether it was installed.

        Two copies of one instance arriving at once both find ``path`` free: a rename would let the
        second replace the first while the database describes the first (its size, its transfer syntax).
        A hard link fails instead when the name is taken, so the first copy stays. On a file system
        without hard links, the name is taken by creating it exclusively, then the file is renamed over
        that empty placeholder. The temporary file is the caller's to remove.
        """
        self._make_folder(path.parent)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            try:  # no hard links here: the name is taken by creating it, then the file renamed over that
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                return False
            os.replace(temporary, path)
        return True

    def sync_folder(self, folder: Path) -> None:
        """Make renames into ``folder`` durable (a no-op with ``storage.fsync: false``)."""
        if self.fsync:
            fsync_folder(folder)

    def quarantine(self, file_meta: bytes, encoded: bytes) -> Path:
        """Keep the bytes of a refused instance, under a unique name, for an operator to inspect.

        With file meta the result is a DICOM file (``.dcm``); without (the request
        lacked usable UIDs) it is the data set exactly as received (``.raw``).

        Raises
        ------
        OSError
            When keeping them would leave less than ``storage.quarantine_reserve_gigabytes`` free (a
            sentence saying so), or the write fails.
        """
        reserve = self.quarantine_reserve_gigabytes * 1024**3
        free = shutil.disk_usage(self.quarantine_dir).free
        if free - len(file_meta) - len(encoded) < reserve:
            raise QuarantineFull(
                f"the refused data set ({size_in_words(len(encoded))}) is not kept in quarantine: the disk has "
                f"{free / 1024**3:,.1f} GB free, and {self.quarantine_reserve_gigabytes:g} GB are kept for accepted "
                "images (storage.quarantine_reserve_gigabytes)"
            )
        path = self.quarantine_path(".dcm" if file_meta else ".raw")
        self.write(path, file_meta, encoded)
        return path

    def quarantine_path(self, suffix: str) -> Path:
        """A new, unique name in ``quarantine/``: the UTC time and a counter."""
        with self._quarantine_lock:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            return self.quarantine_dir / f"{stamp}-{next(self._counter)}{suffix}"

    def remove_partial_files(self) -> int:
        """Delete temporary files left by writes that were cut off (they never got a success status), and spares.

        One listing of ``incoming/``, however large the store. Call it only while
        no write is in progress (at start-up).
        """
        self._spares.forget()  # their files are deleted below
        removed = 0
        with os.scandir(self.incoming_dir) as entries:
            for entry in entries:
                if entry.name.endswith(TEMPORARY_SUFFIXES):
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:  # a spare its maker took back meanwhile: gone either way
                        continue
                    removed += entry.name.endswith(TEMP_SUFFIX)
        return removed

    def series_folders(self) -> Iterator[tuple[str, str, Path]]:
        for study_dir in self.instances_dir.iterdir():
            if study_dir.is_dir():
                for series_dir in study_dir.iterdir():
                    if series_dir.is_dir():
                        yield study_dir.name, series_dir.name, series_dir


@dataclass(frozen=True)
class StoreOutcome:
    """What :func:`record_stored_instances` did with one received instance."""

    recorded: RecordOutcome
    path: Path  # where the instance now is
    set_aside: Path | None = None  # a copy naming another series than the one it is stored in: now in quarantine


def record_stored_instance(
    session: Session, store: InstanceStore, record: InstanceRecord, counted_at: datetime | None = None
) -> StoreOutcome:
    """Record one instance whose file is already in place at ``record.path``; see :func:`record_stored_instances`."""
    return record_stored_instances(session, store, [record], counted_at)[0]


def record_stored_instances(
    session: Session, store: InstanceStore, records: Sequence[InstanceRecord], counted_at: datetime | None = None
) -> list[StoreOutcome]:
    """Record instances whose files are already in place (the recorder's half of C-STOREs), in order.

    A SOP Instance UID recorded before, or earlier in ``records``, keeps its first
    file: a copy stored under other study or series UIDs (so at another path) is
    set aside in quarantine and recorded as such (:func:`_keep_first_copy`),
    unless the recorded file is gone from disk: the copy then takes its place
    (:func:`_take_place_of_missing_file`). Safe to run again after a rollback.
    ``counted_at`` becomes the series' ``last_received_at`` (see
    :func:`db.ingest.record_instance`).
    """
    first_paths = recorded_paths(session, (record.sop_instance_uid for record in records))
    outcomes: list[StoreOutcome | None] = [None] * len(records)
    new: list[int] = []
    for index, record in enumerate(records):
        existing = first_paths.get(record.sop_instance_uid)
        if existing is not None and _recorded_file_gone(Path(existing), Path(record.path)):
            if _take_place_of_missing_file(session, record, Path(existing)):
                first_paths[record.sop_instance_uid] = record.path
                outcomes[index] = StoreOutcome(RecordOutcome(stored=False), Path(record.path))
                continue
            existing = None  # its row was in another series and is gone: this copy is recorded as new
        if existing is None:
            first_paths[record.sop_instance_uid] = record.path  # a later copy in this batch is a duplicate
            new.append(index)
        else:
            outcomes[index] = _keep_first_copy(session, store, record, Path(existing))
    recorded = record_new_instances(session, [records[index] for index in new], counted_at=counted_at)
    for index, outcome in zip(new, recorded, strict=True):
        outcomes[index] = StoreOutcome(outcome, Path(records[index].path))
        if outcome.series_created or outcome.series_reopened:  # once per series and batch: a rare lookup
            hold_series_with_different_copies(session, records[index].series.series_instance_uid)
    return [outcome for outcome in outcomes if outcome is not None]


def _recorded_file_gone(recorded: Path, copy: Path) -> bool:
    """Whether a copy stored at another path than its instance's row names finds the recorded file gone from disk
    (deleted, or recorded in a storage folder that was moved since) while the copy itself is on disk."""
    return recorded != copy and copy.exists() and not recorded.exists()


def _take_place_of_missing_file(session: Session, record: InstanceRecord, recorded: Path) -> bool:
    """Let the copy at ``record.path`` take the place of the recorded file that is gone; True when the row now
    names the copy, False when the row (of another series) was removed so the copy is recorded in its own series.

    A copy of the same series (perhaps under another StudyInstanceUID) is the image the series already counts:
    the row names the copy's file, size and transfer syntax from now on. A copy naming another series is the
    only copy left of the image: it is filed under the series it names, and the series that had lost its file
    counts one image fewer. Logged either way (``recorder.replaced_missing_file``).
    """
    series_uid = record.series.series_instance_uid
    row = session.scalars(select(Instance).where(Instance.sop_instance_uid == record.sop_instance_uid)).one()
    same_series = row.series.series_instance_uid == series_uid
    if same_series:
        row.path, row.size_bytes = record.path, record.size_bytes
        row.transfer_syntax_uid = record.transfer_syntax_uid
        outcome = f"this copy now stands for it in series {series_uid}"
    else:
        row.series.instance_count = max(row.series.instance_count - 1, 0)
        outcome = (
            f"it was filed in series {row.series.series_instance_uid}, which counts it no more; this copy is "
            f"recorded in series {series_uid}, which it names"
        )
        session.delete(row)
    session.flush()
    log_event(
        LOG,
        logging.WARNING,
        "recorder.replaced_missing_file",
        sop_instance_uid=record.sop_instance_uid,
        path=record.path,
        missing=str(recorded),
        note=f"the recorded file of SOP Instance UID {record.sop_instance_uid} ({recorded}) is gone from disk, so "
        f"the copy received at {record.path} takes its place: {outcome}",
    )
    return same_series


DIFFERENT_CONTENT_COMMENT = "already received with other pixel data; the first copy is kept"
"""The ErrorComment (at most 64 characters) of the failure status "Duplicate SOP Instance" (PS3.7 Annex C,
``status.DUPLICATE_SOP_INSTANCE``) answered for a copy of an instance already stored with other pixel data; the
response's Affected SOP Instance UID names the image. The refusal's ``rejected_instances`` row, of that status, keeps
the series from being processed as it is; so does one of a copy with another value of an attribute in
:data:`RESULT_ATTRIBUTES` (:func:`different_copy_comment`)."""

RESULT_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "ImageType",
    *VOLUME_SOURCE_KEYWORDS,
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelMeasuresSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelValueTransformationSequence",
    "CTImageFrameTypeSequence",
    "FrameType",
)
"""What the node's results are made from besides the pixel data, compared in this order when an instance is sent
again: the identity they carry, the geometry the volume is built on, the pixel module that says how the stored
values are read, and the rescale that makes them HU (in an enhanced CT inside its functional groups, whose items
are compared on the same keywords). A copy that differs in one of them is refused as one with other pixel data is;
one that differs elsewhere (InstitutionName, a private tag) is the same copy, kept once."""
IDENTITY_TEXT_ATTRIBUTES = RESULT_ATTRIBUTES[:4]
"""Those whose values identify the patient or study: a difference names the attribute, never its values. They are
compared as a stored copy's identity is (:func:`identity_conflict`): a value only one copy carries is no difference,
and names are compared by :mod:`db.names` (one person's name in another letter case is the same copy)."""
_RESULT_TAGS = [Tag(keyword) for keyword in RESULT_ATTRIBUTES]
# A name is decoded in its copy's character set.
_READ_TAGS: list[BaseTag | int] = [*_RESULT_TAGS, Tag("SpecificCharacterSet")]
PIXEL_DATA = "pixel data"


@dataclass(frozen=True)
class CopyDifference:
    """How a copy of an instance sent again differs from the stored copy, in what the node's results are made from."""

    attribute: str  # the keyword, or PIXEL_DATA
    detail: str  # what differs, in words: both values, except for an identity attribute
    location: str = ""  # inside a functional group: " in item 3 of PerFrameFunctionalGroupsSequence", say

    @property
    def what(self) -> str:
        """What the copy was sent with: ``different pixel data``, ``another RescaleIntercept``."""
        if self.attribute == PIXEL_DATA:
            return "different pixel data"
        return f"another {self.attribute}{self.location}"


def different_copy_reason(sop_instance_uid: str, series_instance_uid: str, difference: CopyDifference) -> str:
    """Why a copy of a stored instance that differs from it in what the results are made from is refused."""
    return (
        f"SOP Instance UID {sop_instance_uid} was already received with {difference.what} ({difference.detail}); "
        f"the first copy is kept and this one quarantined, and series {series_instance_uid} is not processed as it "
        "is, as its images may come from two different sendings"
    )


def different_copy_comment(difference: CopyDifference) -> str:
    """The ErrorComment of that refusal (at most 64 characters): the attribute, never a value."""
    if difference.attribute == PIXEL_DATA:
        return DIFFERENT_CONTENT_COMMENT
    comment = f"{difference.attribute} differs from the stored copy; first kept"
    return comment if len(comment) <= 64 else "an attribute differs from the stored copy; first kept"


_REFUSED_WITH = re.compile(r"was already received with (.+?)(?: \(|;|$)")


def _refused_with(reason: str) -> str:
    """What a refused copy was sent with, as its reason (:func:`different_copy_reason`) says."""
    found = _REFUSED_WITH.search(reason)
    return found.group(1) if found else "different pixel data"


def copy_difference(stored: Path, encoded: bytes, transfer_syntax: UID) -> CopyDifference | None:
    """How a copy of an instance sent again (``encoded`` in ``transfer_syntax``) differs from the copy stored at
    ``stored`` in what the node's results are made from, or None.

    The stored file is read once, and no other copy of either is made (a frame at a time is decoded). Byte-identical
    data sets are the same copy. Otherwise the attributes in :data:`RESULT_ATTRIBUTES` are compared as DICOM values
    (``-1024`` is ``-1024.0``), then the pixel data: its bytes, else its values decoded one frame at a time, so the
    same image in another lossless transfer syntax (JPEG 2000 lossless and explicit little endian, say) is the same
    copy. A lossy copy cannot be shown to be the same image as another whose values differ from it (compression loss
    and a changed image look alike), so it counts as different. Only a resent instance comes here.
    """
    try:
        kept = _EncodedCopy.read(stored)
    except (OSError, ValueError, AttributeError, struct.error, InvalidDicomError):
        return None  # no readable copy there: compared with nothing, as its header is (header.stored_header)
    if kept.data == encoded:
        return None
    try:
        received = _EncodedCopy.of(encoded, transfer_syntax)
        kept_header, kept_pixels_at = kept.header()
        received_header, received_pixels_at = received.header()
    except Exception:  # noqa: BLE001 - a copy that cannot be read cannot be shown to be the same image
        return CopyDifference(PIXEL_DATA, "its data set could not be read to compare it with the stored copy's")
    difference = _first_difference(kept_header, received_header)
    if difference is not None:
        return difference
    return _pixel_difference(kept, kept_pixels_at, received, received_pixels_at)


def same_data_set(stored: Path, encoded: bytes, transfer_syntax: UID) -> bool:
    """Whether ``encoded`` (in ``transfer_syntax``) is the very data set of the file at ``stored``: the same bytes, or
    the same elements with the same values in another transfer syntax (a PACS that forwards in implicit VR what it
    received in explicit VR). Every element counts, private ones included; only group lengths, which say how long a
    group is encoded, do not. Stricter than :func:`copy_difference`, which compares what results are made from: a
    copy of one of the node's own results must be that result. A compressed copy is the same only in the stored
    copy's own transfer syntax: its pixel data is not decoded to compare it. False when either cannot be read."""
    try:
        kept = _EncodedCopy.read(stored)
        received = _EncodedCopy.of(encoded, transfer_syntax)
        if (kept.syntax.is_compressed or received.syntax.is_compressed) and kept.syntax != received.syntax:
            return False
        return kept.data == received.data or _same_elements(kept.elements(), received.elements())
    except Exception:  # noqa: BLE001 - a copy that cannot be read cannot be shown to be the same
        return False


# The size of a value's words, which big endian stores in the other byte order (a VR not named has none).
_WORD_SIZES = dict.fromkeys(("US", "SS", "OW", "AT"), 2) | dict.fromkeys(("UL", "SL", "FL", "OL", "OF"), 4)
_WORD_SIZES |= dict.fromkeys(("FD", "OD", "SV", "UV", "OV"), 8)
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # how an item begins in implicit VR little endian, as a sequence read as UN is
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _same_elements(kept: Dataset, received: Dataset) -> bool:
    """Whether two data sets (or two items of a sequence) hold elements with the same tags and the same values,
    whatever VR their encodings gave them (OB or OW, UN or the dictionary's, US or SS), less group lengths."""
    tags = _tags(kept)
    return tags == _tags(received) and all(_same_element(_raw(kept, tag), _raw(received, tag)) for tag in tags)


def _raw(dataset: Dataset, tag: BaseTag) -> Any:
    """An element as it was read: its bytes, not converted (an empty one too), or a sequence already read."""
    return dataset.get_item(tag, keep_deferred=True)


def _tags(dataset: Dataset) -> list[BaseTag]:
    return [tag for tag in sorted(dataset.keys()) if tag.element != 0]  # not iterated: that converts each element


def _same_element(kept: Any, received: Any) -> bool:
    """Whether two elements of the same tag hold the same value: the same items, compared element by element, or the
    same value bytes in little endian byte order, encapsulated in both or in neither."""
    if _is_sequence(kept) or _is_sequence(received):
        kept_items, received_items = _items(kept), _items(received)
        return (
            kept_items is not None
            and received_items is not None
            and len(kept_items) == len(received_items)
            and all(_same_elements(before, after) for before, after in zip(kept_items, received_items, strict=True))
        )
    return (
        isinstance(kept, RawDataElement) and isinstance(received, RawDataElement) and _value(kept) == _value(received)
    )


def _is_sequence(element: Any) -> bool:
    """Whether an element is a sequence: read as one, or SQ by its own VR or, in implicit VR, by the dictionary."""
    if not isinstance(element, RawDataElement):
        return bool(element.VR == "SQ")
    return (element.VR or _dictionary_vr(element.tag)) == "SQ"


def _items(element: Any) -> list[Dataset] | None:
    """A sequence's items, or None for an element that is no sequence. An element of unknown VR (UN, or a private
    one in implicit VR) that holds items is read as a sequence encoded in implicit VR little endian."""
    if not isinstance(element, RawDataElement):
        return list(element.value) if element.VR == "SQ" else None
    value = element.value or b""
    vr = element.VR or _dictionary_vr(element.tag) or "UN"
    if vr == "SQ":
        return _read_items(value, element.is_implicit_VR, element.is_little_endian)
    if vr == "UN" and (not value or value.startswith(_ITEM_TAG)):
        return _read_items(value, True, True)
    return None


def _read_items(value: bytes, implicit_vr: bool, little_endian: bool) -> list[Dataset]:
    return list(read_sequence(BytesIO(value), implicit_vr, little_endian, len(value), "iso8859"))


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _value(element: RawDataElement) -> tuple[bool, bytes]:
    """Whether an element is encapsulated (of undefined length), and its value bytes in little endian byte order."""
    value = element.value or b""
    size = _WORD_SIZES.get(element.VR or "", 1)
    if not element.is_little_endian and size > 1:
        value = np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    return element.length == _UNDEFINED_LENGTH, value


@dataclass(frozen=True)
class _EncodedCopy:
    """One copy's encoded data set (inflated, where it was sent deflated) and the transfer syntax to read it in."""

    data: bytes
    syntax: UID

    @classmethod
    def read(cls, path: Path) -> _EncodedCopy:
        """The data set of the file at ``path``, past its File Meta Information, read in one pass."""
        with path.open("rb") as stream:
            read_preamble(stream, False)
            meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
            rest = os.fstat(stream.fileno()).st_size - stream.tell()  # read() joins two copies; read(n) fills one
            return cls.of(stream.read(rest), UID(meta.TransferSyntaxUID))

    @classmethod
    def of(cls, data: bytes, syntax: UID) -> _EncodedCopy:
        if syntax.is_deflated:  # a received one was inflated, bounded, when its header was checked
            return cls(zlib.decompress(data, -zlib.MAX_WBITS), ExplicitVRLittleEndian)
        return cls(data, syntax)

    def elements(self) -> Dataset:
        """Every element, not yet converted to values: each holds the bytes it was encoded with."""
        return read_dataset(BytesIO(self.data), self.syntax.is_implicit_VR, self.syntax.is_little_endian)

    def header(self) -> tuple[Dataset, int]:
        """The elements :data:`RESULT_ATTRIBUTES` names, and where the pixel data begins (or the data set ends)."""
        stream = BytesIO(self.data)  # shares the bytes: nothing is copied
        dataset = read_dataset(
            stream,
            self.syntax.is_implicit_VR,
            self.syntax.is_little_endian,
            stop_when=_at_pixel_data,
            specific_tags=_READ_TAGS,
        )
        return dataset, stream.tell()

    def pixel_tag(self, at: int) -> int | None:
        """The tag of the pixel data element at ``at``, or None at the end of the data set."""
        if len(self.data) < at + 4:
            return None
        group, element = struct.unpack("<HH" if self.syntax.is_little_endian else ">HH", self.data[at : at + 4])
        return group << 16 | element

    def frames(self) -> Iterator[np.ndarray]:
        """Its pixel values, decoded one frame at a time."""
        return iter_pixels(BytesIO(self.data), transfer_syntax_uid=self.syntax)

    def undecodable(self, name: str) -> str | None:
        """Why its compressed frames must not be decoded (a frame whose own header disagrees with Rows and Columns,
        which would make the decoder allocate what the frame says), as a sentence naming ``name``; None if none."""
        dataset = self.elements()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = self.syntax
        return encapsulated_problem(dataset, name)


def _past_file_meta(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag.group != 2


_PIXEL_TAGS = frozenset(Tag(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag in _PIXEL_TAGS


def _first_difference(kept: Dataset, received: Dataset, location: str = "") -> CopyDifference | None:
    """The first attribute of :data:`RESULT_ATTRIBUTES` in which two copies (or two items of their functional
    groups) differ, or None."""
    for tag in _RESULT_TAGS:
        before, after = kept.get_item(tag), received.get_item(tag)
        if (before is None and after is None) or _same_bytes(before, after):
            continue
        keyword = keyword_for_tag(tag)
        if dictionary_VR(tag) == "SQ":
            difference = _sequence_difference(keyword, kept, received, location)
        elif keyword in IDENTITY_TEXT_ATTRIBUTES:
            difference = _identity_difference(keyword, kept, received, location)
        else:
            difference = _value_difference(keyword, kept, received, location)
        if difference is not None:
            return difference
    return None


def _same_bytes(before: Any, after: Any) -> bool:
    """Whether two elements not yet converted hold the same bytes, in the same byte order."""
    raw = isinstance(before, RawDataElement) and isinstance(after, RawDataElement)
    return raw and before.value == after.value and before.is_little_endian == after.is_little_endian


def _value_difference(keyword: str, kept: Dataset, received: Dataset, location: str) -> CopyDifference | None:
    before, after = _values(kept, keyword), _values(received, keyword)
    if [_comparable(value) for value in before] == [_comparable(value) for value in after]:
        return None
    detail = f"{_as_text(before)} in the stored copy, {_as_text(after)} in this one"
    return CopyDifference(keyword, detail, location)


def _identity_difference(keyword: str, kept: Dataset, received: Dataset, location: str) -> CopyDifference | None:
    before, after = ("\\".join(str(value) for value in _values(copy, keyword)) for copy in (kept, received))
    if not identity_differs(keyword, before, after):
        return None
    return CopyDifference(keyword, "its values are not shown, as they identify the patient or study", location)


def _sequence_difference(keyword: str, kept: Dataset, received: Dataset, location: str) -> CopyDifference | None:
    before, after = list(kept.get(keyword) or []), list(received.get(keyword) or [])
    if len(before) != len(after):
        return CopyDifference(keyword, f"{len(before)} item(s) in the stored copy, {len(after)} in this one", location)
    for number, (kept_item, received_item) in enumerate(zip(before, after, strict=True), start=1):
        difference = _first_difference(kept_item, received_item, f" in item {number} of {keyword}{location}")
        if difference is not None:
            return difference
    return None


def _values(dataset: Dataset, keyword: str) -> list[Any]:
    """An element's values as read (none when absent or empty); one that cannot be converted, as its bytes."""
    if keyword not in dataset:
        return []
    try:
        value = dataset[keyword].value
    except Exception:  # noqa: BLE001 - a value that does not parse is compared as it was sent
        raw = dataset.get_item(keyword)
        return [bytes(raw.value)] if raw is not None and raw.value else []
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    return [value for value in values if value is not None and value != ""]


def _comparable(value: Any) -> Any:
    """A value as DICOM means it: a number as a number (``-1024`` is ``-1024.0``), text without its padding."""
    if isinstance(value, int | float | Decimal):  # DS and IS values are read as numbers
        return float(value)
    return value if isinstance(value, bytes) else str(value).strip()


def _as_text(values: list[Any]) -> str:
    """Values for a reason: quoted and cut as any value a peer sent (:func:`shown`), several separated by commas."""
    if not values:
        return "none"
    return shown(", ".join(value.decode("latin-1") if isinstance(value, bytes) else str(value) for value in values))


def _pixel_difference(
    kept: _EncodedCopy, kept_at: int, received: _EncodedCopy, received_at: int
) -> CopyDifference | None:
    kept_pixels, received_pixels = kept.pixel_tag(kept_at), received.pixel_tag(received_at)
    if kept_pixels is None and received_pixels is None:
        return None  # no image in either (a report, say): as before, kept once
    if kept_pixels != received_pixels:
        return CopyDifference(PIXEL_DATA, "one copy has pixel data and the other has none, or another kind")
    if kept.syntax == received.syntax and memoryview(kept.data)[kept_at:] == memoryview(received.data)[received_at:]:
        return None
    return _decoded_difference(kept, received)


def _decoded_difference(kept: _EncodedCopy, received: _EncodedCopy) -> CopyDifference | None:
    """How the decoded pixel values of two copies differ, frame by frame (stopping at the first that does), or None.

    Neither copy is decoded where a compressed frame's own header disagrees with its Rows and Columns: the receiving
    process would allocate what the frame says (gigabytes, for a file of a few KB), holding up every association."""
    try:
        for copy, name in ((kept, "the stored copy"), (received, "this copy")):
            problem = copy.undecodable(name)
            if problem is not None:
                return CopyDifference(PIXEL_DATA, problem)
        frames = zip_longest(kept.frames(), received.frames())
        for number, (kept_frame, received_frame) in enumerate(frames, start=1):
            if kept_frame is None or received_frame is None:
                return CopyDifference(PIXEL_DATA, "the copies hold different numbers of frames")
            if kept_frame.shape != received_frame.shape or not np.array_equal(kept_frame, received_frame):
                return CopyDifference(PIXEL_DATA, f"the pixel values of frame {number} differ from the stored copy's")
    except Exception:  # noqa: BLE001 - pixel data that cannot be decoded cannot be shown to be the same image
        return CopyDifference(PIXEL_DATA, "its pixel data could not be decoded to compare it with the stored copy's")
    return None


def hold_series_with_different_copies(session: Session, series_instance_uid: str) -> bool:
    """Mark the series' job FAILED while a copy of one of its images was refused for other pixel data, or another
    value of an attribute the results are made from (:func:`copy_difference`); whether it was marked now.

    Its stored images may come from two different sendings (two senders at once, or a correction resent under the
    same UIDs), so no result is made or sent from them as they are. The reason names the first such image; an
    operator resends the series under new UIDs, or retries it once sure the stored images are the right ones.
    Called when the copy is refused, and again when the series is created or re-opened by a later image (the
    refusal may come before the first copy is recorded, and a late image re-opens a failed series).
    """
    job = jobs.job_for_series_uid(session, series_instance_uid, lock=True)
    if job is None or job.state in (JobState.FAILED, JobState.IGNORED) or job.series.purged_at is not None:
        return False  # an IGNORED series is processed only if routed again: the watcher holds it then
    refusals = select(RejectedInstance).where(
        RejectedInstance.series_instance_uid == series_instance_uid,
        RejectedInstance.status == status.DUPLICATE_SOP_INSTANCE,
    )
    if job.series.images_before_purge is not None:  # sent again after a purge: what was refused before is gone
        refusals = refusals.where(RejectedInstance.received_at >= job.series.first_received_at)
    released = _released_by_operator_at(job)
    if released is not None:  # an operator retried the held series: only copies refused since hold it again
        refusals = refusals.where(RejectedInstance.received_at > released)
    refused = session.scalars(refusals.order_by(RejectedInstance.received_at, RejectedInstance.id).limit(1)).first()
    if refused is None:
        return False
    reason = (
        f"SOP Instance UID {refused.sop_instance_uid} was sent again with {_refused_with(refused.reason)} and "
        "refused (the first copy is kept), so the stored images may come from two different sendings; the series "
        "is not processed as it is: resend it under new UIDs, or retry it once the stored images are confirmed"
    )
    if job.state in (JobState.RECEIVING, JobState.DONE):  # neither goes to FAILED directly
        jobs.mark_complete(session, job, "closed: a copy of one of its images was refused as different")
    jobs.fail(session, job, reason)
    return True


def _released_by_operator_at(job: Job) -> datetime | None:
    """When an operator last took the job out of FAILED (a retry or re-route: not a late image, which re-opens it
    as RECEIVING), or None."""
    released = [
        event.at for event in job.events if event.from_state is JobState.FAILED and event.to_state in OPERATOR_RELEASES
    ]
    return max(released, default=None)


OPERATOR_RELEASES = frozenset({JobState.COMPLETE, JobState.QUEUED, JobState.SENDING})


def _keep_first_copy(session: Session, store: InstanceStore, record: InstanceRecord, target: Path) -> StoreOutcome:
    """A duplicate of the instance recorded at ``target``: kept once, never filed under another series.

    A copy at ``target`` itself (by any name) is the same instance sent again. A copy that names another study or
    series is set aside in quarantine, with a ``rejected_instances`` row naming the series it claims:
    that series lacks the image, and its completion says so (a series that had completed is re-opened
    for that). The quarantine name is fixed by series, SOP Instance UID and time of receipt, so running
    this again after a rollback records the same file once, and a later copy gets a file of its own.
    """
    copy = Path(record.path)
    if target == copy or _same_file(target, copy):  # the same file, by another name of its folder (a symbolic link)
        return StoreOutcome(RecordOutcome(stored=False), target)
    series_uid = record.series.series_instance_uid
    received = record.received_at.strftime(SET_ASIDE_TIME_FORMAT)
    set_aside = store.quarantine_dir / f"{series_uid}-{record.sop_instance_uid}-{received}.dcm"
    if copy.exists():
        os.replace(copy, set_aside)
        os.utime(set_aside)  # quarantine retention counts from now, not from when the copy was written
        store.sync_folder(store.quarantine_dir)
    elif not set_aside.exists():
        return StoreOutcome(RecordOutcome(stored=False), target)  # gone before it was recorded: nothing to keep
    same_series = target.parent.name == series_uid  # the same series, named under another StudyInstanceUID
    stored = stored_header(target, record.sop_class_uid, record.sop_instance_uid)
    conflict = identity_conflict(stored.study if stored else None, record.study, PATIENT_IDENTITY_ATTRIBUTES)
    if conflict is not None:  # two senders at once, so the receiver found no copy recorded to compare with
        reason = (
            f"SOP Instance UID {record.sop_instance_uid} arrived in series {series_uid} with another {conflict} "
            f"than the copy already stored in series {target.parent.name}; this copy was acknowledged, then set "
            "aside in quarantine (a stored instance is never relabelled with another identity)"
        )
    elif same_series:
        reason = (
            f"SOP Instance UID {record.sop_instance_uid} arrived in series {series_uid} under StudyInstanceUID "
            f"{record.study.study_instance_uid}, but is already stored in that series under study "
            f"{target.parent.parent.name}; this copy was acknowledged, then set aside in quarantine, and the "
            "series keeps the copy it had"
        )
    else:
        reason = (
            f"SOP Instance UID {record.sop_instance_uid} arrived in series {series_uid} but is already stored in "
            f"series {target.parent.name}; this copy was acknowledged, then set aside in quarantine, and series "
            f"{series_uid} is processed without it"
        )
    lacked_before = _already_lacked(session, series_uid, record.sop_instance_uid)
    record_rejection(
        session,
        status=status.SUCCESS,
        reason=reason,
        path=str(set_aside),
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        transfer_syntax_uid=record.transfer_syntax_uid,
        calling_ae_title=record.calling_ae_title,
        series_instance_uid=series_uid,
    )
    if same_series or lacked_before:  # what the series has and lacks is unchanged: nothing is processed again
        return StoreOutcome(RecordOutcome(stored=False), target, set_aside=set_aside)
    claimed = session.scalars(select(Job).join(Job.series).where(Series.series_instance_uid == series_uid)).first()
    if claimed is not None and claimed.series.purged_at is None:
        jobs.reopen(session, claimed, "an image set aside for it (its SOP Instance UID is stored in another series)")
    return StoreOutcome(RecordOutcome(stored=False), target, set_aside=set_aside)


def _same_file(first: Path, second: Path) -> bool:
    """Whether both paths name one file on disk (False when either is missing)."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


SET_ASIDE_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"
"""The time of receipt in the name of a copy set aside in quarantine: ``<series>-<sop>-<time>.dcm``."""


def record_copies_set_aside(path: Path, store: InstanceStore, sessions: sessionmaker[Session]) -> int:
    """Record the copies of the instance journaled at ``path`` that a recorder set aside and died before
    recording; how many.

    :func:`_keep_first_copy` moves a copy into quarantine inside its transaction: a process killed before the
    commit leaves it there without a row, and its series would complete as if it had never been sent. Call only
    for journals of processes that are gone (their moves are finished or never made).
    """
    if not store.quarantine_dir.is_dir():
        return 0
    recorded = 0
    for copy in sorted(store.quarantine_dir.glob(f"{path.parent.name}-{path.stem}-*.dcm")):
        with sessions() as session:
            known = session.scalars(select(RejectedInstance.id).where(RejectedInstance.path == str(copy)).limit(1))
            if known.first() is not None or not recorded_paths(session, [path.stem]):
                continue  # recorded; or (no first copy any more) left for an operator, as any quarantined file
        try:
            dataset, header = _read_stored_header(copy)
            received = datetime.strptime(copy.stem.rsplit("-", 1)[1], SET_ASIDE_TIME_FORMAT)
        except (UnindexableFile, ValueError, IndexError):
            continue
        meta = dataset.file_meta
        source = meta.get("SourceApplicationEntityTitle")
        record = header.record(meta.TransferSyntaxUID, str(path), copy.stat().st_size, source)
        record = dataclasses.replace(record, received_at=received.replace(tzinfo=timezone.utc))
        with transaction(sessions) as session:
            outcome = record_stored_instance(session, store, record)
        if outcome.set_aside == copy:
            recorded += 1
            log_event(
                LOG,
                logging.WARNING,
                "recorder.recovered_set_aside_copy",
                path=str(copy),
                sop_instance_uid=header.sop_instance_uid,
                note=f"a copy set aside for series {path.parent.name} by a receiver that stopped before recording "
                "it is now recorded, so the series is known to lack the image",
            )
    return recorded


def _already_lacked(session: Session, series_uid: str, sop_instance_uid: str) -> bool:
    """Whether an earlier copy of this image, claiming this series, was refused or set aside: the series already
    knows it lacks the image (its completion counted it), so another copy changes nothing."""
    earlier = select(RejectedInstance.id).where(
        RejectedInstance.series_instance_uid == series_uid, RejectedInstance.sop_instance_uid == sop_instance_uid
    )
    return session.scalars(earlier.limit(1)).first() is not None


@dataclass
class RepairReport:
    partial_files_removed: int = 0
    instances_indexed: int = 0
    unreadable_files: int = 0  # files that could not be indexed: moved to quarantine, with a rejected_instances row
    duplicates_quarantined: int = 0  # copies of an instance recorded in another series: in quarantine, with a row
    quarantine_files_recorded: int = 0  # files in quarantine that no row named (a process stopped before its commit)


class UnindexableFile(Exception):
    """A stored file that cannot be recorded; ``reason`` says why, for the operator."""

    def __init__(self, reason: str, dataset: object | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dataset = dataset


def repair(store: InstanceStore, sessions: sessionmaker[Session]) -> RepairReport:
    """Bring disk and database into agreement after a crash.

    Partial files are removed. An instance file on disk but not in the database
    (the process died between the rename and the commit) is indexed, so nothing
    that reached the disk is lost. A file that cannot be indexed (unreadable, or
    with values the database cannot hold) is moved to quarantine with a
    ``rejected_instances`` row and a log line, so start-up never fails on data.
    Each series folder's file names are compared with the database's (a count alone can match while a
    file is unrecorded and a recorded file is gone); only unrecorded files are read. Last, a file in quarantine that no row names is recorded (:func:`record_unrecorded_quarantine_files`).
    """
    report = RepairReport(partial_files_removed=store.remove_partial_files())
    for _study_uid, series_uid, folder in store.series_folders():
        files = sorted(folder.glob("*.dcm"))
        with sessions() as session:
            known = set(
                session.scalars(
                    select(Instance.path).join(Instance.series).where(Series.series_instance_uid == series_uid)
                )
            )
        for path in files:
            if str(path) not in known:
                outcome = index_file(path, store, sessions)
                report.instances_indexed += outcome == "indexed"
                report.unreadable_files += outcome == "quarantined"
                report.duplicates_quarantined += outcome == "set aside"
    report.quarantine_files_recorded = record_unrecorded_quarantine_files(store, sessions)
    return report


UNRECORDED_QUARANTINE_REASON = (
    "found in quarantine at start-up with no record of why: the node stopped, or could not write its database, "
    "after setting the file aside and before recording the reason"
)


def record_unrecorded_quarantine_files(store: InstanceStore, sessions: sessionmaker[Session]) -> int:
    """Record each file in ``quarantine/`` that no ``rejected_instances`` row names; how many.

    Every move or write into quarantine commits its row after the file is in place, so nothing kept is lost
    whenever a process stops; one stopped between the two leaves a file nobody is told of, and the series it
    was sent for would complete without its partial-series warning. A copy set aside for another series gets
    the row its recorder would have written (:func:`record_copies_set_aside`), any other file a row saying
    :data:`UNRECORDED_QUARANTINE_REASON` and what the file holds. Rows are matched by file name (a storage
    folder moved since still matches) and each file is recorded in one transaction, so running this again,
    or after a stop half-way, records no file twice. Call it only while nothing writes into quarantine.
    """
    try:
        with os.scandir(store.quarantine_dir) as entries:
            names = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return 0
    named = _NamedFiles(sessions)
    recorded = 0
    for name in sorted(names):
        if not named.names(name):
            recorded += _record_unrecorded_file(store.quarantine_dir / name, store, sessions, named)
    return recorded


class _NamedFiles:
    """The file names ``rejected_instances`` rows name (by their path's last part), read once and then only the
    rows added since (by id): a check per quarantine file costs no scan of the table."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._names: set[str] = set()
        self._last_id = 0
        self.refresh()

    def refresh(self) -> None:
        with self._sessions() as session:
            rows = session.execute(
                select(RejectedInstance.id, RejectedInstance.path).where(RejectedInstance.id > self._last_id)
            ).all()
        for row_id, path in rows:
            self._last_id = max(self._last_id, row_id)
            if path:
                self._names.add(Path(path).name)

    def names(self, name: str) -> bool:
        return name in self._names


def _record_unrecorded_file(
    path: Path, store: InstanceStore, sessions: sessionmaker[Session], named: _NamedFiles
) -> int:
    """Record one quarantine file that no row named when the listing was read; 1 if this recorded it."""
    named.refresh()
    if named.names(path.name):
        return 0  # recorded meanwhile, with a copy set aside beside it
    if _recorded_as_set_aside_copy(path, store, sessions, named):
        return 1
    dataset, holds = _describe_quarantined(path)
    reason = f"{UNRECORDED_QUARANTINE_REASON}; {holds}"
    received_at = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    _record_quarantined(sessions, path, dataset, reason, received_at=received_at)
    log_event(LOG, logging.WARNING, "repair.unrecorded_quarantine_file", quarantine=str(path), reason=reason)
    return 1


def _recorded_as_set_aside_copy(
    path: Path, store: InstanceStore, sessions: sessionmaker[Session], named: _NamedFiles
) -> bool:
    """Whether ``path`` is a copy set aside as ``<series>-<sop>-<time>.dcm`` and is now recorded as such."""
    series_uid, _, rest = path.stem.partition("-")
    sop_uid, _, _received = rest.partition("-")
    if path.suffix != ".dcm" or not is_valid_uid(series_uid) or not is_valid_uid(sop_uid):
        return False
    try:
        _, header = _read_stored_header(path)
    except UnindexableFile:
        return False
    if (header.series.series_instance_uid, header.sop_instance_uid) != (series_uid, sop_uid):
        return False
    record_copies_set_aside(store.path_for(header.study.study_instance_uid, series_uid, sop_uid), store, sessions)
    named.refresh()
    return named.names(path.name)


def _describe_quarantined(path: Path) -> tuple[Dataset | None, str]:
    """What can be read of a quarantine file whose reason is lost: its data set (or None), and a sentence on it."""
    try:
        dataset, header = _read_stored_header(path)
    except UnindexableFile as refused:
        found = refused.dataset if isinstance(refused.dataset, Dataset) else _read_data_set_as_received(path)
        if found is None:
            return None, "it is not a readable DICOM file"
        if path.suffix == ".raw":
            return found, f"it is the data set as received, without file meta information, and {_naming(found)}"
        return found, f"it {_naming(found)}, and cannot be stored as it is: {refused.reason}"
    series_uid = header.series.series_instance_uid
    return dataset, f"it holds SOP Instance UID {header.sop_instance_uid} of series {series_uid}"


def _read_data_set_as_received(path: Path) -> Dataset | None:
    """A ``.raw`` quarantine file: the data set without preamble or file meta (None if it cannot be read)."""
    if path.suffix != ".raw":
        return None
    try:
        return dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(_NAMING_KEYWORDS))
    except Exception:  # noqa: BLE001 - any unreadable file is recorded as such
        return None


_NAMING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")


def _naming(dataset: Dataset) -> str:
    """'names SOP Instance UID ... of series ...', with what of the two could be read."""
    meta = getattr(dataset, "file_meta", None)
    sop_uid = _uid_or_none(meta, "MediaStorageSOPInstanceUID") or _uid_or_none(dataset, "SOPInstanceUID")
    series_uid = _uid_or_none(dataset, "SeriesInstanceUID")
    if sop_uid and series_uid:
        return f"names SOP Instance UID {sop_uid} of series {series_uid}"
    if sop_uid:
        return f"names SOP Instance UID {sop_uid}, without a readable SeriesInstanceUID"
    if series_uid:
        return f"names series {series_uid}, without a readable SOP Instance UID"
    return "names no readable SOP Instance UID or SeriesInstanceUID"


IndexOutcome = Literal["indexed", "set aside", "quarantined", "already recorded"]
FoundBy = Literal["start-up", "journal recovery"]
"""Who indexes a stored file the database lacks: start-up repair, or ``serve``'s recovery of the journal of a
receiving process that died (while the other receiving processes record)."""

UNIQUE_COLLISION_RETRIES = 5
"""How often a batch (the recorder's) or a file (:func:`index_file`) is recorded again after a unique-key conflict
(another process inserting the same study, series or instance at once) before the conflict counts as its own."""


def index_file(
    path: Path, store: InstanceStore, sessions: sessionmaker[Session], *, found_by: FoundBy = "start-up"
) -> IndexOutcome:
    """Record one stored file that the database lacks; a file that cannot be recorded goes to quarantine.

    A copy of an instance recorded under another series is set aside (:func:`_keep_first_copy`). Another process
    recording the same study, series or instance at the same moment is no fault of the file: it is recorded again
    (:func:`_record_again_after_collisions`). A file that an instance row names is never moved.
    """
    try:
        dataset, header = _read_stored_header(path)
    except UnindexableFile as refused:
        return _quarantine_unless_recorded(path, refused, store, sessions, found_by)
    meta = dataset.file_meta
    record = header.record(
        meta.TransferSyntaxUID, str(path), path.stat().st_size, meta.get("SourceApplicationEntityTitle")
    )
    try:
        outcome = _record_again_after_collisions(sessions, store, record)
    except OperationalError:
        raise  # the database itself is unavailable (locked, gone, its disk full): not this file's fault
    except Exception:  # a value the database refuses must not stop start-up
        LOG.exception("repair.database_refused_file", extra={"event_fields": {"path": str(path)}})
        refusal = UnindexableFile("the database refused its values (see the log)", dataset)
        return _quarantine_unless_recorded(path, refusal, store, sessions, found_by)
    if outcome.set_aside is not None:
        log_event(
            LOG,
            logging.WARNING,
            "repair.set_aside_file",
            path=str(path),
            quarantine=str(outcome.set_aside),
            sop_instance_uid=header.sop_instance_uid,
            note=f"this SOP Instance UID is already stored in series {outcome.path.parent.name}",
        )
        return "set aside"
    if not outcome.recorded.stored:
        return "already recorded"
    log_event(LOG, logging.WARNING, "repair.indexed_file", path=str(path), sop_instance_uid=header.sop_instance_uid)
    return "indexed"


def _record_again_after_collisions(
    sessions: sessionmaker[Session], store: InstanceStore, record: InstanceRecord
) -> StoreOutcome:
    """Record one instance in a transaction of its own, again after a unique-key conflict or a job changed meanwhile.

    PostgreSQL: a receiving process inserting the same new study, series or instance at the same moment makes this
    insert wait for its commit, then fail on the unique key; read again, the row is there (as the recorder does).
    """
    attempts = 0
    while True:
        try:
            with transaction(sessions) as session:
                return record_stored_instance(session, store, record)
        except (IntegrityError, StaleDataError):
            attempts += 1
            if attempts > UNIQUE_COLLISION_RETRIES:
                raise
            time.sleep(0.01 * attempts)


def _quarantine_unless_recorded(
    path: Path, refused: UnindexableFile, store: InstanceStore, sessions: sessionmaker[Session], found_by: FoundBy
) -> IndexOutcome:
    """Move a file that cannot be indexed to quarantine, unless an instance row names it: another process recorded
    it meanwhile (the same SOP Instance UID at this path), and a row must never point at a file that is gone."""
    if read_outside_transaction(sessions, select(Instance.id).where(Instance.path == str(path))) is not None:
        log_event(
            LOG,
            logging.INFO,
            "repair.recorded_meanwhile",
            path=str(path),
            note="another receiving process recorded this instance at the same moment; the file stays where it is",
        )
        return "already recorded"
    quarantine_stored_file(path, refused, store, sessions, when=found_by)
    return "quarantined"


def _read_stored_header(path: Path) -> tuple[Dataset, InstanceHeader]:
    try:
        dataset = dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any unreadable file is reported and kept in quarantine
        raise UnindexableFile("not a readable DICOM file") from None
    try:
        meta = dataset.file_meta
        header = check_header(dataset, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID)
    except InvalidInstance as exc:
        raise UnindexableFile(str(exc), dataset) from None
    except Exception:  # noqa: BLE001 - e.g. no file meta information
        raise UnindexableFile("its file meta information is missing or unreadable", dataset) from None
    return dataset, header


def quarantine_stored_file(
    path: Path,
    refused: UnindexableFile,
    store: InstanceStore,
    sessions: sessionmaker[Session],
    *,
    when: str = "start-up",
    series_instance_uid: str | None = None,
) -> None:
    """Move a file that cannot be indexed to quarantine, record why, and log it.

    The move comes first, so the file is never lost: a process stopped before the commit leaves it in
    quarantine without a row, and the next start-up records it (:func:`record_unrecorded_quarantine_files`).
    ``when``: "start-up" (found by repair), "journal recovery" (named in the journal of a receiving process that
    died) or "received" (the recorder could not record it).
    ``series_instance_uid``: the series the file was stored under, if known (else read from the file).
    """
    target = store.quarantine_path(".dcm")
    os.replace(path, target)
    dataset = refused.dataset if isinstance(refused.dataset, Dataset) else None
    if when == "start-up":
        reason = f"found in storage at start-up and not indexed: {refused.reason}"
    elif when == "journal recovery":
        reason = (
            "stored and acknowledged by a receiving process that stopped before recording it, then not indexed "
            f"from its journal: {refused.reason}"
        )
    else:
        reason = f"stored and acknowledged, then not recorded: {refused.reason}"
    _record_quarantined(sessions, target, dataset, reason, series_instance_uid=series_instance_uid)
    log_event(
        LOG, logging.ERROR, "repair.quarantined_file", path=str(path), quarantine=str(target), reason=refused.reason
    )


def _record_quarantined(
    sessions: sessionmaker[Session],
    path: Path,
    dataset: Dataset | None,
    reason: str,
    *,
    series_instance_uid: str | None = None,
    received_at: datetime | None = None,
) -> None:
    """The ``rejected_instances`` row of the quarantine file ``path``: its UIDs from its file meta information, else
    from its data set; its series ``series_instance_uid`` where known, else the one the data set names."""
    meta = getattr(dataset, "file_meta", None)
    with transaction(sessions) as session:
        record_rejection(
            session,
            status=status.PROCESSING_FAILURE,
            reason=reason,
            path=str(path),
            sop_instance_uid=_uid_or_none(meta, "MediaStorageSOPInstanceUID")
            or _uid_or_none(dataset, "SOPInstanceUID"),
            sop_class_uid=_uid_or_none(meta, "MediaStorageSOPClassUID") or _uid_or_none(dataset, "SOPClassUID"),
            transfer_syntax_uid=_uid_or_none(meta, "TransferSyntaxUID"),
            calling_ae_title=_text_or_none(meta, "SourceApplicationEntityTitle"),
            series_instance_uid=series_instance_uid or _uid_or_none(dataset, "SeriesInstanceUID"),
            received_at=received_at,
        )


def _uid_or_none(meta: Dataset | None, keyword: str) -> str | None:
    value = _text_or_none(meta, keyword)
    return value if is_valid_uid(value) else None


def _text_or_none(meta: Dataset | None, keyword: str) -> str | None:
    try:
        value = meta.get(keyword) if meta is not None else None
    except Exception:  # noqa: BLE001 - a malformed meta element is no reason to fail
        return None
    if value is None:
        return None
    return str(value).strip()[:64] or None


def _write_all(descriptor: int, *parts: bytes) -> None:
    """Write every byte of ``parts`` in order, in as few system calls as the kernel allows (usually one)."""
    pending = [memoryview(part) for part in parts if len(part)]  # len(None) raises, as a write of it would
    while pending:
        written = os.writev(descriptor, pending)
        while pending and written >= pending[0].nbytes:
            written -= pending[0].nbytes
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]


def fsync_path(path: Path) -> None:
    """Write ``path`` to disk: a file's bytes, or a folder's names (its renames and new files)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` durable (its renames and new files)."""
    fsync_path(folder)
