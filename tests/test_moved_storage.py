"""A storage folder moved with its database, or named by another path, keeps every image and result it holds.

The database records each file by its full path. A folder moved between two runs (or named once through a
symbolic link, then by its real path) must not turn the stored images into "copies" of themselves: nothing goes
to quarantine, Query/Retrieve serves the CT and its results, and `show` finds the results where they are.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import record_rejection
from db.models import Delivery, Instance, Job, JobState, RejectedInstance, Series
from db.results import DeliveryRecord, ResultFile, ResultKind
from db.session import make_engine, make_session_factory, migrate, transaction
from dicom_node.receive.moved_storage import adopt_moved_storage
from dicom_node.receive.storage import InstanceStore, repair
from tests.conftest import CT_RULES, Node, free_port, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

STUDY = "2.25.181289405392637101862377390153474283901"
SERIES = "2.25.246318707963587232926812744009802611277"


@pytest.fixture
def ct_files(shared_fixtures: Path) -> list[Path]:
    return sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[int]:
    """A DCMTK storescp that takes the node's results."""
    port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)


def send(node: Node, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """C-STORE with DCMTK storescu, proposing the fixture's JPEG 2000 transfer syntax."""
    return storescu(node.port, files, extra=["-xv"])


def node_settings(pacs_port: int) -> dict[str, object]:
    rules = [{**CT_RULES[0], "destinations": ["pacs"]}]
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "send": ["seg", "sr"]}
    return {"rules": rules, "destinations": {"pacs": destination}, "inference": {"workers": 1}}


def process_once(workdir: Path, settings: dict[str, object], files: list[Path]) -> None:
    """Run a node in ``workdir`` until the CT's results are delivered, then stop it cleanly."""
    node = Node(workdir, settings).start()
    try:
        assert send(node, files).returncode == 0
        node.wait_for_state(SERIES, JobState.DONE, timeout=180)
    finally:
        node.stop()


def get_study(node: Node, into: Path) -> Counter[str]:
    """C-GET the study with DCMTK getscu; the modalities of what came back."""
    into.mkdir()
    command = [require_tool("getscu"), "-S", "-aet", "PLANNER", "-aec", node.ae_title, "-od", str(into)]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}", "127.0.0.1", str(node.port)]
    subprocess.run(command, capture_output=True, text=True, timeout=120)
    return Counter(str(pydicom.dcmread(path, stop_before_pixels=True).Modality) for path in into.iterdir())


def instance_counts(node: Node) -> dict[str, int]:
    with node.sessions() as session:
        rows = session.execute(select(Series.series_instance_uid, Series.instance_count))
        return {str(uid): int(count) for uid, count in rows}


def recorded_paths(node: Node) -> list[str]:
    """Every path the database records, in every table that holds one."""
    with node.sessions() as session:
        paths = [*session.scalars(select(Instance.path)), *session.scalars(select(Delivery.path))]
        paths += [path for path in session.scalars(select(RejectedInstance.path)) if path]
        for job in session.scalars(select(Job)):
            paths += [job.result_path or "", *(f.path for f in job.result_files or [])]
            for record in (job.deliveries or {}).values():
                paths += [*(record.files or {}).values(), *record.sent]
    return paths


