"""Recording received instances: study, series, instance and the series' job in one transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, bindparam, func, insert, literal_column, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from db import jobs
from db.models import (
    STUDY_IDENTITY_COLUMNS,
    Base,
    Instance,
    Job,
    JobEvent,
    JobState,
    RejectedInstance,
    Series,
    Study,
    utcnow,
)
from db.names import completed_name, name_key, other_person


@dataclass(frozen=True)
class StudyAttributes:
    study_instance_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    issuer_universal_entity_id: str | None = None  # of IssuerOfPatientIDQualifiersSequence (an OID or URI)
    issuer_universal_entity_id_type: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    patient_undecodable: bool = False
    """A patient identity value (PatientID, its issuer, name, birth date, sex) was sent in bytes its character set
    does not decode: recorded as unknown (None) here, and the instance is never served (its patient cannot be
    shown to be its study's)."""


@dataclass(frozen=True)
class SeriesAttributes:
    series_instance_uid: str
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    body_part_examined: str | None = None
    manufacturer: str | None = None
    expected_instances: int | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    study: StudyAttributes
    series: SeriesAttributes
    instance_number: int | None = None
    image_type: str | None = None
    slice_thickness: float | None = None
    number_of_frames: int | None = None
    calling_ae_title: str | None = None
    received_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class RecordOutcome:
    stored: bool  # False: the SOP Instance UID was already recorded
    series_reopened: bool = False
    series_created: bool = False
    reopened_because: str | None = None  # the job's reason, where it re-opened the series


INSTANCES = Base.metadata.tables[Instance.__tablename__]
SERIES = Base.metadata.tables[Series.__tablename__]
JOBS = Base.metadata.tables[Job.__tablename__]
STUDIES = Base.metadata.tables[Study.__tablename__]

# Built once: the per-instance path runs them hundreds of times a second.
_FIND_INSTANCE = select(INSTANCES.c.id).where(INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid"))
_FIND_SERIES_AND_JOB = (
    select(SERIES.c.id, SERIES.c.study_id, JOBS.c.id, JOBS.c.state)
    .select_from(SERIES.outerjoin(JOBS, JOBS.c.series_id == SERIES.c.id))
    .where(SERIES.c.series_instance_uid == bindparam("series_instance_uid"))
)
_LOCK_STUDY = select(STUDIES.c.id).where(STUDIES.c.id == bindparam("study_id")).with_for_update()
"""The study row before the job row, in every transaction that takes both (here and in retention): PostgreSQL
never finds a receiver and a purge each holding the row the other waits for."""
_INSERT_INSTANCE = insert(INSTANCES)
_TOUCH_RECEIVING_JOB = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("job_id"), JOBS.c.state == JobState.RECEIVING)
    .values(version=JOBS.c.version + 1)
)
"""A new instance changes its RECEIVING job's version: a watcher that read the series as quiet before this
transaction committed (PostgreSQL runs them side by side) fails its versioned write and decides again."""
_FIND_INSTANCE_PATHS = (
    select(INSTANCES.c.sop_instance_uid, INSTANCES.c.path)
    .where(INSTANCES.c.sop_instance_uid.in_(bindparam("sop_instance_uids", expanding=True)))
    # PostgreSQL: a row that retention is deleting (not committed yet) is waited for, then seen gone, so a copy
    # written again meanwhile is recorded, not taken for a duplicate of a row about to vanish. SQLite: no clause
    # (its writers take turns).
    .with_for_update()
)
LOOKUP_CHUNK = 500
"""SOP Instance UIDs looked up in one query (well below SQLite's and PostgreSQL's limits on parameters)."""
_COUNT_INSTANCES = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("series_id"))
    .values(
        instance_count=SERIES.c.instance_count + bindparam("added"),
        last_received_at=bindparam("received_at"),
        expected_instances=func.coalesce(bindparam("expected_instances"), SERIES.c.expected_instances),
        purged_at=None,  # a purged series sent again is held (and answered by Q/R) again
    )
)


