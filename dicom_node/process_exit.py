"""How one of the node's processes (a worker, a receiving process) ended, in words an IT admin can act on."""

from __future__ import annotations

import signal

NATIVE_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)


def how_a_process_ended(exit_code: int | None) -> str:
    """A process' exit code (negative: the signal that ended it) as a sentence starting with "it"."""
    if exit_code is None:
        return "it ended in a way the system did not report"
    if exit_code == 0:
        return "it exited on its own (exit code 0)"
    if exit_code > 0:
        return f"it stopped with exit code {exit_code} (its last log lines say why)"
    number = -exit_code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "an unknown signal"
    if number == signal.SIGKILL:
        return (
            f"it was killed (signal {number}, {name}), most often by the kernel's out-of-memory killer (see "
            "`journalctl -k` or `dmesg`), else by an operator's kill -9"
        )
    if number in NATIVE_CRASH_SIGNALS:
        return (
            f"it crashed (signal {number}, {name}), a fault in native code (an image decoder, the inference "
            "runtime or the GPU driver)"
        )
    return f"it was ended by signal {number} ({name}) from outside the node"
