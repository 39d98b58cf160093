"""What the `testhide` command speaks: plain values, enums and frozen
dataclasses. `cli/wire.py` converts them to and from the generated protobuf
messages; nothing else in the CLI sees those."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from testhide.common.fetch import EgressRequest as EgressRequest  # the shared facts, re-exported
from testhide.common.fetch import FetchStep as FetchStep
from testhide.common.isolation import Isolation as Isolation  # the shared facts, re-exported
from testhide.common.isolation import ServiceIsolation as ServiceIsolation


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
class Service:
    """A service container beside the job (`--service NAME=IMAGE`), reached at 127.0.0.1:PORT."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    """Empty: the image's own command."""
    env: dict[str, str] = field(default_factory=dict)
    tmpfs: tuple[str, ...] = ()


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
    fetch: str = ""
    """`sh -c` command of the fetch step; "": none."""
    fetch_secrets: tuple[str, ...] = ()
    cache: str = ""
    services: tuple[Service, ...] = ()


@dataclass(frozen=True)
class Transition:
    status: JobStatus
    at: datetime
    reason: str


@dataclass(frozen=True)
class JobSpec:
    """A submitted job's whole spec, as the control plane keeps it (secrets by name only)."""

    image: str = ""
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    pool: str = ""
    workdir: str = ""
    timeout_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    runtime: str = ""
    cpus: float = 0.0
    memory_bytes: int = 0
    pids: int = 0
    artifact_globs: tuple[str, ...] = ()
    junit_globs: tuple[str, ...] = ()
    workspace_id: str = ""
    fetch: str = ""
    fetch_secrets: tuple[str, ...] = ()
    cache: str = ""
    services: tuple[Service, ...] = ()


@dataclass(frozen=True)
class JobAgent:
    """The agent a job was assigned to."""

    id: str
    name: str
    host: str
    version: str
    pool: str


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
    spec: JobSpec = field(default_factory=JobSpec)
    agent: JobAgent | None = None
    isolation: Isolation | None = None
    fetch: FetchStep | None = None
    service_isolation: tuple[ServiceIsolation, ...] = ()


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


class ArtifactKind(enum.Enum):
    """As the contract names it without the `ARTIFACT_KIND_` prefix."""

    FILE = "FILE"
    SERVICE_LOG = "SERVICE_LOG"
    """A service's output, at services/NAME.log."""


@dataclass(frozen=True)
class Artifact:
    path: str
    size: int
    sha256: str
    kind: ArtifactKind = ArtifactKind.FILE


@dataclass(frozen=True)
class Secret:
    name: str
    updated_at: datetime | None
    last_used_at: datetime | None = None
    """When a job last received it; None if never."""
    last_used_by_job: str | None = None


@dataclass(frozen=True)
class JobQuery:
    """Which jobs `testhide jobs list` asks for: those matching every criterion given."""

    statuses: tuple[JobStatus, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    pool: str = ""
    since: datetime | None = None


@dataclass(frozen=True)
class ApiKeyLogin:
    api_key: str


@dataclass(frozen=True)
class PasswordLogin:
    org: str
    user: str
    password: str = field(repr=False)
    totp_code: str = field(default="", repr=False)
    """The second factor, when the user has one: a current TOTP code or a recovery code."""
    recovery_code: str = field(default="", repr=False)


@dataclass(frozen=True)
class MfaEnrollment:
    """A new TOTP factor, pending until confirmed with a code from it (`testhide mfa enroll`)."""

    otpauth_uri: str
    secret: str = field(repr=False)
    recovery_codes: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class Identity:
    """Who the session's access token says the caller is (`testhide whoami`)."""

    org: str
    principal_kind: str
    """"user" or "api_key"."""
    principal_id: str
    scopes: tuple[str, ...]
    access_expires_at: datetime | None
    amr: tuple[str, ...]
    """How the session was authenticated (RFC 8176: "pwd", "otp", "kba")."""
    server_version: str


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as `testhide admin api-keys list` shows it: never the key itself."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    state: str
    """"active", "expired" or "revoked"."""


@dataclass(frozen=True)
class UserInfo:
    name: str
    scopes: tuple[str, ...]
    created_at: datetime | None
    revoked_at: datetime | None
    mfa: bool
    state: str
    """"active", "revoked" or "locked"."""


@dataclass(frozen=True)
class EnrollmentTokenInfo:
    """An enrollment token as `testhide admin enroll-token list` shows it: never its secret."""

    id: str
    pool: str
    created_at: datetime | None
    expires_at: datetime | None
    used_at: datetime | None
    revoked_at: datetime | None
    state: str
    """"valid", "used", "expired" or "revoked"."""


@dataclass(frozen=True)
class AgentInfo:
    """An enrolled agent as `testhide admin agents list` shows it."""

    id: str
    name: str
    pool: str
    host: str
    version: str
    labels: dict[str, str]
    runtimes: tuple[str, ...]
    max_jobs: int
    running_jobs: int
    state: str
    """"connected", "disconnected", "expired" or "revoked"."""
    enrolled_at: datetime | None
    last_seen_at: datetime | None
    cert_not_after: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class PoolInfo:
    """A pool as `testhide pools list` shows it."""

    name: str
    paused: bool
    allowed_images: tuple[str, ...]
    """fnmatch patterns; empty: any image."""
    pull_policy: str
    runtime: str
    """"runc" or "runsc" when the pool enforces one; "" when each job chooses."""
    agent_cert_ttl_s: float | None
    agents_enrolled: int
    agents_connected: int
    jobs_queued: int
    jobs_running: int
    created_at: datetime | None
    egress_allow: tuple[str, ...] = ()
    """HOST or HOST:PORT the fetch step may reach; empty: the fetch step is refused."""


@dataclass(frozen=True)
class PoolChange:
    """What `testhide admin pools set` changes; None (and no images) keeps the pool's."""

    agent_cert_ttl: timedelta | None = None
    allowed_images: tuple[str, ...] = ()
    any_image: bool = False
    pull_policy: str | None = None
    runtime: str | None = None
    """"runc", "runsc", or "job": each job chooses."""
    egress_allow: tuple[str, ...] = ()
    """Replaces the pool's egress list when not empty."""
    no_egress: bool = False
    """Clears the pool's egress list."""