class QuickLookup:
    """One value read by one key, asked on the acknowledgement path of every new instance.

    One indexed query on a pooled connection, without a transaction of SQLAlchemy's (SQLite: a WAL reader that
    never waits for the writer): 0.04 ms where a session or :func:`db.session.read_outside_transaction`, which
    switches the connection's isolation level twice, took 1.5-3 ms (measured 2026-12-02 on 2 cores).
    """

    def __init__(self, engine: Engine, statement: Select[Any]) -> None:
        """``statement`` selects one column, with one bound parameter named ``key``."""
        self._sql = str(statement.compile(dialect=engine.dialect))
        self._positional = engine.dialect.positional
        self._engine = engine
        self.errors: tuple[type[BaseException], ...] = (engine.dialect.loaded_dbapi.Error, SQLAlchemyError)
        """What a lookup raises while the database cannot be read."""

    def __call__(self, key: str) -> str | None:
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._sql, (key,) if self._positional else {"key": key})
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool, which ends any transaction the driver began
        return str(row[0]) if row else None


def recorded_path_lookup(engine: Engine) -> QuickLookup:
    """Where an instance is recorded, by SOP Instance UID."""
    return QuickLookup(engine, select(INSTANCES.c.path).where(INSTANCES.c.sop_instance_uid == bindparam("key")))


def series_study_lookup(engine: Engine) -> QuickLookup:
    """The StudyInstanceUID of the study a series holding instances is filed under, by SeriesInstanceUID (a
    series purged by retention holds none: sent again, it may come under a corrected study)."""
    statement = (
        select(STUDIES.c.study_instance_uid)
        .select_from(SERIES.join(STUDIES, SERIES.c.study_id == STUDIES.c.id))
        .where(SERIES.c.series_instance_uid == bindparam("key"), SERIES.c.instance_count > literal_column("0"))
    )
    return QuickLookup(engine, statement)


def result_series_lookup(engine: Engine) -> QuickLookup:
    """The id of the job whose result a series is, by SeriesInstanceUID; None for a series the node received."""
    statement = select(SERIES.c.source_job_id).where(
        SERIES.c.series_instance_uid == bindparam("key"), SERIES.c.source_job_id.is_not(None)
    )
    return QuickLookup(engine, statement)


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    found = session.connection().execute(_FIND_INSTANCE, {"sop_instance_uid": sop_instance_uid})
    return found.first() is not None


def recorded_paths(session: Session, sop_instance_uids: Iterable[str]) -> dict[str, str]:
    """Where each of these SOP Instance UIDs is stored, for those that are recorded (one query per 500)."""
    uids = list(dict.fromkeys(sop_instance_uids))
    connection = session.connection()
    found: dict[str, str] = {}
    for start in range(0, len(uids), LOOKUP_CHUNK):
        rows = connection.execute(_FIND_INSTANCE_PATHS, {"sop_instance_uids": uids[start : start + LOOKUP_CHUNK]})
        found.update((uid, path) for uid, path in rows)
    return found


def record_instance(session: Session, record: InstanceRecord, *, counted_at: datetime | None = None) -> RecordOutcome:
    """Record a stored instance; a duplicate SOP Instance UID is recorded once.

    Creates the study, series and RECEIVING job on first sight, counts the
    instance in its series, and re-opens a series that had already completed.

    ``last_received_at`` (when the series' quiet period starts) is the instance's
    ``received_at``, unless ``counted_at`` is given: the receiver records off the
    acknowledgement path and passes it, so the quiet period starts only once its
    last acknowledged instance is recorded, however late that is (see
    :func:`record_new_instances`).
    """
    session.flush()  # the Core statements below must see pending ORM changes
    if instance_exists(session, record.sop_instance_uid):
        return RecordOutcome(stored=False)
    return record_new_instances(session, [record], counted_at=counted_at)[0]


