"""The node's record of every study, series, instance and job (SQLAlchemy 2.0 typed models)."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.results import DeliveriesType, DeliveryRecord, ResultFile, ResultFilesType


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """``moment`` with its time zone: SQLite hands back naive datetimes, which the node stores as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class JobState(str, enum.Enum):
    """Where a series stands. Transitions are the functions in :mod:`db.jobs`."""

    RECEIVING = "RECEIVING"  # instances are arriving; quiet timer running
    COMPLETE = "COMPLETE"  # no new instance for the quiet period; routing next
    QUEUED = "QUEUED"  # a rule chose a model; waiting for a worker
    PROCESSING = "PROCESSING"  # a worker is running the model
    SENDING = "SENDING"  # results are being sent to destinations
    DONE = "DONE"  # results delivered
    FAILED = "FAILED"  # stopped with a reason; `dicom-node retry` restarts it
    IGNORED = "IGNORED"  # not for processing (no rule, not CT, localizer, own output, ...)


STUDY_IDENTITY_COLUMNS = (
    "patient_id",
    "issuer_of_patient_id",
    "issuer_universal_entity_id",
    "issuer_universal_entity_id_type",
    "patient_name",
    "patient_name_key",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_description",
    "referring_physician_name",
    "study_id",
    "study_date",
    "study_time",
)
"""The patient and study identity on a study row: erased by retention once every series of the study is purged."""


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    # Whose PatientIDs these are: the same PatientID from another issuer is another patient.
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    # The issuer as IssuerOfPatientIDQualifiersSequence names it (UniversalEntityID, an OID or URI, and its type):
    # the same PatientID under another UniversalEntityID is another patient, as under another IssuerOfPatientID.
    issuer_universal_entity_id: Mapped[str | None] = mapped_column(String(64))
    issuer_universal_entity_id_type: Mapped[str | None] = mapped_column(String(16))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    # The name as names compare (db.names.name_key): Query/Retrieve tells an image's patient from its study's by it.
    patient_name_key: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    # The order (AccessionNumber) the series was acquired for: a study may carry several, one per series, and a
    # query by any of them finds the study. NULL on series recorded before revision 0013, or sent without one.
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # Set on the node's own result series (SEG, SR, RTSTRUCT): the job that made them.
    # A plain column, not a foreign key: jobs already point at series, and a cycle
    # would complicate creating and dropping the tables.
    source_job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    purged_at: Mapped[datetime | None]  # retention removed its instances; the row stays as history
    # How many instances it held when retention last purged it: a series sent again with fewer is partial.
    images_before_purge: Mapped[int | None] = mapped_column(Integer)
    # Set on a result series (SEG, SR, RTSTRUCT) when a newer run of its job replaced it;
    # it stays retrievable until retention removes it.
    superseded_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    job: Mapped[Job | None] = relationship(back_populates="series", uselist=False)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_type: Mapped[str | None] = mapped_column(String(128))
    slice_thickness: Mapped[float | None]
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int]
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The instance's own patient, as its header gave it ("" for no PatientID): Query/Retrieve serves an instance
    # only under its study's patient, never another patient's image filed under the same study or series UIDs.
    # NULL on rows recorded before revision 0011 (taken to be the study's patient).
    patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    # The rest of the instance's patient (revision 0013; NULL before it, or where its header had none): an image
    # naming another name, birth date, sex or issuer than its study's is never served under that study either.
    issuer_universal_entity_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_name_key: Mapped[str | None] = mapped_column(Text)  # db.names.name_key (revision 0016)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    # A patient value of its header did not decode in its character set (revision 0019): recorded as unknown, and
    # never served, whatever its study's patient (a name that does not decode cannot be compared with it).
    patient_undecodable: Mapped[bool] = mapped_column(default=False, server_default=false())

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """The processing job of a series: one per series, its state is the series' state."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, validate_strings=True), index=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    rule_name: Mapped[str | None] = mapped_column(String(128))
    model_name: Mapped[str | None] = mapped_column(String(128))
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # the worker's id, "host:pid" (the lease's owner)
    # Until when the claiming worker's lease holds; it renews it while it works. Past it, any
    # worker on any host queues the job again (a worker death). None when no worker holds the job.
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    result_path: Mapped[str | None] = mapped_column(Text)  # the job's output folder
    result_files: Mapped[list[ResultFile] | None] = mapped_column(ResultFilesType)  # DICOM results to send, in order
    deliveries: Mapped[dict[str, DeliveryRecord] | None] = mapped_column(
        DeliveriesType
    )  # destination -> plan, attempts
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # What the result does not cover or should be read with (partial series, dropped images, test
    # weights): shown by `status`/`show` and written into the results' descriptions and SR.
    warnings: Mapped[list[str] | None] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(32))  # the stage a PROCESSING worker is in
    worker_deaths: Mapped[int] = mapped_column(default=0)  # workers that died holding this job
    # A transient failure (database busy, disk full, destination down) waits until this time;
    # nothing claims or sends the job before it.
    not_before: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # the metrics' recent jobs

    # Bumped by every change of the row (the ORM's and a claim's): a change made from a read that another
    # process has since overtaken fails (StaleDataError) and is decided again, never written over the newer state.
    version: Mapped[int] = mapped_column(default=1, server_default="1")

    series: Mapped[Series] = relationship(back_populates="job")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy reads it once, at mapping


class JobEvent(Base):
    """One state transition of a job: the audit trail behind `dicom-node show`."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    from_state: Mapped[JobState | None] = mapped_column(Enum(JobState, native_enum=False, length=16))
    to_state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")


