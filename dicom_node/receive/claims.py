"""Which patient each study being received belongs to, shared by every receiving process before it is recorded.

A receiving process learns of another's study only once that process' recorder has written the study's row (in
batches, after the acknowledgement). Two series of one StudyInstanceUID under two patients, arriving at the same
moment on associations of two processes (or of two threads of one), would both be acknowledged. So the first
instance of a new series claims its study for its patient (:meth:`StudyClaims.claim`), checked and taken under one
lock: a claim by another patient (compared as :meth:`~dicom_node.receive.header.StudyPatient.differing_keyword`
compares: where both carry a value, and names that share no component group are two people) is refused as a study
stored under another patient is. The same patient's series completes the claim as it completes the study's row
(each component group of the name from the first series carrying it), so of two later series naming two people in a
group the first left out, only the first is acknowledged.

``serve`` creates the table (fixed, in shared memory) before it starts the receiving processes and hands each its
view (:meth:`StudyClaims.for_process`). A claim lasts :data:`CLAIM_SECONDS` after its study's latest new series, long
after the recorder has written the study's row; when the claims of one set of slots are all taken, the oldest is
dropped (recorded by then). A receiving process that dies is forgotten once what it acknowledged is indexed
(:meth:`StudyClaims.forget`), and the lock, if it died holding it, is given back first.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import logging
import multiprocessing
import time
import zlib
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any

from dicom_node.logs import log_throttled
from dicom_node.receive.header import StudyPatient
from dicom_node.security import locked_after_death

LOG = logging.getLogger(__name__)

CLAIM_SECONDS = 600.0
"""How long a study stays claimed after its latest new series was received: far longer than the recorder takes to
write the study's row (which every process reads), even while the database is locked for minutes."""
CLAIM_SLOTS = 2048
"""Studies claimed at a time, node-wide; per set of :data:`CLAIM_WAYS` slots, a new claim drops the oldest."""
CLAIM_WAYS = 8
UID_BYTES = 64
"""A UID is at most 64 characters; a longer one is kept as a digest of that length."""
FIELD_BYTES = 256
"""Bytes kept of each identity value (UTF-8): a conformant PatientID, issuer, birth date or sex always fits, and so
does a name of three 64-character component groups in most scripts."""
IDENTITY_FIELDS = [field.name for field in fields(StudyPatient)]
WAIT_SECONDS = 5.0
"""Longest wait for the lock (held for microseconds at a time; one left by a dead process is given back within
seconds): after that the instance is left to admission's check, never held up."""
NO_VALUE = -1


def bounded(patient: StudyPatient) -> StudyPatient:
    """``patient`` as the table keeps it: each value in at most :data:`FIELD_BYTES` bytes.

    A longer value is never cut, which could make one patient two: a longer PatientID (which must be equal) is kept
    as a digest of its text, any other longer value as none (compared where both carry one, so it is admission's to
    compare)."""
    kept: dict[str, str | None] = {}
    for name in IDENTITY_FIELDS:
        value = getattr(patient, name)
        if value is None or len(value.encode()) <= FIELD_BYTES:
            kept[name] = value
        elif name == "patient_id":
            kept[name] = "\0digest " + hashlib.blake2b(value.strip().encode(), digest_size=32).hexdigest()
        else:
            kept[name] = None
    return replace(patient, **kept)


