"""The patient each stored study belongs to: an instance of a known study under another patient is refused.

A StudyInstanceUID names one patient's study; a patient is a PatientID, and, where both sides send them, the
IssuerOfPatientID that says whose numbering it is, PatientName, PatientBirthDate and PatientSex
(:meth:`StudyPatient.differing_keyword`). Two patients under one study UID (a UID
collision, or a study merged or corrected in the PACS and sent again) would put the second
patient's images, and every answer to a query by the first patient's ID, under the first
patient; a new series under another name, birth date or sex would be answered (queries, the console) with the
study's first identity while its results carry the new one. The receiver looks the study up once (then at most
once a minute) per process and refuses an instance of a new series under another patient before it is written.
An instance of a series already stored is left to admission, which refuses the whole series when its instances
disagree on the patient: refusing that one instance here would let the rest of the series be
processed without it. The first instance of a new series also claims its study for its patient node-wide
(:class:`~dicom_node.receive.claims.StudyClaims`), checked and taken at once: of two series of one study under two
patients arriving at the same moment, in one receiving process or two, only the first is acknowledged, before
either is recorded. Identity text whose bytes only read by guessing their character set (a UTF-8 name sent
without SpecificCharacterSet) is recorded as unknown (:func:`~dicom_node.receive.header.check_header`): it never
fixes the study's patient, so the same patient's series sent again with its character set declared is received.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import QuickLookup, recorded_path_lookup, result_series_lookup, series_study_lookup
from db.models import Series, Study, as_utc, utcnow
from db.session import read_outside_transaction, read_row_outside_transaction
from dicom_node.logs import first_line, log_throttled
from dicom_node.receive.claims import StudyClaims
from dicom_node.receive.header import InstanceHeader, StudyPatient

LOG = logging.getLogger(__name__)

UNREADABLE_PAUSE_SECONDS = 5.0
"""After the database could not be read (locked, down), this long without lookups: receiving never waits for it."""
LOOKUP_SECONDS = 60.0
"""How long a study's patient is trusted before it is read again (a purge erases it)."""
REMEMBERED_STUDIES = 4096


