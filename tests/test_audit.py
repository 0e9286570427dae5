"""The audit trail: records of who did what, queryable, without patient data."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import yaml

from db.session import make_engine, make_session_factory, migrate
from dicom_node.audit import Peer, StoreTally, association_ended, record, recent
from tests.conftest import DICOM_NODE


def _sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'storage' / 'dicom-node.db'}"
    migrate(url)
    return make_session_factory(make_engine(url))


def _assoc(ae_title: str, address: str, port: int) -> SimpleNamespace:
    return SimpleNamespace(requestor=SimpleNamespace(ae_title=ae_title, address=address, port=port))


def test_stores_are_summed_per_association_and_study_and_written_when_it_ends(tmp_path):
    sessions = _sessions(tmp_path)
    assoc = _assoc("PACS", "10.1.2.3", 40000)
    tally = StoreTally.of(assoc)
    for _ in range(3):
        tally.add("1.2.3", "success")
    tally.add("1.2.3", "refused")
    StoreTally.of(assoc).add("1.2.4", "success")  # the same tally, found on the association

    association_ended(sessions, assoc, "released")

    with sessions() as session:
        rows = [(r.action, r.study_instance_uid, r.outcome, r.instances, r.peer_ae_title, r.peer_address)
                for r in reversed(recent(session))]
    assert rows == [
        ("store", "1.2.3", "refused", 1, "PACS", "10.1.2.3:40000"),
        ("store", "1.2.3", "success", 3, "PACS", "10.1.2.3:40000"),
        ("store", "1.2.4", "success", 1, "PACS", "10.1.2.3:40000"),
        ("association", None, "released", 0, "PACS", "10.1.2.3:40000"),
    ]


def test_audit_command_filters_by_peer_action_and_study(tmp_path):
    sessions = _sessions(tmp_path)
    record(sessions, "find", Peer("PLANNER", "127.0.0.1:5000"), "success", detail="STUDY level, 2 matches")
    record(sessions, "get", Peer("PLANNER", "127.0.0.1:5000"), "success", study_instance_uid="1.2.9", instances=3)
    record(sessions, "store", Peer("PACS", "127.0.0.1:6000"), "success", study_instance_uid="1.2.9", instances=30)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"directory": str(tmp_path / "storage")}}))

    def audit(*args: str) -> str:
        result = subprocess.run(
            [DICOM_NODE, "audit", *args, "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    planner = audit("--peer", "PLANNER")
    assert "find" in planner and "get" in planner and "PACS" not in planner
    stores = audit("--action", "store", "--study", "1.2.9")
    assert "30" in stores and "PLANNER" not in stores
    assert "unknown action" in subprocess.run(
        [DICOM_NODE, "audit", "--action", "delete", "--config", str(config)], capture_output=True, text=True
    ).stderr
