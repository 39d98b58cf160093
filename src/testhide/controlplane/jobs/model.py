"""The job domain: specs, statuses and records, free of wire formats."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from testhide.common.fetch import EgressRequest as EgressRequest  # the shared facts, re-exported
from testhide.common.fetch import FetchStep as FetchStep
from testhide.common.isolation import Isolation as Isolation  # the shared facts, re-exported
from testhide.common.isolation import ServiceIsolation as ServiceIsolation


def new_job_id() -> str:
    """Sortable by creation time, unguessable."""
    return f"j{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    ERROR = "ERROR"
    LOST = "LOST"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.TIMED_OUT,
        JobStatus.CANCELED,
        JobStatus.ERROR,
        JobStatus.LOST,
    }
)


class LogStream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2
    SYSTEM = 3


@dataclass(frozen=True)
class Resources:
    cpus: float = 2.0
    memory_bytes: int = 2 * 1024**3
    pids: int = 2048


@dataclass(frozen=True)
class ServiceSpec:
    """A container beside the job, in the job's network namespace (only lo)."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    """Empty: the image's own command."""
    env: dict[str, str] = field(default_factory=dict)
    tmpfs: tuple[str, ...] = ()
    """Absolute paths given a writable tmpfs (the root stays read-only)."""


@dataclass(frozen=True)
class JobSpec:
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    pool: str = "default"
    timeout: timedelta = timedelta(hours=1)
    resources: Resources = Resources()
    workdir: str = "/workspace"
    labels: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    runtime: str = ""
    artifact_globs: tuple[str, ...] = ()
    junit_globs: tuple[str, ...] = ()
    workspace_id: str = ""
    retries: int = 0
    """Further attempts if the job is LOST (its agent vanished mid-run)."""
    fetch: str = ""
    """A shell command run first, whose only route out is the pool's egress proxy; empty: none."""
    fetch_secrets: tuple[str, ...] = ()
    """Secrets the fetch step gets (the job's own ``secrets`` are not given to it)."""
    cache: str = ""
    """Names /cache, kept per org, pool and key on the agent's host; a hit skips the fetch step."""
    services: tuple[ServiceSpec, ...] = ()


class PullPolicy(enum.StrEnum):
    NEVER = "never"
    IF_NOT_PRESENT = "if-not-present"
    ALWAYS = "always"


@dataclass(frozen=True)
class PoolPolicy:
    """What a pool allows its jobs."""

    allowed_images: tuple[str, ...] = ()
    """fnmatch patterns; empty allows any image."""
    pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    runtime: str = ""
    """Enforced runtime (e.g. runsc); empty lets each job choose."""
    paused: bool = False
    """An administrator paused the pool: nothing new is dispatched (running jobs finish).
    Read with the policy; written only by pausing and resuming (``set_pool_paused``)."""
    egress_allow: tuple[str, ...] = ()
    """HOST or HOST:PORT the fetch step may reach through the egress proxy; empty: no
    fetch step may run in the pool."""


class TestStatus(enum.StrEnum):
    __test__ = False  # a domain type, not a pytest test class

    PASSED = "PASSED"
    FAILED = "FAILED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # a domain type, not a pytest test class

    suite: str
    classname: str
    name: str
    duration_s: float
    status: TestStatus
    message: str = ""


@dataclass(frozen=True)
class BlobInfo:
    id: str
    org: str
    kind: str
    job_id: str | None
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SecretInfo:
    """A secret as listed: never its value."""

    name: str
    updated_at: datetime
    last_used_at: datetime | None = None
    """When the control plane last handed it to an agent for a job, and which job."""
    last_used_by_job: str = ""


@dataclass(frozen=True)
class Transition:
    status: JobStatus
    at: datetime
    reason: str = ""


MAX_FETCH_REQUESTS = 1000


@dataclass(frozen=True)
class JobAgent:
    """The agent a job was assigned to, as the agents table knows it now."""

    id: str
    name: str
    host: str
    version: str
    pool: str


@dataclass(frozen=True)
class Job:
    id: str
    org: str
    spec: JobSpec
    status: JobStatus
    created_at: datetime
    exit_code: int | None = None
    status_reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    agent_id: str = ""
    epoch: int = 0
    log_size: int = 0
    last_seq: int = 0
    transitions: tuple[Transition, ...] = ()
    attempt: int = 1
    retry_of: str = ""
    """The LOST job this one retries."""
    retried_as: str = ""
    """The job that retries this one, once it was LOST."""
    lease_expires_at: datetime | None = None
    """While ASSIGNED or RUNNING: when the job counts as abandoned unless its agent extends this."""
    isolation: Isolation | None = None
    """Set once the job's container was created and its agent read it back."""
    service_isolation: tuple[ServiceIsolation, ...] = ()
    """Each service's container as its agent read it back (with the job's container's)."""
    fetch: FetchStep | None = None
    """Set once the fetch step ended (or its cache was restored)."""
    agent: JobAgent | None = None
    """Filled in by the job service for what users see (not stored with the job)."""
    log_chain_head: bytes = b""
    """The log hash chain's head after the last stored batch (common/evidence.py); empty for a
    job whose log began before the chain did."""
    agent_log_chain_head: bytes = b""
    """The head the job's agent reported with its result; empty until then, or from an agent
    older than the chain."""

    @property
    def retryable(self) -> bool:
        return self.status == JobStatus.LOST and self.attempt <= self.spec.retries and not self.retried_as


@dataclass(frozen=True)
class JobReport:
    """What a job's holder reports about it: RUNNING (with its container's isolation, if
    read back), or how it ended (with the last log batch ``last_seq``)."""

    org: str
    agent_id: str
    job_id: str
    epoch: int
    status: JobStatus
    reason: str = ""
    exit_code: int | None = None
    last_seq: int | None = None
    isolation: Isolation | None = None
    services: tuple[ServiceIsolation, ...] = ()
    """With RUNNING: each service's container's facts (empty: no services, or an older agent)."""
    statement: SubmittedStatement | None = None
    """With a result: the job's statement as its agent signed it (None from older agents)."""
    log_chain_head: bytes = b""
    """With a result: the log chain head the agent computed over the batches it sent (empty
    from an agent older than the chain)."""


@dataclass(frozen=True)
class SubmittedStatement:
    """A job's statement (common/statement.py), its agent's signature, and the certificate (DER)
    of the key that signed it, as the agent sent them with the result."""

    payload: bytes
    signature: bytes
    certificate_der: bytes


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a listing shows: those that match every criterion given
    (an empty one matches all)."""

    statuses: frozenset[JobStatus] = frozenset()
    """Any of these."""
    labels: tuple[tuple[str, str], ...] = ()
    """Every one of these (KEY, VALUE) pairs of the job's spec labels."""
    pool: str = ""
    since: datetime | None = None
    """Created at or after this (timezone-aware)."""


@dataclass(frozen=True)
class JobUpdate:
    """While following: the job, whose status or status reason just changed."""

    job: Job


@dataclass(frozen=True)
class LogChunk:
    offset: int
    stream: LogStream
    data: bytes


@dataclass(frozen=True)
class LogBatchRecord:
    """A stored log batch, unsealed, with its chain link (empty if it has none): what a
    verifier recomputes the chain from."""

    seq: int
    chain: bytes
    entries: tuple[tuple[LogStream, bytes], ...]