class KnownStudies:
    """Recorded patient per StudyInstanceUID, read from the database and remembered for a while."""

    def __init__(self, sessions: sessionmaker[Session], claims: StudyClaims | None = None) -> None:
        self.sessions = sessions
        self.claims = claims or StudyClaims()
        """The studies being received, claimed by patient: this process' own, or shared by every receiving
        process (:meth:`share_claims`)."""
        self._lock = threading.Lock()
        self._patients: dict[str, tuple[float, StudyPatient]] = {}
        self._series: set[str] = set()  # series this process has stored an instance of
        self._erasures: dict[tuple[str, object], float] = {}  # (study, purged_at) -> when, on time.monotonic()
        self._unreadable_until = 0.0  # time.monotonic() until which the database is not asked
        bind = sessions.kw["bind"]
        engine = bind.engine if isinstance(bind, Connection) else bind
        self._recorded_path = recorded_path_lookup(engine)
        self._study_of_series = series_study_lookup(engine)
        self._job_of_result_series = result_series_lookup(engine)

    def _read(self, query: Any, *, row: bool = False) -> tuple[bool, Any]:
        """(True, one scalar, or one row) from the database, or (False, None) while it cannot be read: the check is
        a second line of defence behind admission, and must never hold up or fail an acknowledgement."""
        if time.monotonic() < self._unreadable_until:
            return False, None
        read = read_row_outside_transaction if row else read_outside_transaction
        try:
            return True, read(self.sessions, query)  # no write lock: never waits for a writer
        except SQLAlchemyError as exc:
            self._pause(exc)
            return False, None

    def _pause(self, error: BaseException) -> None:
        """The database could not be read: no lookups for a while, and a line in the log saying so."""
        self._unreadable_until = time.monotonic() + UNREADABLE_PAUSE_SECONDS
        log_throttled(
            LOG,
            logging.WARNING,
            "receiver.database_unreadable",
            "lookups",
            reason=f"the database could not be read to compare received instances with what is stored "
            f"({first_line(error)}); for {UNREADABLE_PAUSE_SECONDS:.0f} s they are compared by admission only",
        )

    def recorded_patient(self, study_instance_uid: str) -> StudyPatient | None:
        """The study's recorded patient; None for a study not stored yet (or whose identity was erased)."""
        return self._recorded(study_instance_uid)[1]

    def _recorded(self, study_instance_uid: str) -> tuple[bool, StudyPatient | None]:
        """Whether the study is recorded (a row, its identity erased by a purge or not, or a series this process
        stored), and its patient (None where erased or not recorded)."""
        now = time.monotonic()
        with self._lock:
            known = self._patients.get(study_instance_uid)
        if known is not None and now - known[0] < LOOKUP_SECONDS:
            return True, known[1]
        _read, row = self._read(
            select(
                Study.patient_id,
                Study.issuer_of_patient_id,
                Study.patient_name,
                Study.patient_birth_date,
                Study.patient_sex,
                Study.issuer_universal_entity_id,
            ).where(Study.study_instance_uid == study_instance_uid),
            row=True,
        )
        if row is None or row[0] is None:  # read again next time: another process may be storing it
            return row is not None, None
        patient = StudyPatient(*row)
        with self._lock:
            if len(self._patients) >= REMEMBERED_STUDIES:
                self._patients.clear()
            self._patients[study_instance_uid] = (now, patient)
        return True, patient

    def _erased_at(self, study_instance_uid: str) -> float:
        """When (``time.monotonic()``) the study's last series was purged, which erased its identity; 0.0 where
        none was, or while the database cannot be read.

        The purge is dated by the wall clock; its instant on the monotonic clock is worked out the first time this
        process sees it and kept: a wall clock stepped back later must not move the erasure after claims taken
        since (which would count them as stale), and a purge dated in the future counts as now."""
        _read, purged_at = self._read(
            select(func.max(Series.purged_at)).join(Study).where(Study.study_instance_uid == study_instance_uid)
        )
        if purged_at is None:
            return 0.0
        key = (study_instance_uid, purged_at)
        with self._lock:
            erased = self._erasures.get(key)
            if erased is None:
                elapsed = max(0.0, (utcnow() - as_utc(purged_at)).total_seconds())
                erased = time.monotonic() - elapsed
                if len(self._erasures) >= REMEMBERED_STUDIES:
                    self._erasures.clear()
                self._erasures[key] = erased
        return erased

    def remember(self, header: InstanceHeader) -> None:
        """An instance of ``header``'s study was stored: where it is the first of its series this process stores,
        its patient is the study's from now on (in this process at once; in the others once it is recorded).

        A later instance of a series changes nothing, as on the study's row (:func:`db.ingest.record_new_instances`):
        admission may yet refuse the series for it, and the study must not name that instance's patient."""
        patient = StudyPatient.of(header.study)
        with self._lock:
            if len(self._series) >= REMEMBERED_STUDIES:
                self._series.clear()
            first_of_series = header.series.series_instance_uid not in self._series
            self._series.add(header.series.series_instance_uid)
            if not first_of_series or not patient.patient_id:
                return
            known = self._patients.get(header.study.study_instance_uid)
            if known is None:
                if len(self._patients) >= REMEMBERED_STUDIES:
                    self._patients.clear()
                self._patients[header.study.study_instance_uid] = (time.monotonic(), patient)
            else:  # the study's row takes the details its first series left empty (db.ingest.restore_study_identity)
                self._patients[header.study.study_instance_uid] = (known[0], known[1].completed_by(patient))

    def share_claims(self, claims: StudyClaims) -> None:
        """Claim studies in the table every receiving process shares (``serve`` made it before starting them)."""
        self.claims = claims

    def series_stored(self, series_instance_uid: str) -> bool:
        """Whether an instance of the series is stored (by this process, or recorded by any)."""
        with self._lock:
            if series_instance_uid in self._series:
                return True
        read, count = self._read(select(Series.instance_count).where(Series.series_instance_uid == series_instance_uid))
        return not read or bool(count)  # not readable: left to admission

    def conflict(self, header: InstanceHeader) -> str | None:
        """Why ``header`` may not join its study (a new series under another patient), or None. Values are never
        named."""
        received = StudyPatient.of(header.study)
        if not (received.patient_id or "").strip():
            return None  # a missing PatientID is admission's to refuse, for the whole series
        with self._lock:
            if header.series.series_instance_uid in self._series:
                return None  # a series this process stored: its first instance was compared, and claimed the study
        study_instance_uid = header.study.study_instance_uid
        known, recorded = self._recorded(study_instance_uid)
        if recorded is not None:  # the row decides, once written
            differing = recorded.differing_keyword(received)
            being = "already stored"
        else:  # not recorded yet, or its identity erased by a purge: claimed for this patient, unless another
            # process is receiving another's series; a claim from before the erasure names nobody any more
            stale_before = self._erased_at(study_instance_uid) if known else 0.0
            differing = self.claims.claim(study_instance_uid, received, stale_before)
            being = "being received"
        if differing is None or self.series_stored(header.series.series_instance_uid):
            return None  # a stored series: admission refuses the whole series if its instances disagree
        return (
            f"StudyInstanceUID {header.study.study_instance_uid} is {being} for another patient (its "
            f"{differing} differs); one study holds one patient, so this instance is quarantined"
        )

    def recorded_path(self, sop_instance_uid: str) -> str | None:
        """Where an instance with this SOP Instance UID is recorded; None when it is not, or while the database
        cannot be read (the recorder still compares a copy with the one recorded before it)."""
        return self._quickly(self._recorded_path, sop_instance_uid)

    def result_job(self, header: InstanceHeader) -> str | None:
        """The job whose results ``header``'s series is (a SEG, SR or RTSTRUCT series the node made, current,
        superseded or purged); None for any other series, or while the database cannot be read.

        Such a series never takes a received instance: Query/Retrieve would hand it out as the node's result
        (:func:`own_results_reason`)."""
        return self._quickly(self._job_of_result_series, header.series.series_instance_uid)

    def series_conflict(self, header: InstanceHeader) -> str | None:
        """Why ``header`` may not join its series (the series holds instances under another study), or None.

        Recorded into its series, such an instance would be answered by Query/Retrieve under the series' study
        while its header names another, and admission would refuse the whole series anyway. A series that
        retention purged holds none: sent again under a corrected study, it is received. (A series of the node's
        own results is the caller's to check first: :meth:`result_job`.)"""
        study = self._quickly(self._study_of_series, header.series.series_instance_uid)
        if study is None or study == header.study.study_instance_uid:
            return None
        return (
            f"SeriesInstanceUID {header.series.series_instance_uid} is stored under StudyInstanceUID {study}, but "
            f"this instance names StudyInstanceUID {header.study.study_instance_uid}; a series belongs to one study, "
            "so this instance is quarantined"
        )

    def _quickly(self, lookup: QuickLookup, key: str) -> str | None:
        """``lookup(key)``; None while the database cannot be read (receiving never waits for it)."""
        if time.monotonic() < self._unreadable_until:
            return None
        try:
            return lookup(key)
        except lookup.errors as exc:
            self._pause(exc)
            return None


def own_results_reason(header: InstanceHeader, job: str) -> str:
    """Why an instance sent into a series of the node's own results (of job ``job``) is refused, unless it is an
    identical copy of a result the node holds."""
    return (
        f"SeriesInstanceUID {header.series.series_instance_uid} is a series of this node's own results (job {job}); "
        "the node never adds received instances to its results, so this instance is quarantined"
    )