def record_new_instances(
    session: Session, records: Sequence[InstanceRecord], *, counted_at: datetime | None = None
) -> list[RecordOutcome]:
    """Record instances whose SOP Instance UIDs are neither recorded nor repeated among ``records``.

    What :func:`record_instance` does for one, in a few statements per series rather
    than per instance (the receiver records its instances in batches): one lookup of
    the series and its job, one multi-row insert, one update of the series' count.
    Returns an outcome per record, in order; ``series_created`` and ``series_reopened``
    are set on the first instance of such a series.

    ``counted_at`` (the receiver's): each series' ``last_received_at`` is the time its
    instances are written, read after every other write of this call, not earlier than
    ``counted_at``. A transaction that waited for another process' lock (SQLite's write
    lock, a PostgreSQL row lock) thus starts the quiet period when it holds them, not
    when it began waiting. Without it, the records' own ``received_at``.
    """
    session.flush()  # the Core statements below must see pending ORM changes
    connection = session.connection()
    by_series: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_series.setdefault(record.series.series_instance_uid, []).append(index)
    outcomes = [RecordOutcome(stored=True)] * len(records)
    # Study and job rows are locked in one order in every transaction (by study, then series; a series' study
    # before its job), so two receivers recording the same studies' series at once (PostgreSQL), or a receiver
    # and a purge, wait for each other, never in a circle.
    in_lock_order = sorted(by_series.items(), key=lambda item: (records[item[1][0]].study.study_instance_uid, item[0]))
    counts: list[dict[str, Any]] = []
    for series_uid, indices in in_lock_order:
        first, last = records[indices[0]], records[indices[-1]]
        known = connection.execute(_FIND_SERIES_AND_JOB, {"series_instance_uid": series_uid}).first()
        if known is None:
            series_id = _create_series(session, first, counted_at)
            outcomes[indices[0]] = RecordOutcome(stored=True, series_created=True)
        else:
            series_id, study_id, job_id, state = known
            connection.execute(_LOCK_STUDY, {"study_id": study_id})
            receiving = state is None or JobState(state) is JobState.RECEIVING
            if receiving and job_id is not None and not _still_receiving(session, job_id):
                receiving = False  # another transaction completed the series since it was read
            if not receiving:
                job = session.get_one(Job, job_id, populate_existing=True)
                series = session.get_one(Series, series_id, populate_existing=True)
                purged = series.purged_at is not None and not series.instance_count
                jobs.reopen(session, job, _sent_again(series) if purged else "late instance")
                if purged:  # sent again: its first instance names the study's patient as a new series' does
                    _take_attributes_of(session, series, first)
                    restore_study_identity(_locked_study(session, series.study_id), first)
                # A late instance of a series still held changes nothing on its study: admission may yet refuse
                # the series for it (another issuer, another name), and the study must not name that patient.
                outcomes[indices[0]] = RecordOutcome(stored=True, series_reopened=True, reopened_because=job.reason)
        connection.execute(
            _INSERT_INSTANCE, [{"series_id": series_id, **_instance_values(records[i])} for i in indices]
        )
        expected = [records[i].series.expected_instances for i in indices]
        counts.append(
            {
                "series_id": series_id,
                "added": len(indices),
                "received_at": last.received_at,
                "expected_instances": next((n for n in reversed(expected) if n is not None), None),
            }
        )
    if counts:
        if counted_at is not None:
            # Read now, once this transaction holds the locks it waited for: not before (see the docstring).
            recorded_at = max(counted_at, utcnow())
            for count in counts:
                count["received_at"] = recorded_at
        connection.execute(_COUNT_INSTANCES, counts)
    return outcomes


def _still_receiving(session: Session, job_id: int) -> bool:
    """Change the RECEIVING job's version (see :data:`_TOUCH_RECEIVING_JOB`); False when it is RECEIVING no more.

    On PostgreSQL the update waits for a transaction that is completing the job, then finds its new state.
    """
    touched = session.connection().execute(_TOUCH_RECEIVING_JOB, {"job_id": job_id}).rowcount == 1
    loaded = session.identity_map.get(identity_key(Job, job_id))
    if loaded is not None:
        session.expire(loaded)  # its version changed underneath the session
    return touched


def _sent_again(series: Series) -> str:
    """Why a series whose images retention purged is received again, as the start of a reason."""
    held = f" ({series.images_before_purge} images before)" if series.images_before_purge else ""
    return f"an image of a series whose images retention had purged{held}"


def _take_attributes_of(session: Session, series: Series, record: InstanceRecord) -> None:
    """A purged series sent again is routed as it is sent now: its sender and series attributes are the new
    instance's, not those of its first reception (a correction may come from another sender, or changed), and
    it is filed under the study the new instance names (a PACS correction may have moved it)."""
    for name, value in record.series.__dict__.items():
        if name != "series_instance_uid":
            setattr(series, name, value)
    series.calling_ae_title = record.calling_ae_title
    series.accession_number = record.study.accession_number
    series.first_received_at = record.received_at
    if series.study.study_instance_uid != record.study.study_instance_uid:
        series.study = _study_of(session, record)
        session.flush()


