"""In-memory fakes of the small storage protocols that packages declare
(``jobs/store.py``, ``auth/store.py``), for unit tests of the classes that take
them: no SQLite, no sockets. Each fake implements one protocol and keeps the
checks of the real backend that its users rely on (the holder test, terminal
states, spent refresh tokens); what a test does not reach raises
``AssertionError``. The assignments at the end let mypy check each fake
against its protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from testhide.controlplane.auth.audit import GENESIS, AuditChain, AuditEntry, AuditEvent
from testhide.controlplane.auth.store import AuditStore, CredentialStore
from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, NotFound, NotHeld, StaleEpoch
from testhide.controlplane.jobs.model import (
    BlobInfo,
    FetchStep,
    Isolation,
    Job,
    JobAgent,
    JobFilter,
    JobReport,
    JobStatus,
    LogStream,
    PoolPolicy,
    SecretInfo,
    TestCase,
)
from testhide.controlplane.jobs.store import (
    BlobStore,
    JobStore,
    LeaseStore,
    LogStore,
    QueueStore,
    SecretStore,
)
from testhide.controlplane.store.base import (
    ApiKeyRecord,
    RefreshRecord,
    StoredLogBatch,
    StoredLogEntry,
    UserRecord,
)

_TAKEN_BACK = (JobStatus.QUEUED, JobStatus.LOST)


def _unused(what: str) -> AssertionError:
    return AssertionError(f"{what} is not expected in this test")


# jobs ---------------------------------------------------------------------------------
class MemoryJobs:
    """``QueueStore`` and ``JobStore`` over one dict of jobs (the two views share
    the jobs, as they share a table in the real backend)."""

    def __init__(self, policies: dict[tuple[str, str], PoolPolicy] | None = None) -> None:
        self.jobs: dict[str, Job] = {}
        self.data_keys: dict[str, bytes] = {}
        self.policies = policies if policies is not None else {("acme", "default"): PoolPolicy()}
        self.blobs: dict[str, tuple[BlobInfo, bytes]] = {}
        self.reports: dict[str, list[tuple[str, list[TestCase], str]]] = {}

    def _get(self, org: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.org != org:
            raise NotFound(f"job {job_id} not found")
        return job

    def _apply(self, job: Job, status: JobStatus, now: datetime, reason: str, exit_code: int | None) -> Job:
        keeps_lease = not status.terminal and status != JobStatus.QUEUED
        job = self.jobs[job.id] = replace(
            job,
            status=status,
            status_reason=reason,
            exit_code=exit_code,
            started_at=now if status == JobStatus.RUNNING else job.started_at,
            finished_at=now if status.terminal else None,
            lease_expires_at=job.lease_expires_at if keeps_lease else None,
        )
        return job

    # QueueStore
    async def queued_pools(self) -> list[tuple[str, str]]:
        return sorted({(j.org, j.spec.pool) for j in self.jobs.values() if j.status == JobStatus.QUEUED})

    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]:
        queued = [
            j
            for j in self.jobs.values()
            if j.org == org and j.spec.pool == pool and j.status == JobStatus.QUEUED
        ]
        return sorted(queued, key=lambda j: j.id)[:limit]

    async def assign_jobs(
        self, org: str, pairs: Sequence[tuple[str, str]], now: datetime, lease_until: datetime
    ) -> list[Job | None]:
        return [await self.assign_job(org, j, a, now, lease_until) for j, a in pairs]

    async def assign_job(
        self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
    ) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.org != org or job.status != JobStatus.QUEUED:
            return None
        job = self.jobs[job_id] = replace(
            job,
            status=JobStatus.ASSIGNED,
            agent_id=agent_id,
            epoch=job.epoch + 1,
            lease_expires_at=lease_until,
        )
        return job

    async def set_job_status(
        self,
        org: str,
        job_id: str,
        epoch: int | None,
        status: JobStatus,
        now: datetime,
        reason: str = "",
        exit_code: int | None = None,
    ) -> Job:
        job = self._get(org, job_id)
        if epoch is not None and job.epoch != epoch:
            raise StaleEpoch(f"job {job_id} is no longer at epoch {epoch}")
        if job.status == status:
            return job
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.status.value})")
        return self._apply(job, status, now, reason, exit_code)

    # JobStore
    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        self.jobs[job.id] = job
        self.data_keys[job.id] = data_key_wrapped

    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[PoolPolicy | ControlPlaneError]:
        outcomes: list[PoolPolicy | ControlPlaneError] = []
        for job, data_key_wrapped in jobs:
            try:
                policy = await self.pool_policy(job.org, job.spec.pool)
                admit(job, policy)
            except ControlPlaneError as exc:
                outcomes.append(exc)
                continue
            await self.create_job(job, data_key_wrapped)
            outcomes.append(policy)
        return outcomes

    async def get_job(self, org: str, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.org == org else None

    async def list_jobs(
        self, org: str, limit: int, before_id: str | None, where: JobFilter | None = None
    ) -> list[Job]:
        where = where or JobFilter()
        mine = [
            j
            for j in self.jobs.values()
            if j.org == org
            and j.id < (before_id or "\U0010ffff")
            and (not where.statuses or j.status in where.statuses)
            and all(j.spec.labels.get(k) == v for k, v in where.labels)
            and (not where.pool or j.spec.pool == where.pool)
            and (where.since is None or j.created_at >= where.since)
        ]
        return sorted(mine, key=lambda j: j.id, reverse=True)[:limit]

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        live = (JobStatus.ASSIGNED, JobStatus.RUNNING)
        return sorted(
            (j for j in self.jobs.values() if j.org == org and j.agent_id == agent_id and j.status in live),
            key=lambda j: j.id,
        )

    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        policy = self.policies.get((org, pool))
        if policy is None:
            raise NotFound(f"pool {org}/{pool} not found")
        return policy

    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        job = self.jobs.get(job_id)
        if (
            job is None
            or job.org != org
            or job.agent_id != agent_id
            or job.epoch != epoch
            or job.status in _TAKEN_BACK
        ):
            raise NotHeld(job_id)
        return job

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
        job = await self.held_job(org, job_id, agent_id, epoch)
        if last_seq is not None and job.last_seq != last_seq:
            raise FailedPrecondition(f"result of job {job_id} arrived before its log")
        if job.status.terminal or job.status == status:
            return job, False
        if status == JobStatus.RUNNING and job.status != JobStatus.ASSIGNED:
            return job, False
        return self._apply(job, status, now, reason, exit_code), True

    async def report_jobs(
        self, reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        outcomes: list[tuple[Job, bool] | ControlPlaneError] = []
        for r in reports:
            try:
                if r.isolation is not None:
                    await self.record_isolation(r.org, r.job_id, r.agent_id, r.epoch, r.isolation)
                if r.services:
                    held = await self.held_job(r.org, r.job_id, r.agent_id, r.epoch)
                    self.jobs[r.job_id] = replace(held, service_isolation=r.services)
                outcomes.append(
                    await self.report_job(
                        r.org, r.job_id, r.agent_id, r.epoch, r.status, now, r.reason, r.exit_code, r.last_seq
                    )
                )
            except ControlPlaneError as exc:
                outcomes.append(exc)
        return outcomes

    async def record_isolation(
        self, org: str, job_id: str, agent_id: str, epoch: int, isolation: Isolation
    ) -> None:
        job = await self.held_job(org, job_id, agent_id, epoch)
        self.jobs[job_id] = replace(job, isolation=isolation)

    async def record_fetch(self, org: str, job_id: str, agent_id: str, epoch: int, fetch: FetchStep) -> None:
        job = await self.held_job(org, job_id, agent_id, epoch)
        self.jobs[job_id] = replace(job, fetch=fetch)

    async def job_agents(self, org: str, agent_ids: set[str]) -> dict[str, JobAgent]:
        return {a: JobAgent(a, f"agent-{a}", "", "", "default") for a in agent_ids}

    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        self.reports.setdefault(job_id, []).append((path, cases, error))

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        self._get(org, job_id)
        reports = self.reports.get(job_id, [])
        return [c for _, cases, _ in reports for c in cases], [e for _, _, e in reports if e]

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        found = self.blobs.get(blob_id)
        return found if found is not None and found[0].org == org else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        for info, key in self.blobs.values():
            if (info.org, info.job_id, info.kind, info.path) == (org, job_id, kind, path):
                return info, key
        return None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        return [i for i, _ in self.blobs.values() if (i.org, i.job_id, i.kind) == (org, job_id, kind)]

    async def jobs_blobs(
        self, org: str, job_ids: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, list[BlobInfo]]:
        found: dict[str, list[BlobInfo]] = {}
        for info, _ in sorted(self.blobs.values(), key=lambda blob: blob[0].path):
            if info.org == org and info.job_id is not None and info.job_id in job_ids and info.kind in kinds:
                found.setdefault(info.job_id, []).append(info)
        return found


class MemorySecrets:
    """``SecretStore``: (org, name) -> (wrapped data key, sealed value, set at)."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], tuple[bytes, bytes, datetime]] = {}
        self.used: dict[tuple[str, str], tuple[datetime, str]] = {}

    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        self.secrets[(org, name)] = (data_key, sealed, now)

    async def list_secrets(self, org: str) -> list[SecretInfo]:
        found = sorted((name, at) for (o, name), (_, _, at) in self.secrets.items() if o == org)
        return [SecretInfo(name, at, *self.used.get((org, name), (None, ""))) for name, at in found]

    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        self.used.update({(org, n): (now, job_id) for n in names if (org, n) in self.secrets})

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        found = self.secrets.pop((org, name), None)
        return found[2] if found is not None else None

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        found = {n: self.secrets.get((org, n)) for n in names}
        return {n: (v[0], v[1]) for n, v in found.items() if v is not None}


