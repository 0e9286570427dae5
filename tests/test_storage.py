"""Durable storage details: the file meta encoding and atomic writes."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from dicom_node.receive import storage
from dicom_node.receive.storage import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    InstanceStore,
    encode_file_meta,
)
from tests.conftest import wait_for


def pydicom_file_meta(sop_class: str, sop_instance: str, syntax: str, source_ae: str | None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = BytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"])
@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4"])
@pytest.mark.parametrize("source_ae", [None, "PACS", "CT_SCANNER_01", "A"])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789"])
def test_file_meta_is_byte_identical_to_pydicoms_writer(syntax, sop_class, source_ae, sop_instance):
    assert encode_file_meta(sop_class, sop_instance, syntax, source_ae) == pydicom_file_meta(
        sop_class, sop_instance, syntax, source_ae
    )


def test_written_file_reads_back_and_leaves_no_partial(tmp_path):
    store = InstanceStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "PACS")
    data_set = b"\x08\x00\x60\x00CS\x02\x00CT"  # (0008,0060) Modality CS "CT"

    size = store.write(path, meta, data_set)

    assert size == path.stat().st_size
    dataset = dcmread(path)
    assert dataset.Modality == "CT" and dataset.file_meta.SourceApplicationEntityTitle == "PACS"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.5.dcm"]
    store.close()  # removes the spare files made ahead of writes
    assert list(store.incoming_dir.iterdir()) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_instance_files_are_written_synchronously_unless_fsync_is_off(tmp_path, monkeypatch, fsync):
    store = InstanceStore(tmp_path, fsync=fsync)
    modes: list[bool] = []
    real_writev = storage.os.writev

    def writev(descriptor: int, buffers: list[memoryview]) -> int:
        modes.append(bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DSYNC))
        return real_writev(descriptor, buffers)

    monkeypatch.setattr(storage.os, "writev", writev)
    store.write(store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5"), b"meta", b"data")  # no spare ready yet
    wait_for_spares(store)
    store.write(store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.6"), b"meta", b"data")  # into a spare
    store.close()

    assert modes == [fsync, fsync]  # one system call each, returning once the bytes are on disk


def wait_for_spares(store: InstanceStore, count: int = storage.SPARE_FILES) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spares = sorted(p.name for p in store.incoming_dir.glob(f"*{storage.SPARE_SUFFIX}"))
        if len(spares) == count:
            return spares
        time.sleep(0.01)
    raise AssertionError(f"expected {count} spare files, found {spares}")


def test_writes_take_spare_files_made_ahead_and_close_removes_the_rest(tmp_path):
    store = InstanceStore(tmp_path)
    first = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    store.write(first, b"meta", b"first")  # starts the thread that makes spares
    spares = wait_for_spares(store)

    temporary = store.write_temporary(b"meta", b"second")

    assert temporary.name in spares and temporary.read_bytes() == b"metasecond"
    second = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.6")
    store.install(temporary, second)
    assert second.read_bytes() == b"metasecond" and first.read_bytes() == b"metafirst"
    wait_for_spares(store)  # the one taken is replaced
    store.close()
    assert list(store.incoming_dir.iterdir()) == []


def test_spares_deleted_by_start_up_clean_up_are_never_handed_out(tmp_path):
    store = InstanceStore(tmp_path)
    store.write(store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5"), b"meta", b"first")
    wait_for_spares(store)

    assert store.remove_partial_files() == 0  # spares are deleted, and not counted as cut-off writes

    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.6")
    store.write(path, b"meta", b"second")  # its temporary file must still exist to be renamed
    assert path.read_bytes() == b"metasecond"
    store.close()


def test_writes_go_on_while_spare_files_cannot_be_made_and_spares_return_after(tmp_path, monkeypatch):
    real_open = os.open
    disk_full = threading.Event()
    disk_full.set()
    refused: list[str] = []

    def open_but_no_spares(path: object, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        if str(path).endswith(storage.SPARE_SUFFIX) and disk_full.is_set():
            refused.append(str(path))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_but_no_spares)
    store = InstanceStore(tmp_path)
    paths = [store.path_for("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(5)]

    for n, path in enumerate(paths):
        store.write(path, b"meta", f"instance {n}".encode())  # each into a file of its own
        if n == 0:
            wait_for(lambda: refused, timeout=10, interval=0.01, what="a refused spare file")  # then it waits

    assert [path.read_bytes() for path in paths] == [f"metainstance {n}".encode() for n in range(5)]
    assert list(store.incoming_dir.iterdir()) == []  # no spare, no partial file left behind
    disk_full.clear()
    store.write(store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.9"), b"meta", b"later")
    wait_for_spares(store)  # made again once the disk takes files
    store.close()
    assert list(store.incoming_dir.iterdir()) == []


def test_short_writes_are_continued_until_every_byte_is_written(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    meta, data_set = bytes(range(200)), bytes(range(255, 0, -1)) * 40

    def short_writev(descriptor: int, buffers: list[memoryview]) -> int:
        return os.write(descriptor, buffers[0][:7])  # a kernel may write less than asked

    monkeypatch.setattr(storage.os, "writev", short_writev)
    store.write(path, meta, data_set)

    assert path.read_bytes() == meta + data_set


def test_failed_write_leaves_no_temporary_file(tmp_path):
    store = InstanceStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")

    with pytest.raises(TypeError):
        store.write(path, b"meta", None)  # type: ignore[arg-type]  # fails after the file was opened

    store.close()  # removes the spare files made ahead of writes
    assert list(store.incoming_dir.iterdir()) == [] and not path.exists()


def test_every_write_gets_its_own_temporary_name(tmp_path):
    store = InstanceStore(tmp_path)
    names = {store.write_temporary(b"meta", b"same instance").name for _ in range(50)}
    assert len(names) == 50


def test_uids_that_are_not_uids_never_become_paths(tmp_path):
    store = InstanceStore(tmp_path)
    with pytest.raises(ValueError, match="not a valid UID"):
        store.path_for("1.2.3", "../../etc", "1.2.3.4")


def test_repair_indexes_files_missing_from_the_database_and_drops_partials(tmp_path):
    from sqlalchemy import select

    from db.models import Instance, Job, JobState
    from db.session import make_engine, make_session_factory, migrate
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from dicom_node.receive.storage import repair
    from tests.conftest import data_set_bytes

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    store = InstanceStore(tmp_path / "storage")
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=3))
    for source, uid in zip(
        series.files, series.sop_instance_uids, strict=True
    ):  # on disk, as if the commit was cut off
        meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1", "PACS")
        store.write(
            store.path_for(series.study_instance_uid, series.series_instance_uid, uid), meta, data_set_bytes(source)
        )
    partial = store.incoming_dir / "123-456-7.partial"
    partial.write_bytes(b"cut off")

    report = repair(store, sessions)

    assert (report.instances_indexed, report.partial_files_removed, report.unreadable_files) == (3, 1, 0)
    assert not partial.exists()
    with sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == set(series.sop_instance_uids)
        assert session.scalars(select(Job)).one().state is JobState.RECEIVING
    assert repair(store, sessions).instances_indexed == 0  # idempotent


def test_repair_finds_an_unrecorded_file_even_when_the_folder_count_matches_the_database(tmp_path):
    from sqlalchemy import select

    from db.models import Instance
    from db.session import make_engine, make_session_factory, migrate
    from dicom_node.phantom import PhantomSpec, write_phantom_series
    from dicom_node.receive.storage import repair
    from tests.conftest import data_set_bytes

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    sessions = make_session_factory(make_engine(url))
    store = InstanceStore(tmp_path / "storage")
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))

    def put(source, uid):
        meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1", "PACS")
        path = store.path_for(series.study_instance_uid, series.series_instance_uid, uid)
        store.write(path, meta, data_set_bytes(source))
        return path

    paths = [put(source, uid) for source, uid in zip(series.files[:3], series.sop_instance_uids[:3], strict=True)]
    assert repair(store, sessions).instances_indexed == 3
    paths[0].unlink()  # a recorded file gone, and one more on disk that was never recorded: the count still matches
    put(series.files[3], series.sop_instance_uids[3])

    assert repair(store, sessions).instances_indexed == 1
    with sessions() as session:
        assert series.sop_instance_uids[3] in set(session.scalars(select(Instance.sop_instance_uid)))


def test_two_copies_of_one_instance_arriving_at_once_keep_the_first_and_its_description(tmp_path, monkeypatch):
    """Both copies found the name free; the second used to rename itself over the first while the database kept
    the first's size (other calling AE title in the file meta), so retrievals refused the file as damaged."""
    from dataclasses import replace

    from dicom_node.receive.scp import _as_stored
    from tests.conftest import ct_instance

    store = InstanceStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    data_set = b"\x08\x00\x60\x00CS\x02\x00CT"
    first = store.write_temporary(
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "PACS"), data_set
    )
    second = store.write_temporary(
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "PACS_ROUTER"), data_set
    )

    assert store.install_new(first, path) and not store.install_new(second, path)
    assert dcmread(path).file_meta.SourceApplicationEntityTitle == "PACS"

    described_by_second = replace(
        ct_instance("1.2.3.4.5", "1.2.3.4"), path=str(path), size_bytes=1, transfer_syntax_uid="1.2"
    )
    as_stored = _as_stored(described_by_second, path)
    assert (as_stored.size_bytes, as_stored.transfer_syntax_uid) == (path.stat().st_size, "1.2.840.10008.1.2.1")

    monkeypatch.setattr(storage.os, "link", lambda *_: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    other = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.6")  # a file system without hard links: a rename
    assert store.install_new(second, other) and dcmread(other).file_meta.SourceApplicationEntityTitle == "PACS_ROUTER"
    third = store.write_temporary(
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.6", "1.2.840.10008.1.2.1", "X"), data_set
    )
    assert not store.install_new(third, other)  # the name is taken: the first copy stays there too
    assert dcmread(other).file_meta.SourceApplicationEntityTitle == "PACS_ROUTER"
