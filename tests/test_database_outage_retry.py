"""Workers wait out a database server that cannot be reached for a moment (a PostgreSQL restart or failover):
`dicom-node worker` crashed in stage load on a 3-second restart and the job counted a worker death against the
series. The errors are the real driver's, from a real PostgreSQL and a port where nothing listens."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from db.session import is_database_locked, is_database_unreachable, retry_when_locked
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def _outage_then_back(postgresql_url: str, failures: int):
    """An action that finds the server unreachable ``failures`` times (nothing listens on its port), then reads."""
    down = create_engine(make_url(postgresql_url).set(port=free_port()), poolclass=NullPool)
    up = create_engine(postgresql_url, poolclass=NullPool)
    tries: list[int] = []

    def action() -> int:
        tries.append(1)
        engine = down if len(tries) <= failures else up
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT 41 + 1")).scalar_one())

    return action, tries


def test_a_worker_transaction_waits_for_the_database_server_to_come_back(postgresql_url):
    action, tries = _outage_then_back(postgresql_url, failures=2)

    answer = retry_when_locked(
        action, waiting="worker test:1 recording stage load of job 1", limit_seconds=60, wait_for_server=True
    )

    assert answer == 42 and len(tries) == 3


def test_other_callers_are_told_at_once(postgresql_url):
    action, tries = _outage_then_back(postgresql_url, failures=1)

    with pytest.raises(OperationalError) as raised:
        retry_when_locked(action, waiting="receiver recording instance 1.2.3", limit_seconds=60)

    assert len(tries) == 1
    assert is_database_unreachable(raised.value) and not is_database_locked(raised.value)