class UnusedLeases:
    """``LeaseStore`` for tests that never extend, expire or retry a lease."""

    async def extend_leases(self, org: str, agent_id: str, held: dict[str, int], until: datetime) -> int:
        raise _unused("extend_leases")

    async def extend_all_leases(self, until: datetime) -> int:
        raise _unused("extend_all_leases")

    async def release_job(
        self, org: str, job_id: str, epoch: int, status: JobStatus, reason: str, now: datetime
    ) -> Job:
        raise _unused("release_job")

    async def expire_leases(self, now: datetime) -> list[tuple[Job, str]]:
        raise _unused("expire_leases")

    async def retryable_jobs(self, limit: int) -> list[Job]:
        raise _unused("retryable_jobs")

    async def create_retry(self, lost: Job, retry: Job, data_key_wrapped: bytes) -> Job | None:
        raise _unused("create_retry")


class UnusedLogs:
    """``LogStore`` for tests that store and read no log."""

    async def get_job_data_key(self, org: str, job_id: str) -> bytes:
        raise _unused("get_job_data_key")

    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        raise _unused("held_job")

    async def append_log_batch(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        seq: int,
        entries: list[tuple[LogStream, bytes, int]],
        link: Callable[[bytes], bytes] | None = None,
        at: Callable[[int], None] | None = None,
    ) -> int:
        raise _unused("append_log_batch")

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]:
        raise _unused("read_log")

    async def read_log_batches(
        self, org: str, job_id: str, after_seq: int, limit: int
    ) -> list[StoredLogBatch]:
        raise _unused("read_log_batches")


