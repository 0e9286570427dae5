"""The `dicom-node` command line (typer)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from db import jobs
from db.models import Instance, Job, JobState, RejectedInstance, Series
from dicom_node.config import ConfigError, Settings, dump_settings, load_settings
from dicom_node.logs import configure_logging
from dicom_node.privacy import keep_new_files_private, loose_permissions

if TYPE_CHECKING:
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

# Piped output (logs, scripts, tests) gets wide lines instead of rich's default 80 columns.
console = Console(width=None if sys.stdout.isatty() else 240)
errors = Console(stderr=True, soft_wrap=True)

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
        errors.print(f"[bold red]configuration error[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def _session(settings: Settings, *, write: bool = False) -> Iterator[Session]:
    """A session on the node's existing database; operator commands never create or migrate one."""
    from sqlalchemy.engine import make_url

    from db.session import make_engine, make_session_factory

    url = settings.database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        errors.print(f"no database at {parsed.database}: has `dicom-node serve` run with this configuration?")
        raise typer.Exit(1)
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        if write:
            with session.begin():
                yield session
        else:
            yield session


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: Storage SCP and series watcher, until SIGTERM/SIGINT."""
    from dicom_node.service import serve as run_service

    settings = _settings(config)
    configure_logging(settings.logging.level, settings.logging.format)
    _warn_about_loose_permissions(settings.storage.directory)
    try:
        run_service(settings)
    except OSError as exc:
        errors.print(f"[bold red]cannot start[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None


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
    from dicom_node.worker import run_worker

    run_worker(_settings(config), name=name)


@app.command()
def status(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="Most recent series to show.")] = 20,
    state: Annotated[JobState | None, typer.Option(help="Only series in this state.")] = None,
) -> None:
    """A table of recent series and their states."""
    settings = _settings(config)
    with _session(settings) as session:
        query = select(Job).options(selectinload(Job.series).selectinload(Series.study))
        if state:
            query = query.where(Job.state == state)
        rows = list(session.scalars(query.order_by(Job.state_changed_at.desc()).limit(limit)))
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        by_status = select(func.count()).select_from(RejectedInstance)
        rejected = session.scalar(by_status.where(RejectedInstance.status != 0)) or 0
        set_aside = session.scalar(by_status.where(RejectedInstance.status == 0)) or 0  # acknowledged, kept apart
        delivered = {job.id: _delivery_summary(session, job) for job in rows}
    table = Table(title=f"Series on {settings.network.ae_title}", expand=False)
    for column in ("series instance UID", "modality", "description", "images", "state", "since", "reason", "warnings"):
        table.add_column(column, overflow="fold")
    table.add_column("delivered (files per destination)", overflow="fold")
    for job in rows:
        series = job.series
        table.add_row(
            series.series_instance_uid,
            series.modality or "",
            series.series_description or "",
            str(series.instance_count),
            job.state.value,
            _ago(job.state_changed_at),
            job.reason or "",
            _warnings_cell(job.warnings),
            delivered[job.id],
        )
    console.print(table)
    summary = ", ".join(f"{s.value} {counts[s]}" for s in JobState if counts.get(s)) or "no series yet"
    aside = f"; copies set aside: {set_aside}" if set_aside else ""
    console.print(f"{summary}; refused instances: {rejected}{aside}", highlight=False)


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
    settings = _settings(config)
    with _session(settings) as session:
        job = jobs.job_for_series_uid(session, series_instance_uid)
        if job is None:
            errors.print(f"no series {series_instance_uid} on this node")
            raise typer.Exit(1)
        series = job.series
        console.print(f"series   {series.series_instance_uid}", highlight=False)
        console.print(f"study    {series.study.study_instance_uid}", highlight=False)
        console.print(f"modality {series.modality}  images {series.instance_count}  from {series.calling_ae_title}")
        console.print(f"state    {job.state.value}  ({job.reason})", highlight=False)
        if job.model_name:
            console.print(f"model    {job.model_name} (rule {job.rule_name}) -> {', '.join(job.destinations or [])}")
        if job.timings:
            stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in job.timings.items())
            console.print(f"timings  {stages}", highlight=False)
        if job.state is JobState.PROCESSING and job.stage:
            console.print(f"stage    {job.stage}", highlight=False)
        if job.worker_deaths:
            console.print(f"workers  died {job.worker_deaths} time(s) on this series", highlight=False)
        for warning in job.warnings or []:
            console.print(f"warning  {warning}", highlight=False)
        if job.result_path:
            console.print(f"results  {job.result_path}", highlight=False)
            made_by = _made_by(Path(job.result_path))
            if made_by:
                console.print(f"made by  {made_by}", highlight=False)
        results = select(Series).where(Series.source_job_id == job.id).order_by(Series.id)
        for result in session.scalars(results):
            superseded = (
                f"  (superseded {result.superseded_at.isoformat(timespec='seconds')})" if result.superseded_at else ""
            )
            console.print(
                f"  {result.modality:<8} {result.series_instance_uid}  {result.series_description or ''}{superseded}",
                highlight=False,
            )
        _print_deliveries(session, job)
        if series.purged_at is not None:
            console.print(f"purged   {series.purged_at.isoformat(timespec='seconds')} by retention", highlight=False)
        table = Table("at", "from", "to", "reason")
        for event in job.events:
            table.add_row(
                event.at.isoformat(timespec="seconds"),
                event.from_state.value if event.from_state else "",
                event.to_state.value,
                event.reason or "",
            )
        console.print(table)
        first_file = session.scalars(select(Instance.path).where(Instance.series_id == series.id).limit(1)).first()
        if first_file:
            console.print(f"files    {Path(first_file).parent}", highlight=False)


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
    """``pacs 2/2, planner 0/1``: files each destination has accepted, once sending has begun."""
    if not job.deliveries:
        return ""
    return ", ".join(p.summary() for p in jobs.delivery_progress(session, job))


def _print_deliveries(session: Session, job: Job) -> None:
    """Per destination: files accepted, attempts, and per file when it was delivered or the last error."""
    if not job.deliveries:
        return
    for progress in jobs.delivery_progress(session, job):
        attempts = f"{progress.attempts} attempt{'s' if progress.attempts != 1 else ''}"
        if progress.unreachable_since is not None:
            attempts += f"; unreachable since {progress.unreachable_since.isoformat()[:16]}"
        retry_at = f"; next try {progress.next_attempt_at.isoformat()[:19]}" if progress.next_attempt_at else ""
        console.print(f"sent to  {progress.summary()} files ({attempts}{retry_at})", highlight=False)
        if progress.planned is None:
            console.print(
                f"  nothing sent yet: {progress.last_error or 'waiting for its first attempt'}", highlight=False
            )
        for uid, path in (progress.planned or {}).items():
            delivery = progress.delivered.get(uid)
            if delivery is not None:
                line = f"delivered {delivery.delivered_at.isoformat(timespec='seconds')}"
            else:
                line = f"not delivered: {progress.last_error}" if progress.last_error else "not delivered yet"
            console.print(f"  {Path(path).name:<18} {uid}  {line}", highlight=False)


@app.command()
def retry(series_instance_uid: str, config: ConfigOption = None) -> None:
    """Resend only the files a destination lacks (back to SENDING), or route a FAILED/IGNORED/DONE series again."""
    settings = _settings(config)
    try:
        with _session(settings, write=True) as session:
            job = jobs.job_for_series_uid(session, series_instance_uid, lock=True)  # as the console does
            if job is None:
                errors.print(f"no series {series_instance_uid} on this node")
                raise typer.Exit(1)
            try:
                jobs.retry(session, job)
            except jobs.InvalidTransition as exc:
                errors.print(f"cannot retry: {exc}")
                raise typer.Exit(1) from None
    except StaleDataError:
        errors.print(
            f"cannot retry: series {series_instance_uid} changed state while the retry was made, so nothing was "
            "changed; see `dicom-node show` and retry again if it is still needed"
        )
        raise typer.Exit(1) from None
    console.print(
        f"series {series_instance_uid} is {job.state.value} again; the running node carries on within seconds"
    )


@app.command()
def rejected(config: ConfigOption = None, limit: Annotated[int, typer.Option()] = 20) -> None:
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
            row.calling_ae_title or "",
            f"0x{row.status:04X}",
            row.series_instance_uid or "",
            row.sop_instance_uid or "",
            row.reason,
            row.path or "",
        )
    console.print(table)


@app.command()
def audit(
    config: ConfigOption = None,
    hours: Annotated[float | None, typer.Option(help="Only the last N hours.")] = None,
    peer: Annotated[str | None, typer.Option(help="Only this peer AE title.")] = None,
    action: Annotated[
        list[str] | None, typer.Option(help="association, store, find, move, get, send, echo or console (repeatable).")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many records, newest first.")] = 100,
) -> None:
    """The audit trail: who did what, from where, to which study, and the outcome (no patient data)."""
    from datetime import timedelta

    from dicom_node.audit import ACTIONS, recent

    unknown = [a for a in action or [] if a not in ACTIONS]
    if unknown:
        errors.print(f"unknown action {', '.join(unknown)} (known: {', '.join(ACTIONS)})")
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
            row.action,
            row.peer_ae_title or "",
            row.peer_address or "",
            row.study_instance_uid or "",
            row.outcome,
            str(row.instances),
            row.detail or "",
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
            errors.print(f"unknown destination {destination!r} (known: {known})")
            raise typer.Exit(2)
        host, port, ae_title = peer.host, peer.port, peer.ae_title
    if not (host and port and ae_title):
        errors.print("give a destination name, or --host, --port and --ae-title")
        raise typer.Exit(2)
    tls_args = client_tls(settings.destinations[destination], settings.network.tls) if destination else None
    calling = calling_ae_title or settings.network.ae_title
    result = verify(calling, ae_title, host, port, timeout=timeout, tls_args=tls_args)
    if result.ok:
        console.print(f"C-ECHO {ae_title}@{host}:{port}: success ({result.seconds * 1000:.0f} ms)", highlight=False)
    else:
        errors.print(f"C-ECHO {ae_title}@{host}:{port}: FAILED: {result.message}", highlight=False)
        raise typer.Exit(1)


@weights_app.command("list")
def weights_list(config: ConfigOption = None) -> None:
    """Which TotalSegmentator tasks have all their weights, in the weights folder and in each model's own folder."""
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
            console.print(f"  {task:<11} {'installed' if present else 'missing'}", highlight=False)