class Delivery(Base):
    """One result file accepted by one destination: written right after its C-STORE response.

    After any crash only the files without a row are sent again, so at most the one
    file in flight can reach a destination twice (with the same SOP Instance UID).
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int]  # the peer's C-STORE response status (success or a storage warning)
    delivered_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """One audited action (IHE ATNA in spirit): who, from where, did what, to which study, with what outcome.

    No patient data beyond UIDs: names, IDs and birth dates are never written here.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(16))  # association, store, find, move, get, send, echo
    peer_ae_title: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # success, refused, failed, partial, released, aborted
    instances: Mapped[int] = mapped_column(default=0)
    detail: Mapped[str | None] = mapped_column(Text)


class RejectedInstance(Base):
    """An instance refused with a failure status, or set aside after its success status; its bytes are in quarantine.

    ``series_instance_uid`` is the series the instance said it belonged to, where its header told;
    completion counts the ones a series lacks (a partial series).
    """

    __tablename__ = "rejected_instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[int]
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditTotal(Base):
    """What ``audit_events`` holds, summed per action and outcome (and per peer for ``send``): what /metrics reads.

    Kept by database triggers (revision 0015) as records are written and deleted, by any process of any version, so
    a scrape reads a few rows however long the audit trail is. A migration that rebuilds ``audit_events`` on SQLite
    (``batch_alter_table`` copying the table) drops the triggers: it must create them again.
    """

    __tablename__ = "audit_totals"

    action: Mapped[str] = mapped_column(String(16), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The peer of a ``send`` record ("" for every other action: a caller's address changes with each association).
    peer_address: Mapped[str] = mapped_column(String(64), primary_key=True)
    peer_ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    records: Mapped[int] = mapped_column(BigInteger)
    instances: Mapped[int] = mapped_column(BigInteger)
    # C-ECHO-only associations a record counts besides itself (``N more C-ECHO-only associations of this peer ...``).
    left_out: Mapped[int] = mapped_column(BigInteger)


class InstanceTotal(Base):
    """How many ``instances`` rows there are and their bytes: one row, kept by database triggers (revision 0015) as
    instances are recorded, purged or their file replaced, so a scrape never reads the instances table."""

    __tablename__ = "instance_totals"

    id: Mapped[int] = mapped_column(primary_key=True)
    instances: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)


class InterruptedTransfer(Base):
    """A series some of whose images came on an association that ended in an abort, not a release: its sender may
    not have sent the rest. Written when such an association ends, for each series it stored images of; deleted
    when an association that stored images of the series is released (the sender sent it again), and when the
    series completes. Completion waits ``completion.expected_count_timeout_seconds`` for such a series, not the
    quiet period, and marks it partial if nothing more came."""

    __tablename__ = "interrupted_transfers"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text)  # why the association ended so, as the log says it


class ClockDoubt(Base):
    """Retention doubts the wall clock (it read far ahead of what the node had recorded): at most one row (id 1).

    Written when ``serve`` first finds its clock far ahead, kept while it stays so, and deleted once the clock agrees
    again or the operator confirms it (``dicom-node purge``). While it exists, a restarted ``serve`` judges its clock
    against ``trusted_at`` and ``counted_seconds``, never against what was recorded during the doubt at that clock.
    """

    __tablename__ = "clock_doubts"

    id: Mapped[int] = mapped_column(primary_key=True)  # always 1: one doubt at a time
    # The newest time the node trusted when the doubt began: its last record before, or where its last retention
    # pass that deleted by age put the clock.
    trusted_at: Mapped[datetime]
    # How long ``serve`` has run in doubt since ``trusted_at``, on its steady clock, over every run (a crash loses at
    # most one retention interval of it: the doubt then lasts longer, never shorter).
    counted_seconds: Mapped[int] = mapped_column(BigInteger)
    doubted_at: Mapped[datetime]  # what the doubted clock read when the doubt began


Index("ix_jobs_state_changed", Job.state, Job.state_changed_at)