class UnusedBlobs:
    """``BlobStore`` for tests that write and read no file."""

    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None:
        raise _unused("create_blob")

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        raise _unused("add_blob_chunk")

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        raise _unused("complete_blob")

    async def delete_blob(self, blob_id: str) -> None:
        raise _unused("delete_blob")

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        raise _unused("blob_chunk")


# auth ---------------------------------------------------------------------------------
@dataclass
class MemoryCredentials:
    """``CredentialStore``: API keys, users, refresh tokens and failure counts."""

    api_keys: dict[str, ApiKeyRecord] = field(default_factory=dict)
    users: dict[tuple[str, str], UserRecord] = field(default_factory=dict)
    """(org, name) -> user."""
    refresh: dict[str, RefreshRecord] = field(default_factory=dict)
    failures: list[tuple[str, datetime]] = field(default_factory=list)
    address_failures_at: dict[str, list[datetime]] = field(default_factory=dict)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return self.api_keys.get(key_id)

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        self.api_keys[key_id] = replace(self.api_keys[key_id], last_used_at=now)

    async def find_user(self, org: str, name: str) -> UserRecord | None:
        return self.users.get((org, name))

    async def get_user(self, org: str, user_id: str) -> UserRecord | None:
        return next((u for u in self.users.values() if u.org == org and u.id == user_id), None)

    async def create_refresh_token(self, record: RefreshRecord) -> None:
        self.refresh[record.id] = record

    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        record = self.refresh.get(token_id)
        if record is None:
            return None
        if record.used_at is None:
            self.refresh[token_id] = replace(record, used_at=now)
        return record, record.used_at is None

    async def revoke_refresh_family(self, family: str, now: datetime) -> int:
        members = [r for r in self.refresh.values() if r.family == family]
        for r in members:
            self.refresh[r.id] = replace(r, revoked_at=r.revoked_at or now)
        return len(members)

    async def family_revoked(self, family: str) -> bool:
        return any(r.family == family and r.revoked_at is not None for r in self.refresh.values())

    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int:
        self.failures = [(s, at) for s, at in self.failures if at >= now - keep] + [(subject, now)]
        return sum(1 for s, _ in self.failures if s == subject)

    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        times = [at for s, at in self.failures if s == subject and at >= since]
        return len(times), max(times, default=None)

    async def clear_auth_failures(self, subject: str) -> None:
        self.failures = [(s, at) for s, at in self.failures if s != subject]

    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int:
        times = self.address_failures_at.setdefault(address, [])
        if times and times[-1] < now - window:
            times.clear()  # quiet for a whole window: counted afresh
        times.append(now)
        return len(times)

    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]:
        times = self.address_failures_at.get(address, [])
        if not times or times[-1] < since:
            return 0, None
        return len(times), times[-1]


class MemoryAudit:
    """``AuditStore``: the chained entries, and the head the real backend keeps."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []
        self.head: tuple[int, bytes, bytes] | None = None

    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry:
        prev = self.entries[-1].hash if self.entries else GENESIS
        entry = chain.entry(len(self.entries) + 1, prev, event)
        self.entries.append(entry)
        self.head = (entry.seq, entry.hash, chain.head_mac(entry.seq, entry.hash))
        return entry

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        return list(self.entries), self.head

    def actions(self) -> list[str]:
        return [e.event.action for e in self.entries]


# mypy checks each fake against the protocol it stands in for.
_queue: type[QueueStore] = MemoryJobs
_jobs: type[JobStore] = MemoryJobs
_secrets: type[SecretStore] = MemorySecrets
_leases: type[LeaseStore] = UnusedLeases
_logs: type[LogStore] = UnusedLogs
_blobs: type[BlobStore] = UnusedBlobs
_credentials: type[CredentialStore] = MemoryCredentials
_audit: type[AuditStore] = MemoryAudit
