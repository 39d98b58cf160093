"""What the `testhide` command speaks: plain values, enums and frozen
dataclasses. `cli/wire.py` converts them to and from the generated protobuf
messages; nothing else in the CLI sees those."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class JobStatus(enum.Enum):
    """A job's status, named as the contract names it without the `JOB_STATUS_` prefix."""

    UNSPECIFIED = "UNSPECIFIED"
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
    def exited(self) -> bool:
        """The job's command ran and exited on its own (with its exit code)."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class TestStatus(enum.Enum):
    __test__ = False  # not a pytest test class, whatever its name

    UNSPECIFIED = "UNSPECIFIED"
    PASSED = "PASSED"
    FAILED = "FAILED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"


class LogStream(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    STDOUT = "STDOUT"
    STDERR = "STDERR"
    SYSTEM = "SYSTEM"  # written by testhide itself (truncation markers, infrastructure notes)


@dataclass(frozen=True)
class JobRequest:
    """What `testhide run` asks for; zero means the pool's default."""

    image: str
    command: tuple[str, ...]
    pool: str = "default"
    workdir: str = "/workspace"
    timeout: timedelta = timedelta(hours=1)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0
    memory_bytes: int = 0
    pids: int = 0
    secrets: tuple[str, ...] = ()
    runtime: str = ""
    artifact_globs: tuple[str, ...] = ()
    junit_globs: tuple[str, ...] = ()
    retries: int = 0
    workspace_id: str = ""


@dataclass(frozen=True)
class Transition:
    status: JobStatus
    at: datetime
    reason: str


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    exit_code: int | None
    status_reason: str
    image: str
    command: tuple[str, ...]
    pool: str
    agent_id: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    log_size: int
    transitions: tuple[Transition, ...]
    attempt: int
    retries: int
    retry_of: str | None
    retried_as: str | None


@dataclass(frozen=True)
class LogChunk:
    offset: int
    stream: LogStream
    data: bytes


@dataclass(frozen=True)
class TestCase:
    __test__ = False

    suite: str
    classname: str
    name: str
    duration_s: float
    status: TestStatus
    message: str


@dataclass(frozen=True)
class TestResults:
    __test__ = False

    total: int
    passed: int
    failed: int
    errors: int
    skipped: int
    cases: tuple[TestCase, ...]
    rejected_reports: tuple[str, ...]


@dataclass(frozen=True)
class Artifact:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Secret:
    name: str
    updated_at: datetime | None


@dataclass(frozen=True)
class ApiKeyLogin:
    api_key: str


@dataclass(frozen=True)
class PasswordLogin:
    org: str
    user: str
    password: str = field(repr=False)
