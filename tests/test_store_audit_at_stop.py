"""Instances stored on an association still open when `serve` stops are in the audit trail.

Stores are tallied per association and written when it ends (``dicom_node.audit.StoreTally``). Stopping the node
(SIGTERM) aborts the associations still open in each receiving process, through the path that audits an association
the node aborts: the stores and the association are recorded before the process ends. A real `dicom-node serve`,
a real pynetdicom peer holding its association open across SIGTERM, the node's SQLite file.
"""

from __future__ import annotations

import logging
import signal

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import
from sqlalchemy import select

from db.models import AuditEvent
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import wait_for

IMAGES = 5
STUCK_SECONDS = 90
"""Only ever reached when stopping waits for the open association: the test then fails instead of hanging."""


@pytest.mark.integration
@pytest.mark.parametrize("processes", [1, 2])
def test_stores_on_an_association_open_at_sigterm_are_audited(start_node, tmp_path, processes) -> None:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the abort the node sends is expected here
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=IMAGES))
    # an idle association never times out during the test: only stopping can end it
    node = start_node(receive={"processes": processes}, network={"network_timeout_seconds": 3600})
    wait_for(lambda: "node.ready" in node.log(), what="every receiving process listening")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert [int(assoc.send_c_store(dcmread(path)).Status) for path in series.files] == [0x0000] * IMAGES

    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)  # the association is still open
    assert node.process.wait(timeout=STUCK_SECONDS) == 0, node.log()[-3000:]
    node.process = None

    wait_for(lambda: not assoc.is_established, what="the peer to see its association end")
    with node.sessions() as session:
        rows = [
            (row.action, row.peer_ae_title, row.study_instance_uid, row.outcome, row.instances)
            for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
    assert rows == [
        ("store", "PACS", series.study_instance_uid, "success", IMAGES),
        ("association", "PACS", None, "aborted", 0),
    ], node.log()[-3000:]
    assert "the node is stopping while this association is open" in node.log()
