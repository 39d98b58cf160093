"""What the jobs package needs from storage, one small protocol per user:
``QueueStore`` for the scheduler, ``JobStore`` for the job service,
``LeaseStore`` for leases, ``LogStore`` for the log book, ``BlobStore`` for the
blob vault and ``SecretStore`` for the secret vault. Each lists only the calls
its user makes, so a unit test can fake it in a few lines; the backends in
``store/`` implement them all (``store.base.Store`` is their union).

Every query on tenant data takes the organisation, so an unscoped read cannot
be written by accident."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from testhide.controlplane.errors import ControlPlaneError
    from testhide.controlplane.jobs.model import (
        BlobInfo,
        FetchStep,
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
    from testhide.controlplane.store.base import StoredLogBatch, StoredLogEntry


class QueueStore(Protocol):
    """The scheduler's view: queued jobs and their assignment."""

    async def queued_pools(self) -> list[tuple[str, str]]:
        """Every (org, pool) with queued jobs: the scheduler's start-up scan."""
        ...

    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]: ...
    async def assign_job(
        self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
    ) -> Job | None: ...
    async def assign_jobs(
        self, org: str, pairs: Sequence[tuple[str, str]], now: datetime, lease_until: datetime
    ) -> list[Job | None]:
        """``assign_job`` for each (job id, agent id), in one transaction (the jobs
        without their transitions)."""
        ...

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


class BlobIndex(Protocol):
    """Finding stored files (workspaces, artifacts) without reading them."""

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None: ...
    async def find_blob(
        self, org: str, job_id: str, kind: str, path: str
    ) -> tuple[BlobInfo, bytes] | None: ...
    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]: ...


class JobStore(BlobIndex, Protocol):
    """The job service's view: what users and agents do with jobs."""

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None: ...
    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[PoolPolicy | ControlPlaneError]:
        """Queued jobs in one transaction (group commit), each with its pool's policy as
        read in that transaction: for each, in order, that policy, or why the job was
        not written (NotFound: the organisation has no such pool; whatever ``admit``,
        called before the job is written, raised). An error of the store fails them all."""
        ...

    async def get_job(self, org: str, job_id: str) -> Job | None: ...
    async def list_jobs(
        self, org: str, limit: int, before_id: str | None, where: JobFilter | None = None
    ) -> list[Job]:
        """Newest first: up to ``limit`` of the jobs before ``before_id`` that match ``where``."""
        ...

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        """The agent's assigned or running jobs."""
        ...

    async def pool_policy(self, org: str, pool: str) -> PoolPolicy: ...
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

    # what agents say about jobs: each is taken only from the job's holder at its epoch
    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        """The job, if ``agent_id`` holds it at ``epoch``: assigned to it then and not
        taken back since (ended on its report, or canceled, it stays its holder's).
        Otherwise NotHeld, the same for a job that does not exist. Every method
        that takes an agent's word applies this same test in its own transaction."""
        ...

    async def report_jobs(
        self, reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        """Several holders' reports, in order, in one transaction (group commit): for each,
        what ``report_job`` would return, or the error it would raise (NotHeld,
        FailedPrecondition), which wrote nothing of that report. An error of the
        store itself fails them all, with nothing written."""
        ...

    async def record_fetch(self, org: str, job_id: str, agent_id: str, epoch: int, fetch: FetchStep) -> None:
        """What the holding agent's fetch step did (NotHeld otherwise)."""
        ...

    async def job_agents(self, org: str, agent_ids: set[str]) -> dict[str, JobAgent]:
        """The agents of the organisation with these ids, in one query (for job views)."""
        ...

    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None: ...
    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]: ...


class LeaseStore(Protocol):
    """Leases: extended by heartbeats, released when they lapse, lost jobs retried."""

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


class LogStore(Protocol):
    """Job logs, sealed with the job's data key."""

    async def get_job_data_key(self, org: str, job_id: str) -> bytes: ...
    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        """See ``JobStore.held_job``."""
        ...

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
        """The holding agent's log batch ``seq``, stored once, with its chain link
        ``link(previous link)``, computed in the transaction that stores it (the job's
        chain is not continued without ``link``). ``at`` is called with the byte offset of
        the batch's first entry when this call stores it (not for a replay); it may be
        called again if the transaction is retried, and counts only once the call returns."""
        ...

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]: ...
    async def read_log_batches(
        self, org: str, job_id: str, after_seq: int, limit: int
    ) -> list[StoredLogBatch]:
        """Up to ``limit`` stored batches of the job after batch ``after_seq``, in seq order,
        with their chain links (NotFound for a job the organisation does not have)."""
        ...


class BlobStore(Protocol):
    """Writing and reading the chunks of stored files."""

    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None: ...
    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None: ...
    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None: ...
    async def delete_blob(self, blob_id: str) -> None: ...
    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None: ...


class SecretStore(Protocol):
    """An organisation's secrets, each sealed with its own data key."""

    async def put_secret(
        self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime
    ) -> None: ...
    async def list_secrets(self, org: str) -> list[SecretInfo]: ...
    async def delete_secret(self, org: str, name: str) -> datetime | None: ...
    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]: ...
    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        """``names`` were handed to an agent for ``job_id`` at ``now``."""
        ...
