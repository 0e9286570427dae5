"""Entry point of an inference worker process started by ``serve``.

``serve`` names this function as its worker processes' target: a spawned process imports the worker, its encoders
and its models itself, and ``serve`` (which imports only this module and :mod:`dicom_node.worker_watch`) starts
without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.config import Settings
    from dicom_node.worker_watch import IdlePulse


def run_worker_process(settings: Settings, parent_pid: int, name: str | None, pulse: IdlePulse) -> None:
    """Run :func:`dicom_node.worker.run_worker` in this (spawned) process."""
    from dicom_node.worker import run_worker

    run_worker(settings, parent_pid, name, pulse)
