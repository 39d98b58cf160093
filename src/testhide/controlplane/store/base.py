"""The storage contract. Every query on tenant data takes the organisation, so
an unscoped read cannot be written by accident."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from testhide.controlplane.auth.audit import AuditChain, AuditEntry, AuditEvent
from testhide.controlplane.jobs.model import BlobInfo, Job, JobStatus, LogStream, PoolPolicy, TestCase


@dataclass(frozen=True)
class WrappedDataKey:
    """A data key as stored, wrapped by the master key, with what names its
    owner (and so its associated data): the job or blob id, or org and name
    of a secret."""

    table: str
    rowid: int
    owner: tuple[str, ...]
    wrapped: bytes


DATA_KEY_TABLES = ("jobs", "blobs", "secrets")


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


@dataclass(frozen=True)
class StoredLogEntry:
    offset: int
    stream: LogStream
    sealed: bytes
    seq: int
    index: int


class Store(Protocol):
    async def close(self) -> None: ...

    # organisations and pools
    async def create_org(self, org: str, now: datetime) -> None: ...
    async def create_pool(self, org: str, pool: str, now: datetime) -> None: ...
    async def pool_exists(self, org: str, pool: str) -> bool: ...
    async def pool_cert_ttl(self, org: str, pool: str) -> timedelta | None: ...
    async def set_pool_cert_ttl(self, org: str, pool: str, ttl: timedelta | None) -> None: ...

    # API keys
    async def create_api_key(self, record: ApiKeyRecord) -> None: ...
    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    # enrollment tokens and agents
    async def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None: ...
    async def consume_enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord: ...
    async def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]:
        """Operator view, across organisations."""
        ...

    async def revoke_enrollment_token(self, token_id: str, now: datetime) -> EnrollmentTokenRecord | None: ...
    async def create_agent(self, record: AgentRecord) -> None: ...
    async def list_agents(self) -> list[AgentRecord]:
        """Operator view, across organisations."""
        ...

    async def revoke_agent(self, agent_id: str, now: datetime) -> tuple[AgentRecord, list[str]] | None:
        """Revoke, and end the agent's unfinished jobs as ERROR; returns their ids."""
        ...

    async def agents_revoked_since(self, since: datetime) -> list[AgentRecord]: ...
    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None: ...
    async def touch_agent(
        self, org: str, agent_id: str, now: datetime, version: str | None = None
    ) -> None: ...
    async def record_agent_certificate(
        self, org: str, agent_id: str, serial: str, not_after: datetime, issuer: str
    ) -> None: ...

    # jobs' files, secrets, test results, policy, users and sessions
    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]: ...
    async def touch_api_key(self, key_id: str, now: datetime) -> None: ...
    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None: ...
    async def create_user(self, record: UserRecord) -> None: ...
    async def find_user(self, org: str, name: str) -> UserRecord | None: ...
    async def get_user(self, org: str, user_id: str) -> UserRecord | None: ...
    async def list_users(self, org: str) -> list[UserRecord]: ...
    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None: ...
    async def revoke_org(self, org: str, now: datetime) -> dict[str, int] | None: ...
    async def list_orgs(self) -> list[str]: ...
    async def create_refresh_token(self, record: RefreshRecord) -> None: ...
    async def spend_refresh_token(
        self, token_id: str, now: datetime
    ) -> tuple[RefreshRecord, bool] | None: ...
    async def revoke_refresh_family(self, family: str, now: datetime) -> int: ...
    async def family_revoked(self, family: str) -> bool: ...
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int: ...
    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]: ...
    async def clear_auth_failures(self, subject: str) -> None: ...
    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int: ...
    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]: ...
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy: ...
    async def set_pool_policy(self, org: str, pool: str, policy: PoolPolicy) -> None: ...
    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None: ...
    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None: ...
    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None: ...
    async def delete_blob(self, blob_id: str) -> None: ...
    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None: ...
    async def find_blob(
        self, org: str, job_id: str, kind: str, path: str
    ) -> tuple[BlobInfo, bytes] | None: ...
    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]: ...
    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None: ...
    async def put_secret(
        self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime
    ) -> None: ...
    async def list_secrets(self, org: str) -> list[tuple[str, datetime]]: ...
    async def delete_secret(self, org: str, name: str) -> datetime | None: ...
    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]: ...
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None: ...
    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]: ...

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

    # audit
    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry: ...
    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]: ...

    # jobs
    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None: ...
    async def get_job(self, org: str, job_id: str) -> Job | None: ...
    async def get_job_data_key(self, org: str, job_id: str) -> bytes: ...
    async def list_jobs(self, org: str, limit: int, before_id: str | None) -> list[Job]: ...
    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]: ...
    async def queued_pools(self) -> list[tuple[str, str]]:
        """Every (org, pool) with queued jobs: the scheduler's start-up scan."""
        ...

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        """The agent's assigned or running jobs."""
        ...

    async def assign_job(
        self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
    ) -> Job | None: ...
    # what agents say about jobs: each is taken only from the job's holder at its epoch
    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        """The job, if ``agent_id`` holds it at ``epoch``: assigned to it then and not
        taken back since (ended on its report, or canceled, it stays its holder's).
        Otherwise NotHeld, the same for a job that does not exist. Every method
        below that takes an agent's word applies this same test in its own
        transaction."""
        ...

    # leases --------------------------------------------------------------------
    async def extend_leases(self, org: str, agent_id: str, held: dict[str, int], until: datetime) -> int:
        """Extend the leases of the live jobs in ``held`` that the agent holds at those epochs."""
        ...

    async def extend_all_leases(self, until: datetime) -> int: ...
    async def release_job(
        self, org: str, job_id: str, epoch: int, status: JobStatus, reason: str, now: datetime
    ) -> Job:
        """A held job back to QUEUED (not started) or LOST, with a new epoch."""
        ...

    async def expire_leases(self, now: datetime) -> list[tuple[Job, str]]:
        """Release the jobs whose lease lapsed; each with the agent that held it."""
        ...

    async def retryable_jobs(self, limit: int) -> list[Job]: ...
    async def create_retry(self, lost: Job, retry: Job, data_key_wrapped: bytes) -> Job | None: ...
    async def set_job_status(
        self,
        org: str,
        job_id: str,
        epoch: int | None,
        status: JobStatus,
        now: datetime,
        reason: str = "",
        exit_code: int | None = None,
    ) -> Job: ...
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

    async def append_log_batch(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        seq: int,
        entries: list[tuple[LogStream, bytes, int]],
    ) -> int:
        """The holding agent's log batch ``seq``, stored once."""
        ...

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]: ...
