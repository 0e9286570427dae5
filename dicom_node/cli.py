"""The `dicom-node` command line (typer)."""

from __future__ import annotations

import errno
import getpass
import json
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from db import jobs
from db.models import AuditEvent, Instance, Job, JobState, RejectedInstance, Series, Study
from dicom_node.config import (
    AE_TITLE_PATTERN,
    ConfigError,
    RetentionSettings,
    Settings,
    dump_settings,
    hide_url_password,
    host_problem,
    load_settings,
)
from dicom_node.logs import configure_logging, shown
from dicom_node.privacy import keep_new_files_private, loose_permissions

if TYPE_CHECKING:
    from dicom_node.audit import Outcome
    from dicom_node.retention import PurgeOutcome, RetentionPlan

app = typer.Typer(
    help="CT auto-segmentation DICOM node.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
config_app = typer.Typer(help="Show or check the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
weights_app = typer.Typer(help="TotalSegmentator model weights: list, download, import.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
user_app = typer.Typer(help="Operations console users.", no_args_is_help=True)
app.add_typer(user_app, name="user")

# Piped output (logs, scripts, tests) gets wide lines instead of rich's default 80 columns. No emoji codes: a
# SeriesDescription or AE title ":warning:" is shown as sent, not as a symbol beside a state.
console = Console(width=None if sys.stdout.isatty() else 240, emoji=False)
errors = Console(stderr=True, soft_wrap=True, emoji=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration (default: $DICOM_NODE_CONFIG or ./config.yaml)."),
]


@app.callback()
def _private_files() -> None:
    """CT auto-segmentation DICOM node."""
    keep_new_files_private()  # patient data at rest: 0600 files, 0700 folders, for every command


def _settings(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        errors.print(f"[bold red]configuration error[/]\n{escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _peer(value: object, limit: int = 1000) -> str:
    """A value a peer sent (or one made from it), for the terminal: as it is when it is printable and short, else
    quoted with its unprintable characters as ``?`` (:func:`dicom_node.logs.shown`); never read as rich markup."""
    if value is None:
        return ""
    text = str(value)
    if len(text) > limit or not text.isprintable():
        text = shown(text, limit)
    return escape(text)


def _database_failed(exc: BaseException, url: str, *, exit_code: int = 1) -> NoReturn:
    """Say in one sentence why the database cannot be used (never its password), and exit."""
    from dicom_node.service import describe_database_error

    errors.print(escape(describe_database_error(exc, url)), highlight=False)
    raise typer.Exit(exit_code) from None


def _database_url_problem(url: str) -> BaseException | None:
    """Why ``url`` cannot be a database URL here (not a URL, unknown kind, driver missing), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError
        return exc
    return None


@contextmanager
def _session(settings: Settings, *, write: bool = False) -> Iterator[Session]:
    """A session on the node's existing database; operator commands never create or migrate one.

    Any failure to reach or read the database ends the command with one sentence saying why.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from db.session import make_engine, make_session_factory

    url = settings.database_url
    problem = _database_url_problem(url)
    if problem is not None:  # a configuration error: exit 2, as `config check` and `serve` do
        _database_failed(problem, url, exit_code=2)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        errors.print(
            f"no database at {escape(str(parsed.database))}: has `dicom-node serve` run with this configuration?",
            highlight=False,
        )
        raise typer.Exit(1)
    try:
        sessions = make_session_factory(make_engine(url))
        with sessions() as session:
            if write:
                with session.begin():
                    yield session
            else:
                yield session
    except DBAPIError as exc:
        _database_failed(exc, url)


def _describe_os_error(
    exc: OSError, *, host: str | None = None, port: int | None = None, host_key: str | None = None
) -> str:
    """An operating-system error as a sentence naming the file, or the host and port (``port``: the one being bound;
    ``host_key``: the setting that gives ``host``, named with it)."""
    code = exc.errno
    named = f"{host_key} {host!r}" if host_key else f"{host}"
    if isinstance(exc, socket.gaierror) and host is not None:
        return f"{named} cannot be resolved to an address (misspelt, or no name service on this machine?)"
    if code == errno.EADDRINUSE:
        return f"port {port} is already in use by another program" if port else "the port is already in use"
    if code == errno.EADDRNOTAVAIL:
        return f"{named} is not an address of this machine" if host else "that address is not one of this machine"
    if isinstance(exc, ssl.SSLError):
        return "a TLS certificate or private key cannot be used (not PEM, encrypted, or of another certificate)"
    path = exc.filename if isinstance(exc.filename, str) else None
    if path is None and isinstance(exc.filename, bytes):
        path = exc.filename.decode(errors="replace")
    if path is None:
        if code in (errno.EACCES, errno.EPERM) and port is not None and port < 1024:
            return f"the node's user may not listen on port {port} (ports below 1024 need administrator rights)"
        if code == errno.EROFS:
            return "a file it needs is on a read-only file system"
        if code == errno.ENOSPC:
            return "there is no space left on the disk"
        if exc.strerror:
            return exc.strerror[:1].lower() + exc.strerror[1:]
        return str(exc) or "the operating system refused"
    if code == errno.EROFS:
        return f"{path} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"the node's user may not use {path} (permission denied)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"there is no space left on the disk holding {path}"
    if code == errno.ENOENT:
        return f"{path} does not exist"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((p for p in (Path(path), *Path(path).parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking} is a file, where a folder is needed"
        return f"{path} cannot be made: part of that path is not a folder"
    if code == errno.EISDIR:
        return f"{path} is a folder, where a file is needed"
    if code == errno.EIO:
        return f"the disk holding {path} reported an input/output error"
    reason = exc.strerror or "the operating system refused"
    return f"{path}: {reason[:1].lower() + reason[1:]}"


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: Storage SCP and series watcher, until SIGTERM/SIGINT.

    Exit 2 when it cannot start as configured and starting it again would not change that (the configuration, its
    files or the installed version must change first), so a supervisor does not restart it in a loop; exit 1 when it
    cannot start now but may later (the database or a port busy or unreachable), or when it stopped on losing its
    lock on the database.
    """
    from sqlalchemy.exc import OperationalError

    from dicom_node.receive.processes import ReceiverNotStarted
    from dicom_node.service import (
        ConsoleNotStarted,
        DatabaseUnavailable,
        NodeLockLost,
        RefusedAsConfigured,
        StorageNotFound,
        describe_database_error,
    )
    from dicom_node.service import serve as run_service

    settings = _settings(config)
    configure_logging(settings.logging.level, settings.logging.format)
    storage = settings.storage.directory
    if storage.exists() and not storage.is_dir():
        _cannot_start(f"storage.directory {storage} is a file, not a folder", exit_code=2)
    tls_problem = _tls_files_problem(settings)
    if tls_problem:
        reason, exit_code = tls_problem
        _cannot_start(reason, exit_code=exit_code)
    url_problem = _database_url_problem(settings.database_url)  # not a URL, an unknown kind, its driver missing
    if url_problem is not None:
        _cannot_start(describe_database_error(url_problem, settings.database_url), exit_code=2)
    try:
        _warn_about_loose_permissions(storage)
        run_service(settings)
    except RefusedAsConfigured as exc:
        _cannot_start(str(exc), exit_code=2)
    except (DatabaseUnavailable, ReceiverNotStarted, ConsoleNotStarted, StorageNotFound) as exc:
        _cannot_start(str(exc))
    except NodeLockLost as exc:
        errors.print(f"[bold red]stopped[/]: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as exc:
        network = settings.network
        reason = _describe_os_error(exc, host=network.host, port=network.port, host_key="network.host")
        _cannot_start(reason, exit_code=2 if _needs_privilege(exc, network.port) else 1)
    except OperationalError as exc:  # a start-up write the database refused (locked, gone, its disk full)
        _cannot_start(describe_database_error(exc, settings.database_url))


def _needs_privilege(exc: OSError, port: int) -> bool:
    """Whether binding ``port`` was refused because the node's user may not listen on a port below 1024: only a
    change to the unit (a capability) or to network.port ends that."""
    return exc.errno in (errno.EACCES, errno.EPERM) and exc.filename is None and port < 1024


def _tls_files_problem(settings: Settings) -> tuple[str, int] | None:
    """What is wrong with the TLS certificate, key and CA files the configuration names (missing, not PEM, a
    certificate expired or not valid yet) and `serve`'s exit code for it, or None: 1 for a certificate's dates,
    which a later start may find right (the clock synchronised after boot, the certificate renewed by
    automation), else 2."""
    from dicom_node.security import certificate_date_problem

    pairs: list[tuple[str, Path, str, Path, str, Path | None]] = []
    tls = settings.network.tls
    if tls is not None:
        names = ("network.tls.certificate", "network.tls.private_key", "network.tls.ca_certificates")
        pairs.append((names[0], tls.certificate, names[1], tls.private_key, names[2], tls.ca_certificates))
    web = settings.console
    if web.enabled and web.tls_certificate is not None and web.tls_private_key is not None:
        pairs.append(
            ("console.tls_certificate", web.tls_certificate, "console.tls_private_key", web.tls_private_key, "", None)
        )
    for cert_key, cert, key_key, key, ca_key, ca in pairs:
        for setting, path in ((cert_key, cert), (key_key, key), (ca_key, ca)):
            if path is not None and not path.exists():
                return f"{setting} {path} does not exist", 2
            if path is not None and not path.is_file():
                return f"{setting} {path} is not a file", 2
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key, password=lambda: "")
        except ssl.SSLError:
            return (
                f"{cert_key} {cert} and {key_key} {key} cannot be loaded as a PEM certificate and its private key "
                "(not PEM, the key is encrypted, or it belongs to another certificate)",
                2,
            )
        except OSError as exc:
            return _describe_os_error(exc), 2
        expired = certificate_date_problem(cert_key, cert, datetime.now(timezone.utc))
        if expired:
            return expired, 1
        if ca is not None:
            try:
                context.load_verify_locations(ca)
            except ssl.SSLError:
                return f"{ca_key} {ca} holds no PEM certificate that can be loaded", 2
            except OSError as exc:
                return _describe_os_error(exc), 2
    return None


def _cannot_start(reason: str, *, exit_code: int = 1) -> NoReturn:
    """Say why `serve` cannot start and exit: 2 where a restart cannot help (see :func:`serve`), else 1."""
    errors.print(f"[bold red]cannot start[/]: {escape(reason)}", highlight=False)
    raise typer.Exit(exit_code)


def _warn_about_loose_permissions(storage: Path) -> None:
    import logging

    from dicom_node.logs import log_event

    loose = loose_permissions(storage)
    if loose:
        log_event(
            logging.getLogger("dicom_node.privacy"),
            logging.WARNING,
            "storage.readable_by_others",
            folder=str(storage),
            examples=", ".join(str(p) for p in loose[:5]),
            hint=f"patient data should be private to the node's user: chmod -R go-rwx {storage}",
        )


@app.command()
def worker(
    config: ConfigOption = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Host part of the worker's id in its lease (default: $DICOM_NODE_WORKER_NAME, else the host name)."
        ),
    ] = None,
) -> None:
    """Run one inference worker in the foreground (serve starts `inference.workers` of them itself).

    On another host, point it at the node's PostgreSQL and shared storage folder (README: "Workers on other hosts").
    """
    from sqlalchemy.exc import DBAPIError

    from dicom_node.worker import run_worker

    settings = _settings(config)
    problem = _database_url_problem(settings.database_url)
    if problem is not None:
        _database_failed(problem, settings.database_url, exit_code=2)
    try:
        run_worker(settings, name=name)
    except DBAPIError as exc:
        _database_failed(exc, settings.database_url)


@app.command()
def status(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Most recent series to show.")] = 20,
    state: Annotated[JobState | None, typer.Option(help="Only series in this state.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Only series with results made by these weights: their SHA-256 as results and `weights list` name "
            "it (sha256:..., or its first 8 or more digits)."
        ),
    ] = None,
) -> None:
    """A table of recent series and their states."""
    from dicom_node.provenance import made_by_weights, weights_digits
    from dicom_node.receive.open_transfers import series_being_sent
    from dicom_node.receive.recorder import instances_waiting_to_be_recorded
    from dicom_node.storage_lock import serve_holding
    from dicom_node.watcher import receiving_progress

    digits = weights_digits(weights) if weights is not None else None
    if weights is not None and digits is None:
        errors.print(
            f"--weights {_peer(weights)} is not a SHA-256: give sha256: and 8 to 64 hex digits, as "
            "`dicom-node weights list` and `dicom-node show` name the weights",
            highlight=False,
        )
        raise typer.Exit(2)
    settings = _settings(config)
    with _session(settings) as session:
        query = select(Job).options(selectinload(Job.series).selectinload(Series.study))
        if state:
            query = query.where(Job.state == state)
        if digits:
            query = query.where(made_by_weights(digits))
        rows = list(session.scalars(query.order_by(Job.state_changed_at.desc()).limit(limit)))
        matching = session.scalar(select(func.count()).select_from(query.subquery())) if digits else None
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        by_status = select(func.count()).select_from(RejectedInstance)
        rejected = session.scalar(by_status.where(RejectedInstance.status != 0)) or 0
        set_aside = session.scalar(by_status.where(RejectedInstance.status == 0)) or 0  # acknowledged, kept apart
        delivered = {job.id: _delivery_summary(session, job) for job in rows}
        quiet = settings.completion.quiet_seconds
        being_sent = series_being_sent(settings.storage.directory / "journal")
        reasons = {
            job.id: receiving_progress(session, job.series, quiet, being_sent)
            if job.state is JobState.RECEIVING
            else job.reason
            for job in rows
        }
        hung = _expired_lease_notes(session, settings)
    made_by = f" with results made by weights sha256:{digits}" if digits else ""
    table = Table(title=f"Series on {escape(settings.network.ae_title)}{made_by}", expand=False)
    for column in ("series instance UID", "modality", "description", "images", "state", "since", "reason", "warnings"):
        table.add_column(column, overflow="fold")
    table.add_column("delivered (files per destination)", overflow="fold")
    for job in rows:
        series = job.series
        table.add_row(
            _peer(series.series_instance_uid),
            _peer(series.modality),
            _peer(series.series_description),
            str(series.instance_count),
            job.state.value,
            _ago(job.state_changed_at),
            _peer(reasons[job.id]),
            _warnings_cell(job.warnings),
            _peer(delivered[job.id]),
        )
    console.print(table)
    if matching is not None:
        shown_here = f" (the {len(rows)} newest shown: --limit shows more)" if matching > len(rows) else ""
        console.print(f"{matching} series{made_by}{shown_here}", highlight=False)
    summary = ", ".join(f"{s.value} {counts[s]}" for s in JobState if counts.get(s)) or "no series yet"
    aside = f"; copies set aside: {set_aside}" if set_aside else ""
    console.print(f"{summary}; refused instances: {rejected}{aside}", highlight=False)
    if serve_holding(settings.storage.directory) is None:
        console.print(
            f"no dicom-node serve is running on storage folder {settings.storage.directory}: nothing is received, "
            "completed or sent until it is started (systemctl start dicom-node, or dicom-node serve)",
            highlight=False,
        )
    waiting = instances_waiting_to_be_recorded(settings.storage.directory)
    if waiting:
        console.print(
            f"up to {waiting} acknowledged image(s) are not in the database yet: they are safe on disk, named in "
            f"the receiving processes' journals ({settings.storage.directory / 'journal'}), and are recorded as "
            "soon as the database takes writes (they are not in the table above until then)",
            highlight=False,
        )
    for note in hung:
        console.print(note, highlight=False)


def _expired_lease_notes(session: Session, settings: Settings) -> list[str]:
    """A sentence per series whose worker stopped renewing its lease (frozen, hung or gone), saying how long ago."""
    notes = []
    for job in jobs.expired_leases(session, lock=False):
        late = _duration(jobs.lease_overdue_seconds(session, job))
        notes.append(
            f"series {_peer(job.series.series_instance_uid)}: worker {_peer(job.claimed_by)} stopped renewing its "
            f"lease {late} ago in stage {_peer(job.stage or 'start')} (it is frozen, hung or gone); a running "
            "`dicom-node serve` queues the series again once the lease has stayed run out for "
            f"inference.lease_seconds ({settings.inference.lease_seconds:g} s)"
        )
    return notes


def _duration(seconds: float) -> str:
    """``75 s``, ``12 min``, ``3 h 5 min``."""
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole // 60} min"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _warnings_cell(warnings: list[str] | None) -> str:
    """The status table's warnings column: how many, and PARTIAL when the result covers less than the series.

    `dicom-node show` lists them.
    """
    if not warnings:
        return ""
    partial = " PARTIAL" if any(jobs.is_partial_warning(w) for w in warnings) else ""
    return f"{len(warnings)}{partial}"


@app.command()
def show(series_instance_uid: str, config: ConfigOption = None) -> None:
    """One series: its job, its history of states and where its files are."""
    from dicom_node.provenance import recorded_made_by
    from dicom_node.retrieve.matching import withheld

    settings = _settings(config)
    with _session(settings) as session:
        job = jobs.job_for_series_uid(session, series_instance_uid)
        if job is None:
            reason = jobs.made_by_node_reason(session, series_instance_uid)
            errors.print(_peer(reason or f"no series {series_instance_uid} on this node"), highlight=False)
            raise typer.Exit(1)
        series = job.series
        console.print(f"series   {_peer(series.series_instance_uid)}", highlight=False)
        console.print(f"study    {_peer(series.study.study_instance_uid)}", highlight=False)
        console.print(
            f"modality {_peer(series.modality)}  images {series.instance_count}  from {_peer(series.calling_ae_title)}",
            highlight=False,
        )
        console.print(f"state    {job.state.value}  ({_peer(job.reason)})", highlight=False)
        if job.model_name:
            destinations = _peer(", ".join(job.destinations or []))
            console.print(
                f"model    {_peer(job.model_name)} (rule {_peer(job.rule_name)}) -> {destinations}", highlight=False
            )
        if job.timings:
            stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in job.timings.items())
            console.print(f"timings  {_peer(stages)}", highlight=False)
        if job.state is JobState.PROCESSING and job.stage:
            console.print(f"stage    {_peer(job.stage)}", highlight=False)
        if job.worker_deaths:
            console.print(f"workers  died {job.worker_deaths} time(s) on this series", highlight=False)
        for warning in job.warnings or []:
            console.print(f"warning  {_peer(warning)}", highlight=False)
        if job.result_path:
            gone = "" if Path(job.result_path).exists() else "  (deleted)"
            console.print(f"results  {_peer(job.result_path)}{gone}", highlight=False)
        # The results' own description while they are there; the job's history, which no purge deletes, after.
        made_by = (_made_by(Path(job.result_path)) if job.result_path else None) or recorded_made_by(job)
        if made_by:  # one line, never wrapped: the whole SHA-256 is copied from it
            console.print(f"made by  {_peer(made_by)}", highlight=False, soft_wrap=True)
        results = select(Series).where(Series.source_job_id == job.id).order_by(Series.id)
        stale = f"  (not served by Query/Retrieve: the series received images after it, and is {job.state.value})"
        for result in session.scalars(results):
            superseded = (
                f"  (superseded {result.superseded_at.isoformat(timespec='seconds')})"
                if result.superseded_at
                else stale
                if withheld(session, result)
                else ""
            )
            modality = _peer(result.modality or "")
            console.print(
                f"  {modality:<8} {_peer(result.series_instance_uid)}  {_peer(result.series_description)}{superseded}",
                highlight=False,
            )
        _print_deliveries(session, job)
        if series.purged_at is not None:
            console.print(
                f"purged   {series.purged_at.isoformat(timespec='seconds')} {_peer(_images_purged_by(session, series))}",
                highlight=False,
            )
        table = Table("at", "from", "to", "reason")
        for event in job.events:
            table.add_row(
                event.at.isoformat(timespec="seconds"),
                event.from_state.value if event.from_state else "",
                event.to_state.value,
                _peer(event.reason),
            )
        console.print(table)
        first_file = session.scalars(select(Instance.path).where(Instance.series_id == series.id).limit(1)).first()
        if first_file:
            console.print(f"files    {_peer(Path(first_file).parent)}", highlight=False)


def _images_purged_by(session: Session, series: Series) -> str:
    """Who removed the series' images: the `dicom-node purge` whose audit record says so (it names the OS user and
    host), else retention or a `dicom-node purge` whose record is missing (the series row does not say which)."""
    deleted = f": purge of series {series.series_instance_uid}: its images"  # "its images (and results) deleted"
    record = session.execute(
        select(AuditEvent.detail, AuditEvent.peer_address)
        .where(
            AuditEvent.study_instance_uid == series.study.study_instance_uid,  # indexed: a few rows to read
            AuditEvent.action == "operator",
            AuditEvent.outcome == "success",
            AuditEvent.at >= series.purged_at,  # written just after the purge, never before it
            AuditEvent.detail.contains(deleted, autoescape=True),
        )
        .order_by(AuditEvent.at)
        .limit(1)
    ).first()
    if record is None:
        return "by retention or `dicom-node purge`"
    who = str(record.detail).partition(deleted)[0].removesuffix(" on the command line")
    return f"by `dicom-node purge`, run by {who} on {record.peer_address or 'an unknown host'}"


def _made_by(job_folder: Path) -> str | None:
    """The algorithm and exact weights of the job's latest results (from its segmentation.json)."""
    runs = sorted(job_folder.glob("run-*/segmentation.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    latest = runs[-1] if runs else job_folder / "segmentation.json"
    try:
        description = json.loads(latest.read_text())
    except (OSError, ValueError):
        return None
    weights = description.get("weights") or {}
    text = f"{description.get('algorithm_name')} {description.get('algorithm_version')}"
    if weights.get("sha256"):
        text += f" (weights {', '.join(weights.get('datasets', []))}, SHA-256 {weights['sha256']})"
    if weights.get("test_weights"):
        text += " TEST WEIGHTS, not a trained model"
    return text


def _delivery_summary(session: Session, job: Job) -> str:
    """``pacs 2/2, planner 0/1``: files each destination has accepted, once sending has begun; while SENDING, what
    each destination still lacking files last answered (``waiting for planner: ...``)."""
    if not job.deliveries:
        return ""
    progress = jobs.delivery_progress(session, job)
    summary = ", ".join(p.summary() for p in progress)
    notes = [note for p in progress if (note := p.waiting_note())] if job.state is JobState.SENDING else []
    return summary + "".join(f"; waiting for {note}" for note in notes)


def _print_deliveries(session: Session, job: Job) -> None:
    """Per destination: files accepted, attempts, and per file when it was delivered or the last error."""
    if not job.deliveries:
        return
    for progress in jobs.delivery_progress(session, job):
        attempts = f"{progress.attempts} attempt{'s' if progress.attempts != 1 else ''}"
        if progress.unreachable_since is not None:
            tries = jobs.delivery_record(job, progress.destination).unreachable_attempts
            attempts += (
                f"; not taking files since {progress.unreachable_since.isoformat()[:16]}: {tries} tries found no "
                "association or were answered Out of Resources, not counted against dispatch.max_attempts"
            )
        next_try = progress.next_attempt_at if job.state is JobState.SENDING else None  # else no try is planned
        retry_at = f"; next try {next_try.isoformat()[:19]}" if next_try is not None else ""
        console.print(f"sent to  {_peer(progress.summary())} files ({attempts}{retry_at})", highlight=False)
        if progress.planned is None:
            console.print(
                f"  nothing sent yet: {_peer(progress.last_error or 'waiting for its first attempt')}", highlight=False
            )
        elif progress.last_error and len(progress.delivered) < len(progress.planned):
            console.print(f"  last error: {_peer(progress.last_error)}", highlight=False)
        for uid, path in (progress.planned or {}).items():
            delivery = progress.delivered.get(uid)
            if delivery is not None:
                line = f"delivered {delivery.delivered_at.isoformat(timespec='seconds')}"
            else:
                line = "not delivered (see the last error above)" if progress.last_error else "not delivered yet"
            console.print(f"  {_peer(Path(path).name):<18} {_peer(uid)}  {_peer(line)}", highlight=False)


def _os_user() -> str:
    """The operating-system user running this command ("unknown" when the system cannot tell)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no password entry for the uid (a container's bare uid)
        return "unknown"


def _audit_operator(engine: Engine, user: str, outcome: Outcome, detail: str, study: str | None = None) -> None:
    """One ``operator`` audit record of a command-line action: the OS user, this host, the series and the outcome."""
    from db.session import make_session_factory
    from dicom_node import audit

    audit.record(
        make_session_factory(engine),
        "operator",
        audit.Peer(None, socket.gethostname()),
        outcome,
        study_instance_uid=study,
        detail=f"OS user {user} on the command line: {detail}",
    )


class _Refused(Exception):
    """The series' state does not allow the action now; the message says why."""


def _operator_action(
    settings: Settings, series_instance_uid: str, verb: str, change: Callable[[Session, Job, str], None]
) -> str:
    """Apply ``change(session, job, by)`` to the series' job in one transaction, as the console does, and audit the
    outcome; exit 1 with the reason when it is refused. Returns the job's new state."""
    user = _os_user()
    engine: Engine | None = None
    study: str | None = None
    refusal: str | None = None
    state = ""
    try:
        with _session(settings, write=True) as session:
            engine = session.get_bind().engine
            job = jobs.job_for_series_uid(session, series_instance_uid, lock=True)
            if job is None:
                reason = jobs.made_by_node_reason(session, series_instance_uid)
                raise _Refused(reason or f"no series {series_instance_uid} on this node")
            study = job.series.study.study_instance_uid
            try:
                change(session, job, f"OS user {user} on the command line")
            except jobs.InvalidTransition as exc:
                raise _Refused(str(exc)) from None
            state = job.state.value
    except StaleDataError:
        refusal = (
            f"series {series_instance_uid} changed state while the {verb} was made, so nothing was changed; see "
            f"`dicom-node show` and {verb} again if it is still needed"
        )
    except _Refused as exc:
        refusal = str(exc)
    if engine is not None:
        what = f"{verb} of series {series_instance_uid}"
        if refusal is None:
            _audit_operator(engine, user, "success", f"{what}: now {state}", study)
        else:
            _audit_operator(engine, user, "refused", f"{what} refused: {refusal}", study)
    if refusal is not None:
        errors.print(f"cannot {verb}: {_peer(refusal)}", highlight=False)
        raise typer.Exit(1)
    return state


@app.command()
def retry(
    series_instance_uid: str,
    config: ConfigOption = None,
    run_again: Annotated[
        bool, typer.Option("--run-again", help="Process a DONE series again (a second set of results is sent).")
    ] = False,
) -> None:
    """Resend only the files a destination lacks (back to SENDING), or route a FAILED/IGNORED series again (a DONE
    one with --run-again)."""
    settings = _settings(config)
    state = _operator_action(
        settings,
        series_instance_uid,
        "retry",
        lambda session, job, by: jobs.retry(session, job, by=by, run_done_again=run_again),
    )
    console.print(
        f"series {_peer(series_instance_uid)} is {state} again; the running node carries on within seconds",
        highlight=False,
    )


@contextmanager
def _while_no_node_runs(settings: Settings) -> Iterator[bool]:
    """Whether no ``dicom-node serve`` runs on the database (it holds the node lock); while True, this command holds
    the lock itself, so a node starting meanwhile waits until it is done."""
    from db.session import NodeLock

    lock = NodeLock(settings.database_url)
    sqlite_file = lock.lock_file.with_name(lock.lock_file.name.removesuffix(".serve-lock")) if lock.lock_file else None
    # No database file: the command refuses it below, and must not leave a lock file (or its folder) behind.
    taken = (sqlite_file is None or sqlite_file.exists()) and lock.try_take()
    try:
        yield taken
    finally:
        if taken:
            lock.release()


def _every_destination_idle(_record: object) -> bool:
    """With no node running, no destination is receiving files now."""
    return True


@app.command()
def cancel(series_instance_uid: str, config: ConfigOption = None) -> None:
    """Stop a COMPLETE, QUEUED, PROCESSING or SENDING series (it becomes FAILED); `dicom-node retry` starts it again."""
    settings = _settings(config)
    finished = jobs.settled_rule(settings.dispatch.max_attempts, settings.dispatch.unreachable_hours)
    with _while_no_node_runs(settings) as stopped:
        if stopped:  # no serve holds the database: nothing of a SENDING series is on its way, none starts meanwhile
            finished = _every_destination_idle
        state = _operator_action(
            settings,
            series_instance_uid,
            "cancel",
            lambda session, job, by: jobs.cancel(session, job, by=by, finished=finished),
        )
    console.print(
        f"series {_peer(series_instance_uid)} is {state} (cancelled); a worker busy with it drops its results, and "
        f"`dicom-node retry {_peer(series_instance_uid)}` starts it again",
        highlight=False,
    )


@app.command()
def rejected(config: ConfigOption = None, limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """Instances the node refused (or set aside after accepting: status 0x0000), why, and where their bytes are kept."""
    settings = _settings(config)
    with _session(settings) as session:
        rows = list(
            session.scalars(select(RejectedInstance).order_by(RejectedInstance.received_at.desc()).limit(limit))
        )
    table = Table("received", "calling AE", "status", "series instance UID", "SOP instance UID", "reason", "kept at")
    for row in rows:
        table.add_row(
            row.received_at.isoformat(timespec="seconds"),
            _peer(row.calling_ae_title),
            f"0x{row.status:04X}",
            _peer(row.series_instance_uid),
            _peer(row.sop_instance_uid),
            _peer(row.reason),
            _peer(row.path),
        )
    console.print(table)


@app.command()
def audit(
    config: ConfigOption = None,
    hours: Annotated[float | None, typer.Option(min=0, help="Only the last N hours.")] = None,
    peer: Annotated[str | None, typer.Option(help="Only this peer AE title.")] = None,
    action: Annotated[
        list[str] | None,
        typer.Option(help="association, store, find, move, get, send, echo, console or operator (repeatable)."),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many records, newest first.")] = 100,
) -> None:
    """The audit trail: who did what, from where, to which study, and the outcome (no patient data)."""
    from datetime import timedelta

    from dicom_node.audit import ACTIONS, recent

    known = ACTIONS
    unknown = [a for a in action or [] if a not in known]
    if unknown:
        errors.print(f"unknown action {_peer(', '.join(unknown))} (known: {', '.join(known)})", highlight=False)
        raise typer.Exit(2)
    settings = _settings(config)
    since = datetime.now(timezone.utc) - timedelta(hours=hours) if hours else None
    with _session(settings) as session:
        rows = recent(
            session, since=since, peer_ae_title=peer, actions=action or (), study_instance_uid=study, limit=limit
        )
    table = Table("at", "action", "peer AE", "address", "study", "outcome", "instances", "detail")
    for row in rows:
        table.add_row(
            row.at.isoformat(timespec="seconds"),
            _peer(row.action),
            _peer(row.peer_ae_title),
            _peer(row.peer_address),
            _peer(row.study_instance_uid),
            _peer(row.outcome),
            str(row.instances),
            _peer(row.detail),
        )
    console.print(table)


@app.command()
def echo(
    destination: Annotated[str | None, typer.Argument(help="A destination name from the configuration.")] = None,
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Peer host, instead of a named destination.")] = None,
    port: Annotated[int | None, typer.Option(help="Peer port.")] = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="Peer AE title.")] = None,
    calling_ae_title: Annotated[
        str | None, typer.Option("--calling-ae-title", help="Our AE title in the request (default network.ae_title).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """C-ECHO a destination (or --host/--port/--ae-title) to check it is reachable."""
    from dicom_node.scu import verify
    from dicom_node.security import client_tls

    settings = _settings(config)
    if destination:
        peer = settings.destinations.get(destination)
        if peer is None:
            known = ", ".join(settings.destinations) or "none configured"
            errors.print(f"unknown destination {_peer(repr(destination))} (known: {escape(known)})", highlight=False)
            raise typer.Exit(2)
        host, port, ae_title = peer.host, peer.port, peer.ae_title
    if port is not None and not 1 <= port <= 65535:
        errors.print(f"--port {port} is not a port number (1 to 65535)", highlight=False)
        raise typer.Exit(2)
    for option, title in (("--ae-title", ae_title), ("--calling-ae-title", calling_ae_title)):
        if title is not None and not _is_ae_title(title):
            errors.print(
                f"{option} {_peer(shown(title))} is not an AE title: 1 to 16 printable ASCII characters, no backslash",
                highlight=False,
            )
            raise typer.Exit(2)
    if host is not None and not destination:
        host = host.strip()
        problem = host_problem(host, port_key="--port")
        if problem:
            errors.print(f"--host {_peer(problem)}", highlight=False)
            raise typer.Exit(2)
    if not (host and port and ae_title):
        given = (("--host", host), ("--port", port), ("--ae-title", ae_title))
        missing = ", ".join(option for option, value in given if not value)
        errors.print(f"give a destination name, or --host, --port and --ae-title ({missing} missing)")
        raise typer.Exit(2)
    tls_args = client_tls(settings.destinations[destination], settings.network.tls) if destination else None
    calling = calling_ae_title or settings.network.ae_title
    peer_name = _peer(f"{ae_title}@{host}:{port}")
    try:
        result = verify(calling, ae_title, host, port, timeout=timeout, tls_args=tls_args)
    except OSError as exc:  # socket.gaierror is one: the host name does not resolve
        if isinstance(exc, socket.gaierror):
            reason = f"the host name {_peer(host)} cannot be resolved (misspelt, or no name service on this machine?)"
        else:
            reason = escape(_describe_os_error(exc, host=host))
        errors.print(f"C-ECHO {peer_name}: FAILED: {reason}", highlight=False)
        raise typer.Exit(1) from None
    except (OverflowError, ValueError):  # what pynetdicom raises for an address it cannot use
        errors.print(f"C-ECHO {peer_name}: FAILED: host {_peer(host)} and port {port} are not an address to call")
        raise typer.Exit(1) from None
    if result.ok:
        console.print(f"C-ECHO {peer_name}: success ({result.seconds * 1000:.0f} ms)", highlight=False)
    else:
        errors.print(f"C-ECHO {peer_name}: FAILED: {_peer(result.message)}", highlight=False)
        raise typer.Exit(1)


def _is_ae_title(title: str) -> bool:
    """Whether ``title`` is what a DICOM AE title may be (the configuration's rule for network.ae_title)."""
    stripped = title.strip()
    return 1 <= len(stripped) <= 16 and re.fullmatch(AE_TITLE_PATTERN, stripped) is not None


@weights_app.command("list")
def weights_list(config: ConfigOption = None) -> None:
    """Which TotalSegmentator tasks have all their weights, in the weights folder and in each model's own folder,
    and for each installed one the weights' identity as results name it (folders and SHA-256), checked against
    the hashes recorded at install."""
    from inference.weights import installed

    settings = _settings(config)
    folders = {settings.weights_directory: "weights folder"}
    for name, model in settings.models.items():
        own = getattr(model, "weights_directory", None)
        if own is not None:
            folders.setdefault(own, f"model {name!r}")
    for folder, label in folders.items():
        console.print(f"{label}: {folder}", highlight=False)
        for task, present in installed(folder).items():
            state = f"installed  {_installed_identity(task, folder)}" if present else "missing"
            console.print(f"  {task:<11} {escape(state)}", highlight=False)


def _installed_identity(task: str, folder: Path) -> str:
    """How results name ``task``'s weights in ``folder`` (its datasets and SHA-256 over their files), or why the
    node would refuse to load them."""
    from inference.models.checkpoints import description_problem
    from inference.weights import WeightsCorrupt, WeightsMissing, identify, imports_held_off, model_folders

    try:
        with imports_held_off(folder):  # an import waits: the folders identified are of one release
            found = model_folders(task, folder)
            identity = identify(task, found)
            unreadable = next(filter(None, (description_problem(f.path) for f in found)), None)
    except (WeightsCorrupt, WeightsMissing) as exc:
        return f"but not usable: {exc}"
    except OSError as exc:
        return f"but not readable: {_describe_os_error(exc)}"
    if unreadable is not None:
        return f"but not usable: {unreadable}; import the release zip again"
    test = " (test weights: random or untrained, results are not for clinical use)" if identity.test_weights else ""
    unrecorded = " (no manifest yet: recorded at the first successful load)" if identity.unrecorded else ""
    return f"sha256:{identity.sha256}{test}{unrecorded}"


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Install into the weights_directory of this configured model (default: the node's weights folder).",
    ),
]


def _weights_target(settings: Settings, model: str | None) -> tuple[Path, str | None]:
    """The folder ``weights import/download`` install into, and the task of ``--model`` (if given)."""
    if model is None:
        return settings.weights_directory, None
    with_weights = [name for name, m in settings.models.items() if m.kind == "totalsegmentator"]
    known = ", ".join(with_weights) or "none configured"
    configured = settings.models.get(model)
    if configured is None or configured.kind != "totalsegmentator":
        what = "is not configured" if configured is None else f"is a {configured.kind} model, which needs no weights"
        errors.print(
            f"--model {_peer(repr(model))} {what} (the TotalSegmentator models in the configuration: {escape(known)})",
            highlight=False,
        )
        raise typer.Exit(2)
    return configured.weights_directory or settings.weights_directory, configured.task


@weights_app.command("download")
def weights_download(
    config: ConfigOption = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="total (five 1.5 mm models) or total_fast (one 3 mm model); default: the --model's task, else total."
        ),
    ] = None,
    model: ModelOption = None,
) -> None:
    """Download a task's weights from TotalSegmentator's releases (needs network access).

    A model folder already there is kept as it is (TotalSegmentator's downloader skips it); one whose files
    changed since they were installed is refused, and nothing is downloaded.
    """
    from inference.weights import TASK_DATASETS, WeightsCorrupt, download

    settings = _settings(config)
    folder, model_task = _weights_target(settings, model)
    task = task or model_task or "total"
    if task not in TASK_DATASETS:
        errors.print(f"--task {_peer(repr(task))} is not a task (known: {', '.join(TASK_DATASETS)})", highlight=False)
        raise typer.Exit(2)
    there_before = {d for _id, d, _t in TASK_DATASETS[task] if (folder / d).exists()}
    what = f"weights download of task {task} into {folder}"
    try:
        folders = download(task, folder)
    except WeightsCorrupt as exc:
        _audit_weights(settings, "refused", f"{what} refused: {exc}")
        errors.print(f"download refused: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - network, disk, or missing package: say which
        _audit_weights(settings, "failed", f"{what} failed: {_describe_download_error(exc)}")
        errors.print(escape(_describe_download_error(exc)), highlight=False)
        raise typer.Exit(1) from None
    added = [f.parent.name for f in folders if f.parent.name not in there_before]
    kept = [f.parent.name for f in folders if f.parent.name in there_before]
    for installed_folder in folders:
        already = installed_folder.parent.name in there_before
        console.print(f"{'already there' if already else 'installed'} {installed_folder}", highlight=False)
    identities = _installed_identities(folder, {f.parent.name for f in folders})
    for identity in identities if added else []:  # what results will name from now on
        console.print(identity, highlight=False)
    listed = [f"installed {', '.join(added) or 'nothing new'}", *([f"already there {', '.join(kept)}"] if kept else [])]
    _audit_weights(settings, "success", f"{what}: {'; '.join([*listed, *identities])}")


def _describe_download_error(exc: Exception) -> str:
    """Why a weights download failed, in one sentence: the host and what went wrong, never the library's text."""
    offline = "; on an offline machine use `dicom-node weights import`"
    if isinstance(exc, OSError) and not _is_network_error(exc):
        return f"download failed: {_describe_os_error(exc)}"
    if not _is_network_error(exc):
        return f"download failed: {exc}"
    named = re.search(r"host='([^']+)'", str(exc))
    host = named.group(1) if named else "the download server"
    chain = _error_chain(exc)
    names = {type(error).__name__ for error in chain}
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain), None)
    if names & {"NameResolutionError", "gaierror"} or "Failed to resolve" in str(exc):
        reason = "the host name cannot be resolved (no network?)"
    elif names & {"ConnectTimeoutError", "ConnectTimeout", "ReadTimeoutError", "ReadTimeout", "TimeoutError"}:
        reason = "no answer (timed out)"
    elif names & {"ProxyError"}:
        reason = "the proxy refused or could not reach it (check HTTPS_PROXY)"
    elif names & {"SSLError", "SSLCertVerificationError"}:
        reason = "the secure connection failed (a proxy that intercepts HTTPS, or a wrong clock?)"
    elif names & {"ConnectionRefusedError"} or "Connection refused" in str(exc):
        reason = "the connection was refused"
    elif isinstance(status, int):
        reason = f"the server answered HTTP {status}"
    else:
        reason = "the connection failed"
    return f"cannot download the weights from {host}: {reason}{offline}"


def _error_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and the errors it wraps (requests wraps urllib3's, which wraps the socket's)."""
    chain: list[BaseException] = []
    pending: list[object] = [exc]
    while pending and len(chain) < 20:
        error = pending.pop()
        if not isinstance(error, BaseException) or any(error is seen for seen in chain):
            continue
        chain.append(error)
        pending += [error.__cause__, error.__context__, getattr(error, "reason", None), *error.args]
    return chain


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the HTTP client (requests or urllib3), or is a socket's failure to connect."""
    module = type(exc).__module__.split(".")[0]
    return module in ("requests", "urllib3") or isinstance(exc, (socket.gaierror, ConnectionError, TimeoutError))


@weights_app.command("import")
def weights_import(
    archive: Path,
    config: ConfigOption = None,
    sha256: Annotated[
        str | None, typer.Option(help="The release's published SHA-256; a different file is refused.")
    ] = None,
    model: ModelOption = None,
) -> None:
    """Unpack a TotalSegmentator weights zip (carried to an offline machine) into the weights folder.

    Every checkpoint is read as data only before anything is installed; a file that would
    run code when loaded is refused, and so is a zip without the model folders the node loads.
    A model folder already installed is replaced only once the new one is complete. The
    installed files' SHA-256 are recorded and checked each time a model loads.
    """
    settings = _settings(config)
    folder, _task = _weights_target(settings, model)
    what = f"weights import of {archive} into {folder}"
    try:
        added = _import_weights(archive, folder, sha256)
    except _InstallFailed as exc:
        _audit_weights(settings, exc.outcome, f"{what} {exc.outcome}: {exc}")
        errors.print(f"import failed: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    for dataset_folder in added:
        console.print(f"imported {dataset_folder}", highlight=False)
    identities = _installed_identities(folder, {f.name for f in added})
    for identity in identities:
        console.print(identity, highlight=False)
    if added:
        console.print(WEIGHTS_TAKEN_WHEN, highlight=False)
    published = sha256.strip().lower() if sha256 else _archive_sha256(archive)
    installed = ", ".join(f.name for f in added) or "nothing"
    _audit_weights(
        settings, "success", f"{what} (zip SHA-256 {published}): installed {installed}; {'; '.join(identities)}"
    )


WEIGHTS_TAKEN_WHEN = (
    "Workers already running keep the weights they loaded; every worker started from now on loads these: the "
    "node's workers once it is restarted, and a worker `serve` starts again after one died or ran past its time "
    "limit (logged as model.weights_changed where results were made with other weights). Restart the node to have "
    "every worker use them at once. Each result, and the series' history in `dicom-node show`, names the weights "
    "it was made with."
)
"""What `weights import` says about when a running node uses the weights it installed."""


class _InstallFailed(Exception):
    """Weights were not installed; the message says why, in one sentence (``outcome``: for the audit trail)."""

    def __init__(self, sentence: str, outcome: Outcome = "failed") -> None:
        super().__init__(sentence)
        self.outcome: Outcome = outcome


def _import_weights(archive: Path, folder: Path, sha256: str | None) -> list[Path]:
    """:func:`inference.weights.import_zip` with the checks a model runs at load; the dataset folders installed.

    Raises
    ------
    _InstallFailed
        With the sentence saying why nothing was installed.
    """
    import zipfile
    import zlib

    from inference.models.totalsegmentator import load_refusal
    from inference.weights import WeightsCorrupt, import_zip

    if archive.is_dir():
        raise _InstallFailed(f"{archive} is a folder, not a zip file")
    try:
        return import_zip(archive, folder, sha256=sha256, loadable=load_refusal)
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise _InstallFailed(f"{archive} is not a zip file, or it is damaged (copy it again)") from None
    except NotImplementedError:
        raise _InstallFailed(f"{archive} is packed with a compression method that cannot be unpacked here") from None
    except OSError as exc:
        raise _InstallFailed(_describe_os_error(exc)) from None
    except (ValueError, WeightsCorrupt) as exc:  # not weights the node can use, or not the published file
        raise _InstallFailed(str(exc), "refused") from None


def _archive_sha256(archive: Path) -> str:
    """The zip's SHA-256, for the audit trail ("unknown" where it cannot be read again)."""
    from inference.weights import file_sha256

    try:
        return file_sha256(archive)
    except OSError:
        return "unknown (the file could not be read again)"


def _installed_identities(folder: Path, datasets: set[str]) -> list[str]:
    """``task total_fast: weights sha256:<64 digits>`` for each task whose weights include one of ``datasets`` and
    are all installed in ``folder``: the SHA-256 its results, `dicom-node show` and `status --weights` name."""
    from inference.weights import (
        TASK_DATASETS,
        WeightsCorrupt,
        WeightsMissing,
        identify,
        imports_held_off,
        model_folders,
    )

    identities = []
    for task, parts in TASK_DATASETS.items():
        if not datasets & {dataset for _id, dataset, _trainer in parts}:
            continue
        try:
            with imports_held_off(folder):
                identity = identify(task, model_folders(task, folder))
        except (WeightsMissing, WeightsCorrupt, OSError):
            continue  # not all of the task's folders are there yet (total: five zips)
        identities.append(f"task {task}: weights sha256:{identity.sha256}")
    return identities


def _audit_weights(settings: Settings, outcome: Outcome, detail: str) -> None:
    """An ``operator`` audit record of a weights install (the OS user, this host, what and into which folder, the
    SHA-256), where the node has its database. Where it has none yet (an offline machine whose weights are
    installed before its first start) an install says it wrote no record; a refusal or failure, which installed
    nothing, says only why."""
    from sqlalchemy.engine import make_url

    from db.session import make_engine

    url = settings.database_url
    parsed = make_url(url) if _database_url_problem(url) is None else None
    if parsed is None or (parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file()):
        if outcome == "success":
            where = (
                f"no database at {parsed.database} yet (`dicom-node serve` creates it)"
                if parsed is not None
                else "no database.url it can use"
            )
            errors.print(f"not written to the audit trail: the node has {escape(where)}", highlight=False)
        return
    _audit_operator(make_engine(url), _os_user(), outcome, detail)


@app.command()
def phantom(
    output: Annotated[Path, typer.Argument(help="Folder to write the series into.")],
    slices: Annotated[int, typer.Option(help="Number of axial slices.")] = 100,
    size: Annotated[int, typer.Option(help="Rows and columns.")] = 512,
    compression: Annotated[str | None, typer.Option(help="None, implicit, deflate, rle, jpeg2000 or jpegls.")] = None,
    multiframe: Annotated[
        str | None,
        typer.Option(
            help="Write one multi-frame instance: 'enhanced' (Enhanced CT) or 'legacy' (Legacy Converted Enhanced CT)."
        ),
    ] = None,
    patient_name: Annotated[
        str, typer.Option(help="PatientName, e.g. 'Yamada^Tarou=山田^太郎=やまだ^たろう'.")
    ] = "Phantom^Synthetic",
    character_set: Annotated[
        str, typer.Option(help="SpecificCharacterSet, values separated by backslashes, e.g. '\\ISO 2022 IR 87'.")
    ] = "ISO_IR 100",
) -> None:
    """Write a synthetic CT series (known anatomy) to test a node or a PACS route."""
    from dicom_node.phantom import PhantomSpec, check_name_encodable, write_phantom_series

    if multiframe not in (None, "enhanced", "legacy"):
        errors.print(f"cannot write phantom: --multiframe is 'enhanced' or 'legacy', not {multiframe!r}")
        raise typer.Exit(2)
    spacing = 0.8 * 512 / size
    try:
        check_name_encodable(patient_name, character_set)
        spec = PhantomSpec(
            rows=size,
            columns=size,
            slices=slices,
            pixel_spacing=(spacing, spacing),
            compression=compression,
            enhanced=multiframe is not None,
            legacy_converted=multiframe == "legacy",
            patient_name=patient_name,
            character_set=character_set,
        )
        series = write_phantom_series(output, spec)
    except OSError as exc:
        errors.print(f"cannot write phantom: {escape(_describe_os_error(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except (ValueError, RuntimeError, LookupError) as exc:
        errors.print(f"cannot write phantom: {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    console.print(
        f"wrote {len(series.files)} files of series {series.series_instance_uid} to {output}", highlight=False
    )


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the phantom, the node's files and the results.")
    ] = Path("dicom-node-demo"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 300.0,
) -> None:
    """Run the whole loop once: start a node, send it a CT phantom, pull the results back through Q/R."""
    from dicom_node.demo import DemoFailed, run_demo

    try:
        result = run_demo(output, lambda line: console.print(f"[green]ok[/] {line}", highlight=False), timeout=timeout)
    except DemoFailed as exc:
        node_log = output.resolve() / "node" / "node.log"
        where = f"\nnode log: {node_log}" if node_log.exists() else ""
        errors.print(f"[bold red]demo failed[/] at: {escape(str(exc))}{where}", highlight=False)
        raise typer.Exit(1) from None
    table = Table(title="Structures (from the retrieved TID 1500 SR)")
    for column in ("structure", "volume (ml)", "mean (HU)", "note"):
        table.add_column(column, justify="left" if column in ("structure", "note") else "right")
    for row in result.structures:
        note = "cut by scan edge" if row.cut_by_scan_edge else ""
        table.add_row(row.name, f"{row.volume_ml:.1f}", f"{row.mean_hu:.1f}", note)
    console.print(table)
    for what, path in result.files.items():
        console.print(f"{what:<9} {path}", highlight=False)
    console.print(f"node log  {result.node_log}", highlight=False)


def _end_like_ctrl_c_on_sigterm() -> None:
    """SIGTERM or SIGHUP (``timeout``, ``kill``, a stopped systemd timer, a closed terminal) ends the command as
    Ctrl-C does, through its clean-up: a purge puts back the images it had set aside and not yet deleted, instead of
    leaving them renamed until ``serve`` starts again."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for stop in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:  # ignored stays ignored: a purge started under nohup
            signal.signal(stop, _exit)


@app.command()
def purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be purged; delete nothing.")] = False,
    days: Annotated[float | None, typer.Option(help="Instead of retention.days.")] = None,
    results_days: Annotated[float | None, typer.Option(help="Instead of retention.results_days.")] = None,
    max_disk_gigabytes: Annotated[float | None, typer.Option(help="Instead of retention.max_disk_gigabytes.")] = None,
    quarantine_days: Annotated[float | None, typer.Option(help="Instead of retention.quarantine_days.")] = None,
    audit_days: Annotated[float | None, typer.Option(help="Instead of retention.audit_days.")] = None,
    series: Annotated[
        str | None,
        typer.Option(
            help="Purge this one finished series' images and results now, whatever its age (e.g. after a PACS "
            "correction, so the corrected series can be received)."
        ),
    ] = None,
) -> None:
    """Purge images and results of finished series, refused instances and audit records by the retention settings
    (--dry-run: only show what)."""
    from pydantic import ValidationError

    from db.session import make_session_factory
    from dicom_node.retention import apply_plan, plan_retention, plan_series_purge

    _end_like_ctrl_c_on_sigterm()
    settings = _settings(config)
    user = _os_user()
    if series is not None:
        with _session(settings) as session:
            engine = session.get_bind().engine
            refusal: str | None = None
            try:
                plan = plan_series_purge(session, series, settings.storage.directory)
            except LookupError as exc:
                refusal = str(exc)
            studies = _studies_of(session, [series])
        if refusal is not None:
            _audit_operator(
                engine, user, "refused", f"purge of series {series} refused: {refusal}", studies.get(series)
            )
            errors.print(_peer(refusal), highlight=False)
            raise typer.Exit(1)
        sessions = make_session_factory(engine)
        outcome = None if dry_run else apply_plan(sessions, settings, plan)
        _audit_purge(engine, user, plan, outcome, studies)
        _show_purge(plan, outcome, dry_run)
        return
    overrides = {
        "days": days,
        "results_days": results_days,
        "max_disk_gigabytes": max_disk_gigabytes,
        "quarantine_days": quarantine_days,
        "audit_days": audit_days,
    }
    try:
        retention = RetentionSettings.model_validate(
            {**settings.retention.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        errors.print(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}", highlight=False)
        raise typer.Exit(2) from None
    if not retention.enabled and retention.quarantine_days is None and retention.audit_days is None:
        if not dry_run:
            with _session(settings) as session:
                _confirm_clock(session.get_bind().engine, user)  # ages set later trust the clock
        console.print(
            "retention is not configured (retention.days, retention.results_days, retention.max_disk_gigabytes, "
            "retention.quarantine_days, retention.audit_days, or the options of the same names): nothing to purge"
        )
        return
    with _session(settings) as session:
        engine = session.get_bind().engine
    _purge_old_records(engine, settings.storage.directory, retention, user, dry_run)
    if not dry_run:
        _confirm_clock(engine, user)
    if not retention.enabled:
        return
    with _session(settings) as session:
        plan = plan_retention(session, retention)
        studies = _studies_of(session, [item.series_instance_uid for item in plan.items])
    outcome = None if dry_run else apply_plan(make_session_factory(engine), settings, plan)
    _audit_purge(engine, user, plan, outcome, studies)
    _show_purge(plan, outcome, dry_run)


def _purge_old_records(engine: Engine, storage: Path, retention: RetentionSettings, user: str, dry_run: bool) -> None:
    """What ``serve`` purges by their own age besides series: refused instances (``retention.quarantine_days``)
    and audit records (``retention.audit_days``). One sentence each, as ``serve`` logs it, and an ``operator``
    audit record for what was deleted."""
    from db.session import make_session_factory
    from dicom_node import retention as purging

    sessions = make_session_factory(engine)
    if retention.quarantine_days is not None:
        days = retention.quarantine_days
        if dry_run:
            count = purging.count_quarantine(sessions, storage, days)
        else:
            count = purging.purge_quarantine(sessions, storage, days)
        _say_purged(engine, user, purging.quarantine_purge_sentence(count, days, dry_run=dry_run), count, dry_run)
    if retention.audit_days is not None:
        days = retention.audit_days
        count = purging.count_audit(sessions, days) if dry_run else purging.purge_audit(sessions, days)
        _say_purged(engine, user, purging.audit_purge_sentence(count, days, dry_run=dry_run), count, dry_run)


def _confirm_clock(engine: Engine, user: str) -> None:
    """A purge is the operator's word that the clock is right: a doubt ``serve``'s retention kept (the clock far past
    what was recorded) ends, said and audited."""
    from db.session import make_session_factory
    from dicom_node.retention import confirm_clock

    confirmed = confirm_clock(make_session_factory(engine))
    if confirmed is not None:
        console.print(confirmed, highlight=False)
        _audit_operator(engine, user, "success", f"purge: {confirmed}")


def _say_purged(engine: Engine, user: str, sentence: str, count: int, dry_run: bool) -> None:
    """Print what a purge deleted (or would delete); audit it when it deleted something."""
    console.print(sentence, highlight=False)
    if count and not dry_run:
        _audit_operator(engine, user, "success", f"purge: {sentence}")


def _studies_of(session: Session, series_instance_uids: list[str]) -> dict[str, str]:
    """Series Instance UID -> its Study Instance UID, for the series the node holds."""
    rows = session.execute(
        select(Series.series_instance_uid, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.series_instance_uid.in_(series_instance_uids))
    )
    return {str(series): str(study) for series, study in rows.tuples()}


def _audit_purge(
    engine: Engine, user: str, plan: RetentionPlan, outcome: PurgeOutcome | None, studies: dict[str, str]
) -> None:
    """One ``operator`` audit record per series the purge deleted, skipped or failed on (none for a dry run)."""
    if outcome is None:
        return
    for item in outcome.purged:
        what = "images and results" if item.images and item.results else ("images" if item.images else "results")
        detail = f"purge of series {item.series_instance_uid}: its {what} deleted: {item.reason}"
        _audit_operator(engine, user, "success", detail, studies.get(item.series_instance_uid))
    for item, why in outcome.skipped:
        detail = f"purge of series {item.series_instance_uid} refused: {why}"
        _audit_operator(engine, user, "refused", detail, studies.get(item.series_instance_uid))
    for item, why in outcome.failed:
        detail = f"purge of series {item.series_instance_uid} failed: {why}"
        _audit_operator(engine, user, "failed", detail, studies.get(item.series_instance_uid))


def _show_purge(plan: RetentionPlan, outcome: PurgeOutcome | None, dry_run: bool) -> None:
    """The purge table and its summary lines; exit 1, each reason on stderr, if a series' files could not go."""
    from dicom_node.retention import plan_rows, plan_summary

    if plan.items:
        table = Table(title="would purge (dry run: nothing deleted)" if dry_run else "purged")
        for column in ("series instance UID", "state", "age", "purges", "size", "reason"):
            table.add_column(column, overflow="fold")
        for row in plan_rows(plan, outcome):
            table.add_row(*(_peer(cell) for cell in row))
        console.print(table)
    for line in plan_summary(plan, outcome):
        console.print(line, highlight=False)
    for _item, why in outcome.failed if outcome else []:
        errors.print(_peer(why), highlight=False)
    if outcome and outcome.failed:
        raise typer.Exit(1)


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[
        str, typer.Option(help="viewer (reads every page) or operator (may also retry, re-route, cancel).")
    ] = "viewer",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Hash a password (argon2id) and print the console.users entry to paste into config.yaml."""
    import yaml

    from dicom_node.console.auth import hash_password

    if role not in ("viewer", "operator"):
        errors.print(f"unknown role {role!r}: use viewer or operator")
        raise typer.Exit(2)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        errors.print("the password is too short: use at least 8 characters")
        raise typer.Exit(2)
    entry = {"console": {"users": {name: {"password_hash": hash_password(password), "role": role}}}}
    console.print("# add under console.users in config.yaml, then restart `dicom-node serve`:", highlight=False)
    console.print(yaml.safe_dump(entry, sort_keys=False).rstrip(), highlight=False, soft_wrap=True)


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    show_secrets: Annotated[
        bool, typer.Option("--show-secrets", help="Print secrets too: password hashes, keys, tokens, passwords.")
    ] = False,
) -> None:
    """Print the effective configuration (file, environment and defaults merged), secrets hidden."""
    settings = _settings(config)
    sys.stdout.write(dump_settings(settings) if show_secrets else _visible_settings(settings))


def _visible_settings(settings: Settings) -> str:
    """The configuration as YAML with every secret hidden, as the console's configuration page shows it."""
    import yaml

    from dicom_node.console.queries import visible_config

    data = visible_config(settings)
    if settings.database.url:  # its password may hold '@', '/' or spaces, which URL parsers misread
        data["database"]["url"] = hide_url_password(settings.database.url)
    return yaml.safe_dump(data, sort_keys=False)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration; exit 2 with the problems if it is wrong."""
    from dicom_node.admission import models_over_memory

    settings = _settings(config)
    problem = _database_url_problem(settings.database_url)
    if problem is not None:
        from dicom_node.service import describe_database_error

        reason = describe_database_error(problem, settings.database_url)
        errors.print(f"[bold red]configuration error[/]\n{escape(reason)}", highlight=False)
        raise typer.Exit(2)
    console.print(
        f"configuration is valid: AE {settings.network.ae_title} on port {settings.network.port}, "
        f"{len(settings.rules)} rule(s), {len(settings.destinations)} destination(s)",
        highlight=False,
    )
    for warning in [*_models_without_weights(settings), *models_over_memory(settings)]:
        console.print(f"warning: {escape(warning)}", highlight=False)


def _models_without_weights(settings: Settings) -> list[str]:
    """A sentence per TotalSegmentator model whose weights are not installed where it looks, or hold a dataset.json
    or plans.json nnU-Net cannot read (every series sent to it would fail), naming the folder or file and the
    commands that install them.

    With ``inference.workers`` 0 this host runs no worker: the sentence says the weights matter only where
    ``dicom-node worker`` runs with this configuration (the GPU hosts of a scale-out), not that series fail."""
    from inference.models.checkpoints import description_problem
    from inference.weights import WeightsMissing, model_folders

    consequence = (
        "Until then every series sent to it fails."
        if settings.inference.workers
        else "This host runs no workers (inference.workers is 0): install them where `dicom-node worker` runs with "
        "this configuration; there, until then, every series sent to it fails."
    )
    sentences = []
    for name, model in settings.models.items():
        if model.kind != "totalsegmentator":
            continue
        folder = model.weights_directory or settings.weights_directory
        target = f" --model {name}" if model.weights_directory else ""
        try:
            found = model_folders(model.task, folder, model=name if model.weights_directory else None)
            unreadable = next(filter(None, (description_problem(f.path) for f in found)), None)
        except WeightsMissing as exc:
            sentences.append(f"model {name!r} cannot be loaded on this host: {exc} {consequence}")
        except OSError as exc:
            sentences.append(f"model {name!r} cannot be loaded: {_describe_os_error(exc)}.")
        else:
            if unreadable is not None:
                sentences.append(
                    f"model {name!r} cannot be loaded on this host: {unreadable}; import the release zip again with "
                    f"`dicom-node weights import FILE.zip{target}`, which replaces that folder. {consequence}"
                )
    return sentences


def _ago(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = int((datetime.now(timezone.utc) - moment).total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")
