"""The storage contract. Every query on tenant data takes the organisation, so
an unscoped read cannot be written by accident."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from controlplane.auth.audit import AuditChain, AuditEntry, AuditEvent
from controlplane.jobs.model import Job, JobStatus, LogStream


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
    async def consume_enrollment_token(self, token_id: str, secret_hash: bytes, now: datetime) -> (
        EnrollmentTokenRecord
    ): ...
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
    async def touch_agent(self, org: str, agent_id: str, now: datetime) -> None: ...
    async def record_agent_certificate(self, org: str, agent_id: str, serial: str, not_after: datetime,
                                       issuer: str) -> None: ...

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
    async def assign_job(self, org: str, job_id: str, agent_id: str, now: datetime) -> Job | None: ...
    async def set_job_status(
        self, org: str, job_id: str, epoch: int | None, status: JobStatus, now: datetime, reason: str = "",
        exit_code: int | None = None,
    ) -> Job: ...
    async def append_log_batch(
        self, org: str, job_id: str, epoch: int, seq: int, entries: list[tuple[LogStream, bytes, int]]
    ) -> int: ...
    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]: ...
