"""The storage vocabulary (the records the backends hand out) and ``Store``,
the whole contract a backend implements. Each package declares the few calls
it makes in its own small protocol (``jobs/store.py``, ``auth/store.py``,
``ca/store.py``) and takes only that; ``Store`` is their union plus what only
the operator's commands, backup and master-key rotation use. Every query on
tenant data takes the organisation, so an unscoped read cannot be written by
accident."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from testhide.common.evidence import log_chain_start
from testhide.controlplane.auth.store import AuditStore, CredentialStore, SecondFactorStore
from testhide.controlplane.ca.statement_store import StatementStore
from testhide.controlplane.ca.store import AgentStore, EnrollmentStore
from testhide.controlplane.jobs.model import BlobInfo, Isolation, Job, JobStatus, LogStream, PoolPolicy
from testhide.controlplane.jobs.store import (
    BlobStore,
    JobStore,
    LeaseStore,
    LogStore,
    QueueStore,
    SecretStore,
)
from testhide.controlplane.store.incident import IncidentStore


@dataclass(frozen=True)
class WrappedDataKey:
    """A data key as stored, wrapped by the master key, with what names its
    owner (and so its associated data): the job, blob or second factor's id,
    or org and name of a secret."""

    table: str
    rowid: int
    owner: tuple[str, ...]
    wrapped: bytes


DATA_KEY_TABLES = ("jobs", "blobs", "secrets", "mfa_factors", "statement_keys")

DEFAULT_ADMIN_KEY_MAX_LIFETIME = timedelta(days=90)
"""What a new organisation allows an API key with an admin scope (the schema's column default)."""


@dataclass(frozen=True)
class OrgRecord:
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    admin_key_max_lifetime: timedelta | None = DEFAULT_ADMIN_KEY_MAX_LIFETIME
    """The longest an API key holding ``agents:admin`` or ``org:admin`` may live; None: no limit."""


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    org: str
    name: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None = None
    owner: str = ""
    """The service account or user the key acts as."""
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


@dataclass(frozen=True)
class UserRecord:
    id: str
    org: str
    name: str
    password_hash: bytes | None
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class RefreshRecord:
    id: str
    family: str
    org: str
    principal_kind: str
    principal_id: str
    scopes: tuple[str, ...]
    secret_hash: bytes
    created_at: datetime
    family_expires_at: datetime
    used_at: datetime | None = None
    revoked_at: datetime | None = None
    amr: tuple[str, ...] = ()
    """How the session was authenticated (RFC 8176 values), kept by every refresh."""


@dataclass(frozen=True)
class MfaFactorRecord:
    """A user's TOTP second factor: its secret sealed under its own data key
    (``auth/mfa.py``), pending until ``confirmed_at``."""

    id: str
    org: str
    user_id: str
    data_key: bytes
    """Wrapped by the master key, bound to ``id``."""
    sealed_secret: bytes
    created_at: datetime
    confirmed_at: datetime | None = None
    last_step: int | None = None
    """The last TOTP time step accepted: a code of this step or an earlier one is refused."""


@dataclass(frozen=True)
class EnrollmentTokenRecord:
    id: str
    org: str
    pool: str
    secret_hash: bytes
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class AgentRecord:
    id: str
    org: str
    pool: str
    name: str
    cert_serial: str
    cert_not_after: datetime
    enrolled_at: datetime
    last_seen_at: datetime | None = None
    revoked_at: datetime | None = None
    cert_issuer: str = ""
    """sha256 fingerprint of the CA that signed the current certificate."""
    version: str = ""
    """The testhide version the agent announced in its last hello ('' before its first)."""
    labels: dict[str, str] = field(default_factory=dict)
    """What its last hello offered: labels, container runtimes and jobs at once (0 before its first)."""
    runtimes: tuple[str, ...] = ()
    max_jobs: int = 0
    replica: str = ""
    """The control plane process holding its stream, '' when none: a replica id on
    PostgreSQL, ``pid:N`` of the serve on SQLite. Live only while that process is."""
    running_jobs: int = 0
    """Its ASSIGNED and RUNNING jobs (filled in by ``list_agents`` only)."""
    host: str = ""
    """The host name its last hello gave ('' before its first)."""


@dataclass(frozen=True)
class PoolRecord:
    """A pool with its policy (and whether it is paused) and what is in it now."""

    org: str
    name: str
    policy: PoolPolicy
    agent_cert_ttl: timedelta | None
    """None: the control plane's default lifetime applies."""
    created_at: datetime
    agents_enrolled: int
    """Its agents that are not revoked."""
    jobs_queued: int
    jobs_running: int
    """Its ASSIGNED and RUNNING jobs."""


@dataclass(frozen=True)
class StoredLogEntry:
    offset: int
    stream: LogStream
    sealed: bytes
    seq: int
    index: int


@dataclass(frozen=True)
class StoredLogBatch:
    """A stored log batch: its seq, its chain link (empty if it has none) and its entries
    (stream, sealed data, index), as ``LogStore.read_log_batches`` returns them."""

    seq: int
    chain: bytes
    entries: tuple[tuple[LogStream, bytes, int], ...]


def next_log_chain(
    job_id: str, last_seq: int, head: bytes | None, link: Callable[[bytes], bytes] | None
) -> bytes | None:
    """The job's log chain head once its batch ``last_seq`` + 1 is stored: ``link`` applied to
    the head so far (the chain's start before the first batch). None when the job's log
    carries no chain: it began before the chain did, or a batch came without a link."""
    if link is None:
        return None
    if head is None:
        if last_seq:
            return None
        head = log_chain_start(job_id)
    return link(bytes(head))


def log_batches_of(
    seqs: Sequence[int], chains: Iterable[Sequence[Any]], entries: Iterable[Sequence[Any]]
) -> list[StoredLogBatch]:
    """The batches ``seqs`` from rows of log_batches (seq, chain) and of log_entries (seq, idx,
    stream, data) in (seq, idx) order; a batch without its chain row has an empty link."""
    links = {int(r[0]): bytes(r[1]) for r in chains}
    held: dict[int, list[tuple[LogStream, bytes, int]]] = {seq: [] for seq in seqs}
    for seq, index, stream, data in entries:
        held[int(seq)].append((LogStream(stream), bytes(data), int(index)))
    return [StoredLogBatch(seq, links.get(seq, b""), tuple(held[seq])) for seq in seqs]


def stored_log_chain_head(job_id: str, last_seq: int, head: bytes | None) -> bytes:
    """What a job's stored head means: a job with no batch yet has the chain's start; one
    whose log carries no chain has none (empty)."""
    if head is not None:
        return bytes(head)
    return b"" if last_seq else log_chain_start(job_id)


def released_as(status: JobStatus, reason: str, last_seq: int) -> tuple[JobStatus, str]:
    """What taking a held job back makes of it. A job asked back to the queue before it
    reported RUNNING goes there only if none of its log is stored: the agent sends a batch
    before RUNNING only when it gives up on the start (its reason, as a system line), but any
    stored batch would make a requeued job run again under the same log, the next holder's
    first batches taken for replays of the stored ones. So it is LOST (retried when it asked
    for that), its log kept with it as evidence."""
    if status == JobStatus.QUEUED and last_seq > 0:
        return (
            JobStatus.LOST,
            f"{reason.removesuffix('; requeued')}, but its log had begun: lost, not requeued",
        )
    return status, reason


class Store(
    QueueStore,
    JobStore,
    LeaseStore,
    LogStore,
    BlobStore,
    SecretStore,
    CredentialStore,
    SecondFactorStore,
    AuditStore,
    EnrollmentStore,
    AgentStore,
    StatementStore,
    IncidentStore,
    Protocol,
):
    """Everything a backend implements: the small protocols each package
    declares for itself (jobs/store.py, auth/store.py, ca/store.py), and below
    what only the operator's commands, backup and master-key rotation need."""

    async def close(self) -> None: ...

    async def jobs_blobs(
        self, org: str, job_ids: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, list[BlobInfo]]:
        """The complete blobs of ``kinds`` of the organisation's jobs, by job id, in path order
        (a batch of results' statements checked at once: jobs/statements.py)."""
        ...

    # organisations and pools
    async def create_org(self, org: str, now: datetime) -> None: ...
    async def create_pool(self, org: str, pool: str, now: datetime) -> None: ...
    async def set_pool_cert_ttl(self, org: str, pool: str, ttl: timedelta | None) -> None: ...
    async def set_pool_policy(self, org: str, pool: str, policy: PoolPolicy) -> None: ...
    async def list_pools(self, org: str | None = None) -> list[PoolRecord]:
        """The pools of ``org`` (of every organisation: None), by org and name."""
        ...

    async def set_pool_paused(self, org: str, pool: str, paused: bool, now: datetime) -> None:
        """Pause or resume; NotFound if there is no such pool."""
        ...

    async def pools_resumed_since(self, since: datetime) -> list[tuple[str, str]]:
        """(org, pool) of the pools resumed at or after ``since``: a serve dispatches their
        queued jobs again when the operator's command resumed them from another process."""
        ...

    async def revoke_org(self, org: str, now: datetime) -> dict[str, int] | None: ...
    async def list_orgs(self) -> list[str]: ...
    async def list_org_records(self) -> list[OrgRecord]: ...
    async def get_org(self, org: str) -> OrgRecord | None: ...
    async def set_admin_key_max_lifetime(self, org: str, lifetime: timedelta | None) -> OrgRecord | None: ...

    # API keys and users
    async def create_api_key(self, record: ApiKeyRecord) -> None: ...
    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]: ...
    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None: ...
    async def create_user(self, record: UserRecord) -> None: ...
    async def list_users(self, org: str) -> list[UserRecord]: ...
    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None: ...

    # enrollment tokens and agents, the operator's view (across organisations)
    async def list_enrollment_tokens(self, org: str | None = None) -> list[EnrollmentTokenRecord]:
        """Those of ``org``; across organisations (the operator's view) with None."""
        ...

    async def revoke_enrollment_token(self, token_id: str, now: datetime) -> EnrollmentTokenRecord | None: ...
    async def list_agents(self, org: str | None = None) -> list[AgentRecord]:
        """Those of ``org``; across organisations (the operator's view) with None."""
        ...

    async def revoke_agent(self, agent_id: str, now: datetime) -> tuple[AgentRecord, list[str]] | None:
        """Revoke, and end the agent's unfinished jobs as ERROR; returns their ids."""
        ...

    async def agents_revoked_since(self, since: datetime) -> list[AgentRecord]: ...

    # one holder's report in its own transaction (the job service writes them in groups:
    # JobStore.report_jobs); for tools and tests
    async def report_job(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        status: JobStatus,
        now: datetime,
        reason: str = "",
        exit_code: int | None = None,
        last_seq: int | None = None,
    ) -> tuple[Job, bool]:
        """The holding agent's report (RUNNING, or the result), checked and applied at once."""
        ...

    async def record_isolation(
        self, org: str, job_id: str, agent_id: str, epoch: int, isolation: Isolation
    ) -> None:
        """What the holding agent read back from the job's container (NotHeld otherwise)."""
        ...

    # master-key rotation and backup
    async def data_keys(self, table: str, after_rowid: int, limit: int) -> list[WrappedDataKey]:
        """Wrapped data keys of ``table`` (one of DATA_KEY_TABLES) in rowid order."""
        ...

    async def replace_data_keys(self, table: str, updates: list[tuple[int, bytes, bytes]]) -> int:
        """Set (rowid, old, new): only where the row still holds ``old``; returns how many did."""
        ...

    async def snapshot(self, dest: Path) -> None:
        """A consistent copy of the whole database at ``dest``, taken online."""
        ...

    async def integrity_problems(self) -> list[str]: ...