@pytest.mark.parametrize(
    "renamed",
    [
        "moved to another folder",
        # nightly: the default run checks a folder named through a link at start-up repair directly (below)
        pytest.param("named through a symbolic link, then its real path", marks=pytest.mark.nightly),
    ],
)
def test_a_storage_folder_by_another_path_keeps_its_images_and_results(renamed, tmp_path, ct_files, pacs):
    settings = node_settings(pacs)
    if renamed.startswith("moved"):
        first, second = tmp_path / "a", tmp_path / "b"
        process_once(first, settings, ct_files)
        first.rename(second)
    else:
        first, second = tmp_path / "link", tmp_path / "real"
        second.mkdir()
        first.symlink_to(second)
        process_once(first, settings, ct_files)
    node = Node(second, settings)
    node.log_path = second / "after.log"
    node.start()
    try:
        wait_for(lambda: "node.storage_checked" in node.log(), what="the start-up check of the storage folder")
        assert list(node.storage.joinpath("quarantine").iterdir()) == []
        assert len(list(node.storage.joinpath("instances", STUDY, SERIES).iterdir())) == len(ct_files)
        log = node.log()
        assert "repair.set_aside_file" not in log
        assert f"repair.storage_moved old_directory={first / 'storage'} directory={second / 'storage'}" in log
        paths = recorded_paths(node)
        assert len(paths) > len(ct_files) and all(path.startswith(f"{second / 'storage'}/") for path in paths)
        assert all(Path(path).exists() for path in paths)

        assert get_study(node, tmp_path / "got") == Counter({"CT": len(ct_files), "SEG": 1, "SR": 1})
        shown = node.cli("show", SERIES)
        assert f"results  {second / 'storage' / 'jobs'}" in shown.stdout and "(deleted)" not in shown.stdout

        assert send(node, ct_files).returncode == 0  # sent again: the same images, kept once
        node.wait_for_state(SERIES, JobState.DONE, timeout=60)
        assert list(node.storage.joinpath("quarantine").iterdir()) == []
        node.stop()
        node.start()  # nothing left to rewrite
        wait_for(lambda: node.log().count("node.storage_checked") == 2, what="the second start-up check")
        assert node.log().count("repair.storage_moved") == 1
    finally:
        node.stop()