@weights_app.command("download")
def weights_download(
    config: ConfigOption = None,
    task: Annotated[str, typer.Option(help="total (five 1.5 mm models) or total_fast (one 3 mm model).")] = "total",
) -> None:
    """Download a task's weights from TotalSegmentator's releases (needs network access)."""
    from inference.weights import download

    settings = _settings(config)
    try:
        folders = download(task, settings.weights_directory)
    except Exception as exc:  # noqa: BLE001 - network, disk, or missing package: say which
        errors.print(f"download failed: {exc}", highlight=False)
        raise typer.Exit(1) from None
    for folder in folders:
        console.print(f"installed {folder}", highlight=False)


@weights_app.command("import")
def weights_import(
    archive: Path,
    config: ConfigOption = None,
    sha256: Annotated[
        str | None, typer.Option(help="The release's published SHA-256; a different file is refused.")
    ] = None,
) -> None:
    """Unpack a TotalSegmentator weights zip (carried to an offline machine) into the weights folder.

    Every checkpoint is read as data only before anything is installed; a file that would
    run code when loaded is refused. The installed files' SHA-256 are recorded and checked
    each time a model loads.
    """
    from inference.weights import WeightsCorrupt, import_zip

    settings = _settings(config)
    try:
        added = import_zip(archive, settings.weights_directory, sha256=sha256)
    except (OSError, ValueError, WeightsCorrupt) as exc:
        errors.print(f"import failed: {exc}", highlight=False)
        raise typer.Exit(1) from None
    for folder in added:
        console.print(f"imported {folder}", highlight=False)


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
    from dicom_node.phantom import PhantomSpec, write_phantom_series

    if multiframe not in (None, "enhanced", "legacy"):
        errors.print(f"cannot write phantom: --multiframe is 'enhanced' or 'legacy', not {multiframe!r}")
        raise typer.Exit(2)
    spacing = 0.8 * 512 / size
    try:
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
    except (ValueError, RuntimeError, LookupError) as exc:
        errors.print(f"cannot write phantom: {exc}")
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
        errors.print(
            f"[bold red]demo failed[/] at: {exc}\nnode log: {output.resolve() / 'node' / 'node.log'}", highlight=False
        )
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


