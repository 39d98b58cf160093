"""What the agent knows of a job: the assignment, its output, its outcome."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta

from testhide.common.fetch import EgressRequest as EgressRequest  # the shared facts, re-exported
from testhide.common.fetch import FetchStep as FetchStep
from testhide.common.isolation import Isolation as Isolation  # the shared facts, re-exported
from testhide.common.isolation import ServiceIsolation as ServiceIsolation


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
    fetch: str = ""
    """The fetch step's shell command; empty: no fetch step."""
    fetch_secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    """The secrets the fetch step gets (the job's own are not given to it)."""
    cache: str = ""
    """The cache key of /cache; empty: a /cache for this job alone."""
    egress_allow: tuple[str, ...] = ()
    """HOST or HOST:PORT the pool lets the fetch step reach through the egress proxy."""
    services: tuple[ServiceSpec, ...] = ()
    attempt: int = 1
    spec_digest: str = ""
    """sha256 of the spec as assigned (common/statement.py), for the job's statement."""


@dataclass(frozen=True)
class ServiceSpec:
    """A service beside the job, in its network namespace (only ``lo``)."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    """Empty: the image's own."""
    env: dict[str, str] = field(default_factory=dict)
    tmpfs: tuple[str, ...] = ()
    """Absolute paths given a writable tmpfs; the root stays read-only."""


@dataclass(frozen=True)
class JobFetched:
    job_id: str
    epoch: int
    fetch: FetchStep


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
    services: tuple[ServiceIsolation, ...] = ()
    """Each service's facts (read back once it started, before the job's container)."""


@dataclass(frozen=True)
class JobResult:
    job_id: str
    epoch: int
    last_seq: int
    outcome: Outcome
    exit_code: int
    reason: str = ""
    signed: SignedStatement | None = None
    log_chain_head: bytes = field(default=b"", compare=False, repr=False)
    """The log hash chain's head over every batch made for the job (common/evidence.py): a
    digest of the log already sent, so not part of what makes two results the same."""


@dataclass(frozen=True)
class SignedStatement:
    """The job's statement (common/statement.py), the agent's signature over it and the
    certificate (DER) of the key that made it."""

    payload: bytes
    signature: bytes
    certificate_der: bytes


@dataclass(frozen=True)
class JobRefused:
    """An assignment this agent will not run (draining, container engine down): requeue it."""

    job_id: str
    epoch: int
    reason: str


Report = JobStarted | JobFetched | LogBatch | JobResult | JobRefused