def studies_of_job(session: Session, job_id: int) -> set[int]:
    """The ids of the studies a job's rows reach: its series' and those of its results not purged."""
    own = select(Series.study_id).join(Job, Job.series_id == Series.id).where(Job.id == job_id)
    results = select(Series.study_id).where(Series.source_job_id == job_id, Series.purged_at.is_(None))
    return set(session.scalars(own.union(results)))


def lock_studies_of_job(session: Session, job_id: int) -> set[int]:
    """Lock (PostgreSQL) the rows of :func:`studies_of_job`, in id order, before the job's own row; their ids.

    Receivers lock a series' study row before its job row; a purge or a worker finishing the job takes them in
    that order too, so none of them ever holds the row another waits for (a deadlock PostgreSQL must break).
    """
    studies = studies_of_job(session, job_id)
    session.execute(select(Study.id).where(Study.id.in_(sorted(studies))).order_by(Study.id).with_for_update())
    return studies


def _locked_study(session: Session, study_id: int) -> Study:
    """The study row, locked until the transaction ends (PostgreSQL): retention cannot erase its patient's
    identity while an instance of it is being recorded (SQLite's writers take turns anyway)."""
    query = select(Study).where(Study.id == study_id).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


def _instance_values(record: InstanceRecord) -> dict[str, object]:
    return {
        "sop_instance_uid": record.sop_instance_uid,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "instance_number": record.instance_number,
        "image_type": record.image_type,
        "slice_thickness": record.slice_thickness,
        "number_of_frames": record.number_of_frames,
        "path": record.path,
        "size_bytes": record.size_bytes,
        "calling_ae_title": record.calling_ae_title,
        "received_at": record.received_at,
        **instance_patient_values(record.study),
    }


def instance_patient_values(study: StudyAttributes) -> dict[str, object]:
    """An instance row's own patient columns, from its header's study attributes: whose image this is, whatever its
    study row says. PatientID "" for none (NULL is a row from before revision 0011)."""
    return {
        "patient_id": study.patient_id or "",
        "issuer_of_patient_id": study.issuer_of_patient_id,
        "issuer_universal_entity_id": study.issuer_universal_entity_id,
        "patient_name": study.patient_name,
        "patient_name_key": name_key(study.patient_name),
        "patient_birth_date": study.patient_birth_date,
        "patient_sex": study.patient_sex,
        "patient_undecodable": study.patient_undecodable,
    }


def _create_series(session: Session, record: InstanceRecord, counted_at: datetime | None = None) -> int:
    """First instance of a series: create study (if new), series and its RECEIVING job."""
    series = Series(
        **record.series.__dict__,
        study=_study_of(session, record),
        calling_ae_title=record.calling_ae_title,
        accession_number=record.study.accession_number,  # the order this series was acquired for
        instance_count=0,
        first_received_at=record.received_at,
        last_received_at=counted_at or record.received_at,
    )
    session.add(series)
    jobs.open_job(session, series)
    session.flush()
    return series.id


def record_rejection(
    session: Session,
    *,
    status: int,
    reason: str,
    path: str | None,
    sop_instance_uid: str | None,
    sop_class_uid: str | None,
    transfer_syntax_uid: str | None,
    calling_ae_title: str | None,
    series_instance_uid: str | None = None,
    received_at: datetime | None = None,
) -> None:
    """Record an instance refused or set aside (its bytes are in quarantine at ``path``).

    ``series_instance_uid``: the series its header names, where that could be read.
    ``received_at``: when it arrived, where that was earlier than now (quarantine retention counts from it).
    """
    session.add(
        RejectedInstance(
            sop_instance_uid=sop_instance_uid or None,
            sop_class_uid=sop_class_uid or None,
            series_instance_uid=series_instance_uid or None,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae_title=calling_ae_title,
            status=status,
            reason=reason,
            path=path,
            received_at=received_at or utcnow(),
        )
    )


