"""What the agent knows of a job: the assignment, its output, its outcome."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta

from testhide.common.isolation import Isolation as Isolation  # the shared facts, re-exported


class LogStream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2
    SYSTEM = 3


class Outcome(enum.IntEnum):
    EXITED = 1
    TIMED_OUT = 2
    CANCELED = 3
    ERROR = 4


@dataclass(frozen=True)
class Assignment:
    job_id: str
    epoch: int
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/workspace"
    timeout: timedelta = timedelta(hours=1)
    cpus: float = 2.0
    memory_bytes: int = 2 * 1024**3
    pids: int = 2048
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    runtime: str = "runc"
    pull_policy: str = "if-not-present"
    allowed_images: tuple[str, ...] = ()
    artifact_globs: tuple[str, ...] = ()
    junit_globs: tuple[str, ...] = ()
    has_workspace: bool = False


@dataclass(frozen=True)
class LogBatch:
    job_id: str
    epoch: int
    seq: int
    entries: tuple[tuple[LogStream, bytes], ...]


@dataclass(frozen=True)
class JobStarted:
    job_id: str
    epoch: int
    isolation: Isolation | None = None


@dataclass(frozen=True)
class JobResult:
    job_id: str
    epoch: int
    last_seq: int
    outcome: Outcome
    exit_code: int
    reason: str = ""


@dataclass(frozen=True)
class JobRefused:
    """An assignment this agent will not run (draining, container engine down): requeue it."""

    job_id: str
    epoch: int
    reason: str


Report = JobStarted | LogBatch | JobResult | JobRefused
