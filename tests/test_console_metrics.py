"""/metrics after a real run: the counters and histograms match what happened, and the text parses."""

from __future__ import annotations

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from db.models import Instance, JobState
from tests.conftest import free_port
from tests.console_helpers import METRICS_TOKEN, console_node, send_phantom

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the Prometheus text format."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _send_with_invalid_series_uid(port: int, source: str) -> int:
    """C-STORE one instance whose SeriesInstanceUID is not a UID (the node refuses it with 0xA900)."""
    dataset = pydicom.dcmread(source)
    dataset.SeriesInstanceUID = "1.2.abc"
    dataset.SOPInstanceUID = generate_uid()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(dataset)
    assoc.release()
    return int(status.Status)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_metrics_count_what_one_processed_and_delivered_series_did(tmp_path):
    metrics_port = free_port()
    with console_node(tmp_path, metrics_port=metrics_port) as running:
        series = send_phantom(running.node, tmp_path / "ct")
        running.node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
        assert _send_with_invalid_series_uid(running.node.port, str(series.files[0])) == 0xA900
        with running.node.sessions() as session:
            stored = session.scalar(select(func.count(Instance.id)))
        text = httpx.get(f"{running.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        separate = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")  # the separate listener needs no token
        separate_ready = httpx.get(f"http://127.0.0.1:{metrics_port}/readyz").json()

    metrics = _samples(text)
    assert metrics[("dicom_node_instances_received_total", ())] == 24
    assert metrics[("dicom_node_instances_stored", ())] == stored  # the CT and the node's own SEG and SR
    refused = (("reason", "SeriesInstanceUID"), ("status", "0xA900"))
    assert metrics[("dicom_node_instances_refused_total", refused)] == 1
    assert metrics[("dicom_node_associations_total", (("outcome", "released"),))] >= 2
    assert metrics[("dicom_node_jobs", (("state", "DONE"),))] == 1
    assert metrics[("dicom_node_jobs", (("state", "FAILED"),))] == 0
    assert metrics[("dicom_node_queue_depth", ())] == 0
    for stage in ("receive", "complete", "infer", "encode", "dispatch"):
        labels = (("stage", stage),)
        assert metrics[("dicom_node_stage_duration_seconds_count", labels)] == 1, stage
        assert metrics[("dicom_node_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == 1
    for stage in ("infer", "encode", "dispatch", "complete"):
        assert metrics[("dicom_node_stage_duration_seconds_sum", (("stage", stage),))] > 0, stage
    end_to_end = metrics[("dicom_node_end_to_end_seconds_sum", (("path", "delivered"),))]
    assert metrics[("dicom_node_end_to_end_seconds_count", (("path", "delivered"),))] == 1
    # from the last image to the PACS' acceptance covers completion, inference, encoding and sending
    covered = sum(
        metrics[("dicom_node_stage_duration_seconds_sum", (("stage", s),))] for s in ("complete", "infer", "encode")
    )
    assert end_to_end >= covered
    assert metrics[("dicom_node_dispatch_attempts_total", (("destination", "pacs"), ("outcome", "success")))] == 1
    assert metrics[("dicom_node_dispatch_files_accepted_total", (("destination", "pacs"),))] == 2
    assert metrics[("dicom_node_workers_up", ())] == 1
    assert metrics[("dicom_node_workers_busy", ())] == 0
    assert metrics[("dicom_node_scp_listening", ())] == 1
    assert metrics[("dicom_node_storage_instances_bytes", ())] > 24 * 96 * 96 * 2
    assert metrics[("dicom_node_storage_filesystem_bytes", (("kind", "free"),))] > 0
    assert separate.status_code == 200 and "dicom_node_jobs" in separate.text
    assert separate_ready["checks"]["database"] is True