@dataclass(frozen=True)
class MissingInstances:
    """Instances sent for a series that it does not hold: refused on receipt, or set aside after it."""

    count: int
    first_sop_instance_uid: str | None
    first_reason: str


def instances_refused_for_series(session: Session, series: Series) -> MissingInstances | None:
    """What was refused or set aside for ``series`` and is not in it since (None when nothing is missing).

    A refused SOP Instance UID that the series holds now (sent again and stored) no longer counts;
    one refused several times counts once.
    """
    stored = select(Instance.sop_instance_uid).where(Instance.series_id == series.id)
    missing = (
        RejectedInstance.series_instance_uid == series.series_instance_uid,
        or_(RejectedInstance.sop_instance_uid.is_(None), RejectedInstance.sop_instance_uid.not_in(stored)),
    )
    first = session.scalars(
        select(RejectedInstance).where(*missing).order_by(RejectedInstance.received_at, RejectedInstance.id).limit(1)
    ).first()
    if first is None:
        return None
    named = session.scalar(select(func.count(func.distinct(RejectedInstance.sop_instance_uid))).where(*missing)) or 0
    unnamed = (
        session.scalar(
            select(func.count())
            .select_from(RejectedInstance)
            .where(*missing, RejectedInstance.sop_instance_uid.is_(None))
        )
        or 0
    )
    return MissingInstances(named + unnamed, first.sop_instance_uid, first.reason)


def unattributed_refusals_near_series(session: Session, series: Series, margin: timedelta) -> MissingInstances | None:
    """Images refused before the series they belong to could be read (cut short, a header that cannot be decoded or
    walked, no valid SeriesInstanceUID), sent by the sender of ``series`` while it was received (from ``margin``
    before its first image, or before it was last re-opened, to ``margin`` after its last), whose SOP Instance UID no
    series holds now: any of them may belong to ``series`` (None when there is none)."""
    sender = (
        RejectedInstance.calling_ae_title.is_(None)
        if series.calling_ae_title is None
        else RejectedInstance.calling_ae_title == series.calling_ae_title
    )
    stored_since = select(Instance.id).where(Instance.sop_instance_uid == RejectedInstance.sop_instance_uid)
    reopened = session.scalar(  # a series sent again (a late image, after a purge) is received anew since then
        select(func.max(JobEvent.at))
        .join(Job, Job.id == JobEvent.job_id)
        .where(Job.series_id == series.id, JobEvent.to_state == JobState.RECEIVING, JobEvent.from_state.is_not(None))
    )
    since = max(series.first_received_at, reopened) if reopened is not None else series.first_received_at
    near = (
        RejectedInstance.series_instance_uid.is_(None),
        sender,
        RejectedInstance.received_at >= since - margin,
        RejectedInstance.received_at <= series.last_received_at + margin,
        or_(RejectedInstance.sop_instance_uid.is_(None), ~stored_since.exists()),
    )
    refused = session.scalars(
        select(RejectedInstance).where(*near).order_by(RejectedInstance.received_at, RejectedInstance.id).limit(1000)
    ).all()
    if not refused:
        return None
    count = len({r.sop_instance_uid for r in refused if r.sop_instance_uid}) + sum(
        1 for r in refused if not r.sop_instance_uid
    )
    return MissingInstances(count, refused[0].sop_instance_uid, refused[0].reason)


