"""What every benchmark reports, and the arithmetic they share: each figure
is a value measured together with its baseline in the same run, so that a
busy machine moves both and the ratio stays put."""

from __future__ import annotations

import math
import multiprocessing.context
import os
import platform
import resource
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from testhide.common.orphans import end_with


class _ChildProcess(multiprocessing.context.SpawnProcess):
    """A spawned helper (agents, submitters, clients) that ends with the benchmark however the
    benchmark ends: killed from outside, its agents used to go on reconnecting for good, and to
    load every later measurement on the machine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._benchmark_pid = os.getpid()

    def run(self) -> None:
        end_with(self._benchmark_pid)  # started from the benchmark's event loop thread
        super().run()


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _ChildProcess


SPAWN = _SpawnContext()
"""The benchmarks' ``multiprocessing`` context: spawn, each child ending with the benchmark."""


def settle_time(seconds: float, smoke: bool) -> float:
    """How long to let processes settle before reading them (RSS after the first heartbeats,
    PostgreSQL's transaction counters): as given when measuring, a tenth in a smoke run, which
    checks that every figure is produced, not its value."""
    return seconds / 10 if smoke else seconds


@dataclass
class Figure:
    name: str
    title: str
    value: float
    unit: str
    baseline: float
    baseline_unit: str
    baseline_what: str
    ratio: float
    goal: str
    met: bool | None
    """None where the issue sets no target: the figure is reported."""
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with ``pct``% at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def alternate(
    repetitions: int, measured: Callable[[], Awaitable[float]], baseline: Callable[[], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    """Run baseline and measured turn about, ``repetitions`` times each,
    starting with whichever went second last time."""
    values: list[float] = []
    baselines: list[float] = []
    for i in range(repetitions):
        if i % 2 == 0:
            baselines.append(await baseline())
            values.append(await measured())
        else:
            values.append(await measured())
            baselines.append(await baseline())
    return values, baselines


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid or 'self'}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int:
    """As many open files as the hard limit allows: thousands of streams need them."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_mib": total_kib // 1024,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "open_files_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }
