"""Durable storage details: the file meta encoding and atomic writes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from dicom_node.receive.storage import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    InstanceStore,
    encode_file_meta,
)


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


def test_uids_that_are_not_uids_never_become_paths(tmp_path):
    store = InstanceStore(tmp_path)
    with pytest.raises(ValueError, match="not a valid UID"):
        store.path_for("1.2.3", "../../etc", "1.2.3.4")
