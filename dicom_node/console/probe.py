"""C-ECHO every destination now and then; each result is an audit record the destinations page reads."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.config import Settings
from dicom_node.console.queries import echo_detail
from dicom_node.periodic import PeriodicTask


def echo_destination(
    settings: Settings, sessions: sessionmaker[Session], name: str, requested_by: str | None = None
) -> bool:
    """C-ECHO the destination ``name`` and record the outcome in the audit trail; True when it answered."""
    from dicom_node.scu import verify
    from dicom_node.security import client_tls

    destination = settings.destinations[name]
    tls_args = client_tls(destination, settings.network.tls) if destination.tls else None
    result = verify(
        settings.network.ae_title,
        destination.ae_title,
        destination.host,
        destination.port,
        timeout=settings.dispatch.timeout_seconds,
        tls_args=tls_args,
    )
    who = f", requested by {requested_by}" if requested_by else ""
    outcome = f"success in {result.seconds * 1000:.0f} ms" if result.ok else f"failed: {result.message}"
    audit.record(
        sessions,
        "echo",
        audit.Peer(destination.ae_title, f"{destination.host}:{destination.port}"),
        "success" if result.ok else "failed",
        detail=f"{echo_detail(name)}{who}: {outcome}",
    )
    return result.ok


class DestinationProbe(PeriodicTask):
    """Every ``console.echo_interval_seconds``: one C-ECHO per configured destination."""

    name = "console.probe"

    @property
    def interval_seconds(self) -> float:
        return self.settings.console.echo_interval_seconds

    def run_once(self) -> None:
        for name in self.settings.destinations:
            if self._stop.is_set():
                return
            echo_destination(self.settings, self.sessions, name)