@app.command()
def purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be purged; delete nothing.")] = False,
    days: Annotated[float | None, typer.Option(help="Instead of retention.days.")] = None,
    results_days: Annotated[float | None, typer.Option(help="Instead of retention.results_days.")] = None,
    max_disk_gigabytes: Annotated[float | None, typer.Option(help="Instead of retention.max_disk_gigabytes.")] = None,
    series: Annotated[
        str | None,
        typer.Option(
            help="Purge this one finished series' images and results now, whatever its age (e.g. after a PACS "
            "correction, so the corrected series can be received)."
        ),
    ] = None,
) -> None:
    """Purge images and results of finished series by the retention settings (--dry-run: only show what)."""
    from pydantic import ValidationError

    from db.session import make_session_factory
    from dicom_node.config import RetentionSettings
    from dicom_node.retention import apply_plan, plan_retention, plan_series_purge

    settings = _settings(config)
    if series is not None:
        with _session(settings) as session:
            try:
                plan = plan_series_purge(session, series)
            except LookupError as exc:
                errors.print(str(exc), highlight=False)
                raise typer.Exit(1) from None
            sessions = make_session_factory(session.get_bind())
        _show_purge(plan, None if dry_run else apply_plan(sessions, settings, plan), dry_run)
        return
    overrides = {"days": days, "results_days": results_days, "max_disk_gigabytes": max_disk_gigabytes}
    try:
        retention = RetentionSettings.model_validate(
            {**settings.retention.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        errors.print(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}", highlight=False)
        raise typer.Exit(2) from None
    if not retention.enabled:
        console.print(
            "retention is not configured (retention.days, retention.results_days, "
            "retention.max_disk_gigabytes, or --days/--results-days/--max-disk-gigabytes): nothing to purge"
        )
        return
    with _session(settings) as session:
        plan = plan_retention(session, retention)
        sessions = make_session_factory(session.get_bind())
    _show_purge(plan, None if dry_run else apply_plan(sessions, settings, plan), dry_run)


def _show_purge(plan: RetentionPlan, outcome: PurgeOutcome | None, dry_run: bool) -> None:
    """The purge table and its summary lines."""
    from dicom_node.retention import plan_rows, plan_summary

    if plan.items:
        table = Table(title="would purge (dry run: nothing deleted)" if dry_run else "purged")
        for column in ("series instance UID", "state", "age", "purges", "size", "reason"):
            table.add_column(column, overflow="fold")
        for row in plan_rows(plan, outcome):
            table.add_row(*row)
        console.print(table)
    for line in plan_summary(plan, outcome):
        console.print(line, highlight=False)


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
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file, environment and defaults merged)."""
    sys.stdout.write(dump_settings(_settings(config)))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration; exit 2 with the problems if it is wrong."""
    settings = _settings(config)
    console.print(
        f"configuration is valid: AE {settings.network.ae_title} on port {settings.network.port}, "
        f"{len(settings.rules)} rule(s), {len(settings.destinations)} destination(s)",
        highlight=False,
    )


def _ago(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = int((datetime.now(timezone.utc) - moment).total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")