def stored_in(root: Path, files: list[Path], database_url: str) -> tuple[InstanceStore, sessionmaker[Session]]:
    """The CT's files in a storage folder at ``root``, recorded by start-up repair in ``database_url``."""
    migrate(database_url)
    sessions = make_session_factory(make_engine(database_url))
    store = InstanceStore(root)
    for source in files:
        header = pydicom.dcmread(source, stop_before_pixels=True)
        path = store.path_for(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
    assert repair(store, sessions).instances_indexed == len(files)
    return store, sessions


def test_start_up_repair_lets_a_file_take_the_place_of_a_recorded_file_that_is_gone(tmp_path, ct_files, database_url):
    """Rows naming files that are gone (here: a folder moved, repaired without the rewrite of its paths) never
    send the files on disk to quarantine: each takes its row's place."""
    _, sessions = stored_in(tmp_path / "a", ct_files, database_url)
    (tmp_path / "a").rename(tmp_path / "b")
    second = InstanceStore(tmp_path / "b")

    report = repair(second, sessions)

    assert report.duplicates_quarantined == 0 and list(second.quarantine_dir.iterdir()) == []
    with sessions() as session:
        paths = list(session.scalars(select(Instance.path)))
        assert session.scalars(select(RejectedInstance)).all() == []
    assert len(paths) == len(ct_files) and all(
        Path(path).parent.parent.parent == second.instances_dir for path in paths
    )
    assert all(Path(path).exists() for path in paths)


def test_start_up_repair_never_sets_aside_a_file_recorded_by_another_name_of_its_folder(
    tmp_path, ct_files, database_url
):
    """Recorded through a symbolic link, found by the folder's real path (as a receiver's journal left from before
    the rename names it): the same file, so it stays where it is."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _, sessions = stored_in(tmp_path / "link", ct_files, database_url)
    real = InstanceStore(tmp_path / "real")

    report = repair(real, sessions)

    assert report.duplicates_quarantined == 0 and list(real.quarantine_dir.iterdir()) == []
    assert len(list(real.instances_dir.glob("*/*/*.dcm"))) == len(ct_files)


def test_every_recorded_path_follows_the_folder_once(tmp_path, ct_files, database_url, caplog):
    """Instances, quarantine rows, result files, delivery plans and delivered files: one rewrite, then none."""
    store, sessions = stored_in(tmp_path / "old folder_%", ct_files, database_url)  # LIKE's wildcards in its name
    results = store.root / "jobs" / "1"
    results.mkdir(parents=True)
    seg, refused = results / "seg-binary.dcm", store.quarantine_dir / "refused.dcm"
    seg.write_bytes(b"seg")
    refused.write_bytes(b"refused")
    with transaction(sessions) as session:
        job = session.scalars(select(Job)).one()
        job.result_path, job.reason = str(results), f"segmented; results in {results}"
        job.result_files = [ResultFile(ResultKind.SEG, str(seg), "BINARY")]
        job.deliveries = {"pacs": DeliveryRecord(files={"1.2.3": str(seg)}, sent=[str(seg)])}
        session.add(
            Delivery(
                job_id=job.id,
                destination="pacs",
                sop_instance_uid="1.2.3",
                sop_class_uid="1.2",
                path=str(seg),
                status=0,
            )
        )
        record_rejection(
            session,
            status=0xA900,
            reason="refused",
            path=str(refused),
            sop_instance_uid=None,
            sop_class_uid=None,
            transfer_syntax_uid=None,
            calling_ae_title=None,
        )
    new = tmp_path / "new"
    store.root.rename(new)

    caplog.set_level(logging.WARNING)
    moved = adopt_moved_storage(new, sessions)

    assert [(m.old, m.new) for m in moved] == [(str(store.root), str(new))]
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.result_path == str(new / "jobs" / "1") and job.reason == f"segmented; results in {job.result_path}"
        assert [f.path for f in job.result_files or []] == [str(new / "jobs" / "1" / "seg-binary.dcm")]
        plan = (job.deliveries or {})["pacs"]
        assert plan.files == {"1.2.3": str(new / "jobs" / "1" / "seg-binary.dcm")} and plan.sent == list(
            plan.files.values()
        )
        paths = [*session.scalars(select(Instance.path)), *session.scalars(select(Delivery.path))]
        paths += [p for p in session.scalars(select(RejectedInstance.path)) if p]
    assert len(paths) == len(ct_files) + 2 and all(
        Path(path).is_relative_to(new) and Path(path).exists() for path in paths
    )
    (logged,) = [r.event_fields for r in caplog.records if r.getMessage() == "repair.storage_moved"]  # type: ignore[attr-defined]
    assert (logged["old_directory"], logged["directory"]) == (str(store.root), str(new))
    assert f"in {store.root}, and they are now in the storage folder {new}" in logged["note"]
    assert adopt_moved_storage(new, sessions) == []  # nothing left to rewrite


def test_rows_of_a_folder_whose_files_are_elsewhere_are_left_alone(tmp_path, ct_files, database_url):
    """Another folder's rows are rewritten only when its files are in the current folder."""
    store, sessions = stored_in(tmp_path / "a", ct_files, database_url)
    assert adopt_moved_storage(tmp_path / "empty", sessions) == []
    with sessions() as session:
        assert all(Path(path).is_relative_to(store.root) for path in session.scalars(select(Instance.path)))


def test_a_copy_in_another_series_takes_the_place_of_a_recorded_file_that_is_gone(tmp_path, ct_files):
    """The README's promise: the same SOP Instance UID received under another series while the recorded file has
    gone missing from disk is not quarantined: it is the only copy left, recorded in the series it names."""
    node = Node(tmp_path / "node", {}).start()
    try:
        assert send(node, ct_files).returncode == 0
        wait_for(lambda: instance_counts(node).get(SERIES) == len(ct_files), what="the series recorded")
        lost = pydicom.dcmread(ct_files[0])
        with node.sessions() as session:
            recorded = session.scalars(select(Instance.path).where(Instance.sop_instance_uid == lost.SOPInstanceUID))
            Path(recorded.one()).unlink()  # the stored file is gone from disk
        lost.SeriesInstanceUID = corrected = generate_uid()
        resent = tmp_path / "resent.dcm"
        lost.save_as(resent)

        assert send(node, [resent]).returncode == 0
        wait_for(lambda: node.job_state(corrected) is not None, what="the copy recorded in the series it names")

        assert list(node.storage.joinpath("quarantine").iterdir()) == []
        with node.sessions() as session:
            (row,) = session.scalars(select(Instance).where(Instance.sop_instance_uid == lost.SOPInstanceUID))
            assert row.series.series_instance_uid == corrected and Path(row.path).exists()
        assert instance_counts(node) == {SERIES: len(ct_files) - 1, corrected: 1}
        assert "recorder.replaced_missing_file" in node.log()
    finally:
        node.stop()
