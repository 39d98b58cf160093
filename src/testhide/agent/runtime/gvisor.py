"""gVisor (``runsc``): what its sandbox costs the host, and how its own failure looks.

**The pids limit.** Under gVisor's ptrace platform (the default; KVM hangs on
this host) Docker's pids limit counts the sandbox's host threads, not the job's
processes. Measured here (runsc 20221219, 2 cores, ``sleep`` processes started
from ``sh``): an idle sandbox holds 38-43 host threads (sentry and gofer); each
job process adds about 8 (7.7-8.0 for 50 to 1,000 processes: a stub process,
its threads, and a sentry thread); CPU-bound processes about 6; threads
blocked in a multi-threaded process almost none. But the ptrace platform
pools address spaces and each keeps one stub thread per sentry thread that
ever ran in it, so churn grows superlinearly: 10 shell loops forking
``echo | cat`` held 2,300 host threads after 40 s, 20 loops 5,300 after 15 s,
and a fork bomb stopped at 64 processes peaked at 3,237 (6,000 at 256). With
Docker's default of the job's pids (2,048) about 250 processes, or 10 such
loops after 7 s, killed the whole sandbox
(``panic: error initializing first thread: resource temporarily unavailable``).

So a gVisor job gets two limits. Inside the sandbox RLIMIT_NPROC is the job's
pids limit: gVisor enforces it per user and counts threads, as the pids cgroup
does (measured), so the job's own processes meet "can't fork" there. (Not under
runc: there RLIMIT_NPROC counts every process of the uid on the whole host.)
On the host the container's pids limit is the sandbox's budget:
``HOST_THREADS_BASE + HOST_THREADS_PER_PROCESS * pids`` = 8,192 + 16 x pids
(twice the measured 8 per process, plus room for the sentry and the stub
threads that churn accumulates), 40,960 for the default 2,048, but never more
than half the host's ``kernel.pid_max``, so one sandbox cannot take the host's
last PIDs (32,768 on this host gives 16,384; systemd raises it to 4,194,304).
1,000 sleeping processes take 7,900 host threads; a fork bomb at 64 pids kept
up for 30 s peaked at 6,700 (budget 9,216) and the job outlived it. No linear
budget holds a fork bomb kept up at a large limit: the pool only grows (at 256
pids it passed 12,000 host threads within 20 s, at 512 to 2,048 it reached the
16,384 allowed here): that sandbox dies, and the job says so (below).

**A sandbox that fails anyway** (its budget too small for the load, a gVisor
bug) exits 2 like Go's panic, which a job could also do. ``runsc``
registered with ``--panic-log=/proc/self/fd/2 --traceback=single`` writes its
panic, one goroutine long, into the job's stderr (the runtime's own stderr is
the container's), where ``SandboxPanicWatch`` finds it."""

from __future__ import annotations

import re
from pathlib import Path

HOST_THREADS_BASE = 8192
HOST_THREADS_PER_PROCESS = 16
PID_MAX = Path("/proc/sys/kernel/pid_max")
GO_PANIC_EXIT = 2
"""Go's exit status after a panic or a fatal runtime error."""
PANIC_LOG_ARG = "--panic-log=/proc/self/fd/2"

_OUT_OF_THREADS = ("resource temporarily unavailable", "newosproc")
_FAILURE = re.compile(rb"^(?:panic|fatal error): [^\n]*", re.MULTILINE)
_GVISOR_FRAME = b"gvisor.dev/gvisor/"
_CARRY = 512
_REASON_MAX = 300


def is_gvisor(runtime_path: str) -> bool:
    """Is a Docker runtime registered with this path gVisor's ``runsc``?"""
    return Path(runtime_path).name == "runsc"


def host_pid_max() -> int | None:
    try:
        return int(PID_MAX.read_text())
    except (OSError, ValueError):
        return None


def sandbox_pids_limit(job_pids: int, pid_max: int | None) -> int:
    """The host-side pids limit for a gVisor sandbox running a job of ``job_pids``."""
    budget = HOST_THREADS_BASE + HOST_THREADS_PER_PROCESS * job_pids
    return min(budget, pid_max // 2) if pid_max else budget


def failure_reason(panic_line: str) -> str:
    """The job's reason when its sandbox died with ``panic_line``."""
    reason = f"the gVisor sandbox failed: {panic_line}"
    if any(mark in panic_line for mark in _OUT_OF_THREADS):
        reason += " (it ran out of host threads; see the pids limit under gVisor in the README)"
    return reason


class SandboxPanicWatch:
    """Reads a gVisor job's stderr as it passes and remembers the sentry's own
    panic: a ``panic:`` or ``fatal error:`` line followed by a frame of
    gVisor's code. Fed from the output thread; read once the output ended."""

    def __init__(self) -> None:
        self._carry = b""
        self._line = b""
        self._confirmed = False

    def feed(self, data: bytes) -> None:
        # The carry lets a line or a frame split between two reads still match.
        text = self._carry + data
        self._carry = text[-_CARRY:]
        start = 0
        last = None
        if b"panic: " in text or b"fatal error: " in text:  # cheap: most output has neither
            last = next(reversed(list(_FAILURE.finditer(text))), None)
        if last is not None:
            if last.group() != self._line:
                self._line, self._confirmed = last.group(), False
            start = last.end()
        if self._line and not self._confirmed:
            self._confirmed = text.find(_GVISOR_FRAME, start) >= 0

    @property
    def failure(self) -> str:
        """The sandbox's panic line, or "" if the sandbox did not report one."""
        if not self._confirmed:
            return ""
        return self._line[:_REASON_MAX].decode("utf-8", "replace")