class StudyClaims:
    """StudyInstanceUID -> the patient whose series claimed it, in a fixed table shared by the receiving processes.

    Made like :class:`~dicom_node.security.AssociationCaps`: one lock and shared-memory arrays from
    ``multiprocessing``; each process' view (:meth:`for_process`) records its number as the lock's holder and among
    the claimants of each study it claims. In ``serve``'s own process (``receive.processes: 1``) the same table
    serves its threads."""

    ORPHANED_LOCK_SECONDS = 2.0

    def __init__(self, slots: int = CLAIM_SLOTS, processes: int = 1, context: Any = None) -> None:
        if not 1 <= processes <= 64:
            raise ValueError(f"the study claims count the claimants of 1 to 64 receiving processes, not {processes}")
        context = context or multiprocessing.get_context("spawn")
        self.ways = min(CLAIM_WAYS, slots)
        self.slots = slots - slots % self.ways
        self.processes = processes
        self.row = 0
        self._lock = context.Lock()
        self._holder = context.RawValue(ctypes.c_int, 0)  # the row number + 1 of the process inside the lock; 0: none
        self._keys = context.RawArray(ctypes.c_char, self.slots * UID_BYTES)
        # time.monotonic(), one clock for every process on Linux (CLOCK_MONOTONIC); 0: an empty slot
        self._claimed_at = context.RawArray(ctypes.c_double, self.slots)
        self._claimants = context.RawArray(ctypes.c_ulonglong, self.slots)  # bit n: receiving process n claimed it
        self._lengths = context.RawArray(ctypes.c_short, self.slots * len(IDENTITY_FIELDS))  # NO_VALUE: none
        self._values = context.RawArray(ctypes.c_char, self.slots * len(IDENTITY_FIELDS) * FIELD_BYTES)

    def for_process(self, number: int) -> StudyClaims:
        """The same shared table, with the claims this object takes owned by receiving process ``number``."""
        if not 0 <= number < self.processes:
            raise ValueError(f"receiving process {number} has no row (there are {self.processes})")
        view = copy.copy(self)
        view.row = number
        return view

    def claim(self, study_instance_uid: str, patient: StudyPatient, stale_before: float = 0.0) -> str | None:
        """Claim the study for ``patient``; or, where another patient claimed it, the attribute that differs (the
        claim then stays that patient's). The same patient's claim takes the details the first left out (each name
        group too), as the study's row does. A claim taken before ``stale_before`` (``time.monotonic()``: when a
        purge erased the study's identity) no longer counts: the study names nobody since."""
        key = _key(study_instance_uid)
        wanted = bounded(patient)
        first = zlib.crc32(key) % (self.slots // self.ways) * self.ways
        with self._locked() as held:
            if not held:
                return None
            now = time.monotonic()
            free = first
            ended: int | None = None  # the study's own claim that no longer counts: taken again in its place
            for slot in range(first, first + self.ways):
                claimed_at = self._claimed_at[slot]
                if claimed_at and self._key_in(slot) == key:
                    if now - claimed_at < CLAIM_SECONDS and claimed_at >= stale_before:
                        claimed = self._patient_in(slot)
                        differing = claimed.differing_keyword(wanted)
                        if differing is None:
                            self._write(slot, key, _completed(claimed, wanted), now, self._claimants[slot])
                        return differing
                    ended = slot
                if self._claimed_at[free] and (not claimed_at or claimed_at < self._claimed_at[free]):
                    free = slot  # empty, or the oldest claim so far (expired ones are oldest)
            self._write(free if ended is None else ended, key, wanted, now, 0)
            return None

    def forget(self, number: int) -> None:
        """Drop receiving process ``number``'s claims (a study another process claimed too stays claimed): it died,
        and what it acknowledged is recorded, indexed from its journal. The lock is given back first where it died
        holding it (:func:`locked_after_death`)."""
        with locked_after_death(
            self._lock, self._holder, number, self.processes, "the shared study claims", self.ORPHANED_LOCK_SECONDS
        ):
            for slot in range(self.slots):
                if self._claimants[slot] & 1 << number:
                    self._claimants[slot] &= ~(1 << number)
                    if not self._claimants[slot]:
                        self._claimed_at[slot] = 0.0

    def give_back_lock_of(self, number: int) -> None:
        """Give back the lock where dead receiving process ``number`` held it, so that the others go on at once."""
        with locked_after_death(
            self._lock, self._holder, number, self.processes, "the shared study claims", self.ORPHANED_LOCK_SECONDS
        ):
            pass

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """The shared lock (True), this process' row recorded as its holder; False when it was not had within
        :data:`WAIT_SECONDS`."""
        if not self._lock.acquire(timeout=WAIT_SECONDS):
            log_throttled(
                LOG,
                logging.WARNING,
                "receiver.claims_unavailable",
                self.row,
                reason=f"the studies being received by the other receiving processes could not be read within "
                f"{WAIT_SECONDS:g} s; a new series is compared with the study's other patients by admission only "
                "until they can",
            )
            yield False
            return
        self._holder.value = self.row + 1
        try:
            yield True
        finally:
            self._holder.value = 0
            self._lock.release()

    def _key_in(self, slot: int) -> bytes:
        return self._keys[slot * UID_BYTES : (slot + 1) * UID_BYTES]

    def _patient_in(self, slot: int) -> StudyPatient:
        values: list[str | None] = []
        for index in range(len(IDENTITY_FIELDS)):
            cell = slot * len(IDENTITY_FIELDS) + index
            length = self._lengths[cell]
            start = cell * FIELD_BYTES
            values.append(None if length == NO_VALUE else self._values[start : start + length].decode())
        return StudyPatient(*values)

    def _write(self, slot: int, key: bytes, patient: StudyPatient, now: float, claimants: int) -> None:
        self._keys[slot * UID_BYTES : (slot + 1) * UID_BYTES] = key
        for index, name in enumerate(IDENTITY_FIELDS):
            cell = slot * len(IDENTITY_FIELDS) + index
            value = getattr(patient, name)
            encoded = b"" if value is None else value.encode()
            self._lengths[cell] = NO_VALUE if value is None else len(encoded)
            self._values[cell * FIELD_BYTES : cell * FIELD_BYTES + len(encoded)] = encoded
        self._claimants[slot] = claimants | 1 << self.row
        self._claimed_at[slot] = now


def _completed(claimed: StudyPatient, wanted: StudyPatient) -> StudyPatient:
    """The claim of ``claimed`` with the details ``wanted`` (the same patient) adds, as the study's row takes them
    (:meth:`StudyPatient.completed_by`); as it was where a value completed so would not fit the table (a name whose
    groups, taken from two series, are longer together than :data:`FIELD_BYTES`)."""
    completed = claimed.completed_by(wanted)
    return completed if bounded(completed) == completed else claimed


def _key(study_instance_uid: str) -> bytes:
    """The study's key in the table: its UID, or a digest of one longer than a UID may be."""
    encoded = study_instance_uid.encode()
    if len(encoded) > UID_BYTES:
        encoded = hashlib.blake2b(encoded, digest_size=UID_BYTES).digest()
    return encoded.ljust(UID_BYTES, b"\0")
