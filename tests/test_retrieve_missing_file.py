"""A stored file gone from disk while a series is retrieved (a purge that ran meanwhile) is named as such, not as
damaged storage; the other instances are sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Instance
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

PLANNER = "PLANNER"


def test_a_stored_file_gone_during_a_c_get_is_named_as_gone_and_the_rest_is_sent(tmp_path, start_node):
    node = start_node(
        peers={
            "pacs": {"ae_title": "PACS", "hosts": ["127.0.0.1"], "roles": ["store"]},
            "planner": {"ae_title": PLANNER, "hosts": ["127.0.0.1"], "roles": ["find", "get"]},
        },
        completion={"quiet_seconds": 600},
    )
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=4))
    assert storescu(node.port, series.files).returncode == 0
    with node.sessions() as session:
        wait_for(lambda: len(session.scalars(select(Instance)).all()) == 4, timeout=30, what="4 recorded instances")
        gone = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert gone is not None
        Path(gone.path).unlink()  # as a purge that ran while the retrieval was on its way would leave it

    out = tmp_path / "got"
    out.mkdir()
    command = [require_tool("getscu"), "-S", "-aet", PLANNER, "-aec", node.ae_title, "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series.series_instance_uid}"]
    subprocess.run([*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=120)

    assert len(list(out.iterdir())) == 3
    (line,) = [line for line in node.log().splitlines() if "retrieve.file_unreadable" in line]
    assert "WARNING" in line
    assert f"the stored file of instance {gone.sop_instance_uid} is no longer on disk (its series was purged" in line
