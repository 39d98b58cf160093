"""Helper processes that end with the process that started them, however it ends: the control
plane's certificate-signing helpers (they hold the CA's key), a test's own control plane, a
benchmark's agents. Killed from outside, a parent used to leave them running for good."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def end_with(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """This process gets ``sig`` once the thread that started it ends (Linux's parent-death
    signal); it exits at once if ``parent_pid`` has already ended."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:
        os._exit(1)