def record_results(session: Session, job_id: int, records: list[InstanceRecord]) -> None:
    """Index the node's own result files (SEG, SR, RTSTRUCT) of job ``job_id`` for query/retrieve.

    Result series get ``source_job_id`` and no job of their own. A re-run supersedes
    the job's earlier results: their series rows stay (listed by `dicom-node show`) with
    ``superseded_at`` set, no longer answered or sent by Query/Retrieve; their files were
    written in an earlier run's folder and are kept.
    """
    session.execute(
        update(Series)
        .where(Series.source_job_id == job_id, Series.superseded_at.is_(None))
        .values(superseded_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    series_by_uid: dict[str, Series] = {}
    for record in records:
        series = series_by_uid.get(record.series.series_instance_uid)
        if series is None:
            series = _result_series(session, job_id, record)
            series_by_uid[record.series.series_instance_uid] = series
        session.add(Instance(series=series, **_instance_values(record)))
        series.instance_count += 1


def _study_of(session: Session, record: InstanceRecord) -> Study:
    """The record's study, created on first sight (it names a patient once an instance naming one, the first
    of its series, gives it that instance's whole identity; see :func:`restore_study_identity`)."""
    query = select(Study).where(Study.study_instance_uid == record.study.study_instance_uid).with_for_update()
    study = session.scalars(query.execution_options(populate_existing=True)).first()
    if study is None:
        study = Study(study_instance_uid=record.study.study_instance_uid)
        session.add(study)
    restore_study_identity(study, record)
    return study


PATIENT_DETAIL_COLUMNS = (
    "issuer_of_patient_id",
    "issuer_universal_entity_id",
    "patient_birth_date",
    "patient_sex",
)
"""What a series must share with its study's patient besides PatientID and the name (:mod:`db.names`), where both
carry it."""
TAKEN_WITH = {"issuer_universal_entity_id": ("issuer_universal_entity_id_type",)}
"""Columns a study row takes together with a detail, from the same instance (an issuer's UniversalEntityID and
its type)."""
STUDY_ROW_IDENTITY_COLUMNS = tuple(dict.fromkeys((*STUDY_IDENTITY_COLUMNS, "study_date", "study_time")))
"""What a study row takes from one instance, all together: its patient and study identity, and its StudyDate and
StudyTime (which retention erases with them: a study restored from a corrected series answers that one's date)."""


def restore_study_identity(study: Study, record: InstanceRecord) -> None:
    """Give the study row the patient of ``record``, the first instance of a new series (or of a purged one sent
    again) of the study.

    A row without a PatientID (a new study; one whose earlier series came without a PatientID, which admission
    refuses; or one retention erased when it purged every series) takes the instance's whole identity and study
    date and time at once, every column replaced: it never keeps a name, birth date or sex from an instance
    without a PatientID beside another instance's PatientID. An instance without a PatientID gives it nothing.

    A row of the same patient that lacks an issuer, birth date or sex (its first series left them empty), or a
    component group of the name (``Yamada^Tarou`` without ``=山田^太郎``), takes those the instance carries: a
    value only one side has is no conflict, so without this a later series could name ``Yamada^Tarou=山田^太郎``
    and another ``Yamada^Tarou=田中^次郎`` under the same study and both be processed. The first series carrying a
    value or group gives it, whichever order they arrive in. An instance naming another patient (another
    PatientID, or another issuer, name, birth date or sex where both carry one; names by
    :func:`db.names.other_person`) gives nothing: admission refuses its series."""
    if not _text(record.study.patient_id):
        return
    if not _text(study.patient_id):
        for column in STUDY_ROW_IDENTITY_COLUMNS:
            setattr(study, column, getattr(record.study, column, None))
        study.patient_name_key = name_key(study.patient_name)
        return
    if not _same_patient(study, record.study):
        return
    for column in PATIENT_DETAIL_COLUMNS:
        if not _text(getattr(study, column)) and _text(getattr(record.study, column)):
            for taken in (column, *TAKEN_WITH.get(column, ())):
                setattr(study, taken, getattr(record.study, taken))
    name = completed_name(study.patient_name, record.study.patient_name)
    if name != study.patient_name or study.patient_name_key != name_key(name):
        study.patient_name, study.patient_name_key = name, name_key(name)


def _text(value: str | None) -> str:
    return (value or "").strip()


def _same_patient(study: Study, received: StudyAttributes) -> bool:
    """Whether ``received`` names the study row's patient: the same PatientID, and no issuer, birth date or sex
    that both carry and that differ, and a name of the same person (:func:`db.names.other_person`)."""
    if _text(study.patient_id) != _text(received.patient_id):
        return False
    if other_person(study.patient_name, received.patient_name):
        return False
    for column in PATIENT_DETAIL_COLUMNS:
        held, given = _text(getattr(study, column)), _text(getattr(received, column))
        if held and given and held != given:
            return False
    return True


def _result_series(session: Session, job_id: int, record: InstanceRecord) -> Series:
    series = Series(
        **record.series.__dict__,
        study=_study_of(session, record),
        accession_number=record.study.accession_number,
        source_job_id=job_id,
        instance_count=0,
        first_received_at=record.received_at,
        last_received_at=record.received_at,
    )
    session.add(series)
    return series
