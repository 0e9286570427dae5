"""Waiting, in a process' main thread, for the SIGTERM or SIGINT that stops it.

Python runs signal handlers in the main thread only, and only between two of its own steps. The kernel hands a
signal sent to the process to any of its threads: when another thread takes it, a main thread blocked in
``Event.wait()`` with no time limit is never woken, the handler never runs, and the stop is lost (``systemctl stop``
then waits out its timeout and kills the node). Waking every half second lets the main thread run the handler.
"""

from __future__ import annotations

import threading

HANDLER_CHECK_SECONDS = 0.5


def wait_until_stopped(stop: threading.Event) -> None:
    """Return once ``stop`` is set (by a signal handler or another thread), running pending signal handlers on the
    way: at most ``HANDLER_CHECK_SECONDS`` after a signal some other thread of the process received."""
    while not stop.wait(HANDLER_CHECK_SECONDS):
        pass
