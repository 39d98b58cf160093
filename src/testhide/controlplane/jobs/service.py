"""What users and agents do with jobs. Callers pass the organisation they are
authenticated for; agents' org and pool come from their certificates."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import structlog

from testhide.common.identity import AgentIdentity
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.errors import (
    ControlPlaneError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotHeld,
)
from testhide.controlplane.jobs.blobs import BlobVault
from testhide.controlplane.jobs.creations import JobCreator
from testhide.controlplane.jobs.egress import require_egress
from testhide.controlplane.jobs.isolation_guard import IsolationGuard, checked_parts
from testhide.controlplane.jobs.isolation_policy import requested_runtime
from testhide.controlplane.jobs.junit import MAX_REPORT_BYTES, JunitError, parse_junit
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook, check_log_chain
from testhide.controlplane.jobs.model import (
    BlobInfo,
    FetchStep,
    Isolation,
    Job,
    JobFilter,
    JobReport,
    JobSpec,
    JobStatus,
    JobUpdate,
    LogBatchRecord,
    LogChunk,
    LogStream,
    PoolPolicy,
    ServiceIsolation,
    TestCase,
    new_job_id,
)
from testhide.controlplane.jobs.reports import Outcome, ReportCommitter
from testhide.controlplane.jobs.scheduler import (
    AgentSession,
    AssignDetails,
    Cancel,
    LogAck,
    ResultAck,
    Scheduler,
)
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.jobs.store import JobStore
from testhide.controlplane.jobs.validation import validate_relative_path, validate_spec

if TYPE_CHECKING:
    from testhide.controlplane.auth.audit import Auditor
    from testhide.controlplane.jobs.statements import StatementRecorder
    from testhide.controlplane.metrics import ControlPlaneMetrics

log = structlog.get_logger("testhide.jobs")

MAX_PAGE = 500
DEFAULT_PAGE = 50
# How long a follower waits before re-reading the store even without a wake-up, when
# this replica holds the job's agent (writes here wake followers).
FOLLOW_RECHECK_S = 5.0
# How often a follower that is told about changes looks again at a job that waits.
WAITING_RECHECK_S = 1.0
POLICY_CACHE_S = 1.0


MAX_WORKSPACE_BYTES = 256 * 1024 * 1024
SERVICE_LOG = "service_log"
"""The blob kind of a service's output: stored and limited as the job's files are."""
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
MAX_JOB_ARTIFACT_BYTES = 1024 * 1024 * 1024


def disallowed_image(spec: JobSpec, policy: PoolPolicy) -> str:
    """Why the pool does not run the job's image or one of its services' ("" if it does)."""
    if not policy.allowed_images:
        return ""
    allowed = f"(allowed: {', '.join(policy.allowed_images)})"
    if not any(fnmatchcase(spec.image, p) for p in policy.allowed_images):
        return f"image {spec.image!r} is not allowed in pool {spec.pool!r} {allowed}"
    for service in spec.services:
        if not any(fnmatchcase(service.image, p) for p in policy.allowed_images):
            image = f"image {service.image!r}"
            return f"service {service.name}: {image} is not allowed in pool {spec.pool!r} {allowed}"
    return ""


def _admit(job: Job, policy: PoolPolicy) -> None:
    """What refuses a submitted job outright (it is not stored), given its pool's policy."""
    if job.spec.fetch:
        require_egress(job.spec.pool, policy.egress_allow)


class JobService:
    def __init__(
        self,
        store: JobStore,
        master: MasterKey,
        scheduler: Scheduler,
        logs: LogBook,
        blobs: BlobVault,
        secrets: SecretVault,
        leases: Leases,
        metrics: ControlPlaneMetrics | None = None,
        auditor: Auditor | None = None,
        statements: StatementRecorder | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._leases = leases
        self._policies: dict[tuple[str, str], tuple[float, PoolPolicy]] = {}
        self._master = master
        self._scheduler = scheduler
        self._logs = logs
        self._blobs = blobs
        self._secrets = secrets
        self._reports = ReportCommitter(store, statements=statements)
        self._creations = JobCreator(store, _admit)
        self._isolation = IsolationGuard(store, self._pool_policy, auditor)
        self._auditor = auditor
        scheduler.prepare = self.assignment_details

    # users --------------------------------------------------------------------
    async def submit(self, org: str, spec: JobSpec) -> Job:
        validate_spec(spec)
        if spec.workspace_id:
            found = await self._store.get_blob(org, spec.workspace_id)
            if found is None or found[0].kind != "workspace":
                raise InvalidArgument(f"workspace {spec.workspace_id} not found; upload it first")
        names = tuple(dict.fromkeys(spec.secrets + spec.fetch_secrets))
        missing = await self._secrets.missing(org, names) if names else []
        if missing:
            raise InvalidArgument(f"secrets not found in this organisation: {', '.join(missing)}")
        job_id = new_job_id()
        _, wrapped = self._master.new_data_key(aad=job_id.encode())
        job = Job(id=job_id, org=org, spec=spec, status=JobStatus.QUEUED, created_at=datetime.now(UTC))
        try:  # written with the other submissions of the moment, against the pool's policy of now
            policy = await self._creations.create(job, wrapped)
        except NotFound as exc:
            raise InvalidArgument(f"pool {spec.pool!r} does not exist in this organisation") from exc
        log.info("job_submitted", job_id=job_id, org=org, pool=spec.pool, image=spec.image)
        reason = disallowed_image(spec, policy)
        if reason:
            # Refused before anything runs, yet recorded: the engineer sees the job and why.
            job = await self._store.set_job_status(
                org, job_id, None, JobStatus.ERROR, datetime.now(UTC), reason
            )
            self._logs.notify(job_id)
            return job
        self._scheduler.queued(org, spec.pool)
        return job

    async def assignment_details(self, job: Job) -> AssignDetails:
        policy = await self._pool_policy(job.org, job.spec.pool)
        runtime = requested_runtime(job.spec, policy)
        spec = job.spec
        if spec.fetch:  # the list was cleared since the job was queued: it ends, saying why
            require_egress(spec.pool, policy.egress_allow)
        # One look-up (and one last-use record) for the job's secrets and its fetch step's.
        names = tuple(dict.fromkeys(spec.secrets + spec.fetch_secrets))
        values = await self._secrets.resolve(job.org, names, job.id) if names else {}
        return AssignDetails(
            {n: values[n] for n in spec.secrets},
            policy,
            runtime,
            fetch_secret_env={n: values[n] for n in spec.fetch_secrets},
        )

    async def _pool_policy(self, org: str, pool: str) -> PoolPolicy:
        """Cached for a second: dispatching a thousand jobs asks a thousand times,
        and an operator's change may take a second, as revocations do."""
        now = time.monotonic()
        cached = self._policies.get((org, pool))
        if cached is None or now - cached[0] > POLICY_CACHE_S:
            cached = self._policies[(org, pool)] = (now, await self._store.pool_policy(org, pool))
        return cached[1]

    async def get(self, org: str, job_id: str) -> Job:
        """The job as its owner sees it: with its agent, and why it waits if it does."""
        return (await self.with_agents(org, [await self._current(org, job_id)]))[0]

    async def with_agents(self, org: str, jobs: builtins.list[Job]) -> builtins.list[Job]:
        """``jobs`` with their agents' names, hosts and versions: one query for all."""
        agents = await self._store.job_agents(org, {j.agent_id for j in jobs if j.agent_id})
        return [replace(j, agent=agents[j.agent_id]) if j.agent_id in agents else j for j in jobs]

    async def _current(self, org: str, job_id: str) -> Job:
        job = await self._store.get_job(org, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.status == JobStatus.QUEUED:
            paused = (await self._store.pool_policy(org, job.spec.pool)).paused  # not cached: resumed is news
            job = replace(job, status_reason=self._scheduler.explain_queued(job, paused))
        return job

    async def upload_workspace(self, org: str, chunks: AsyncIterator[bytes]) -> BlobInfo:
        return await self._blobs.write(org, "workspace", None, "", chunks, MAX_WORKSPACE_BYTES)

    async def artifacts(self, org: str, job_id: str) -> list[BlobInfo]:
        """The job's files and its services' logs (``BlobInfo.kind`` tells them apart)."""
        await self.get(org, job_id)
        return await self._artifacts(org, job_id)

    async def _artifacts(self, org: str, job_id: str) -> list[BlobInfo]:
        files = await self._store.list_blobs(org, job_id, "artifact")
        return files + await self._store.list_blobs(org, job_id, SERVICE_LOG)

    async def artifact(self, org: str, job_id: str, path: str) -> AsyncIterator[bytes]:
        await self.get(org, job_id)
        # services/NAME.log is the service's log, even if the job also kept a file of that name.
        kinds = (SERVICE_LOG, "artifact") if path.startswith("services/") else ("artifact",)
        found = None
        for kind in kinds:
            found = found or await self._store.find_blob(org, job_id, kind, path)
        if found is None:
            raise NotFound(f"job {job_id} has no artifact {path!r}")
        async for chunk in self._blobs.read(*found):
            yield chunk

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        return await self._store.test_results(org, job_id)

    def log_batches(self, org: str, job_id: str) -> AsyncIterator[LogBatchRecord]:
        """The job's stored log batches with their chain links, for verifying its log."""
        return self._logs.batches(org, job_id)

    async def list(
        self, org: str, page_size: int, page_token: str, where: JobFilter | None = None
    ) -> tuple[list[Job], str]:
        """A page of the organisation's jobs that match ``where``, newest first, and
        the token of the next page ("" after the last). The token is the last job's
        id: the next page, asked for with the same filter, starts after it."""
        if not 0 <= page_size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE}, not {page_size}")
        size = page_size or DEFAULT_PAGE
        jobs = await self._store.list_jobs(org, size + 1, page_token or None, where)
        more = len(jobs) > size
        jobs = await self.with_agents(org, jobs[:size])
        return jobs, (jobs[-1].id if more else "")

    async def cancel(self, org: str, job_id: str) -> Job:
        job = await self.get(org, job_id)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.status.value})")
        session = self._scheduler.session_of(job.agent_id) if job.agent_id else None
        if (
            session is None
            and job.status != JobStatus.QUEUED
            and await self._scheduler.cluster.cancel_elsewhere(org, job_id, job.agent_id)
        ):
            return job  # the replica that holds the agent's stream tells it
        return await self.cancel_here(org, job)

    async def cancel_held_elsewhere(self, org: str, job_id: str) -> None:
        """Another replica forwarded a cancel for a job whose agent we hold (or held)."""
        try:
            job = await self.get(org, job_id)
            if not job.status.terminal:
                await self.cancel_here(org, job)
        except ControlPlaneError as exc:
            log.warning("job_cancel_forwarded_failed", job_id=job_id, error=str(exc))

    async def cancel_here(self, org: str, job: Job) -> Job:
        job_id = job.id
        session = self._scheduler.session_of(job.agent_id) if job.agent_id else None
        if job.status == JobStatus.QUEUED or session is None or job_id not in session.jobs:
            job = await self._store.set_job_status(
                org, job_id, None, JobStatus.CANCELED, datetime.now(UTC), "canceled by user"
            )
            self._logs.notify(job_id)
            return job
        session.send(Cancel(job_id, "canceled by user"))
        log.info("job_cancel_requested", job_id=job_id, agent_id=job.agent_id)
        return job

    async def follow(self, org: str, job_id: str, offset: int, follow: bool) -> AsyncIterator[LogChunk | Job]:
        """Log chunks from ``offset``; with ``follow``, until the job has ended
        and all its log was sent, then the final job."""
        async with aclosing(self.follow_with_updates(org, job_id, offset, follow, updates=False)) as items:
            async for item in items:
                if not isinstance(item, JobUpdate):
                    yield item

    async def follow_with_updates(
        self, org: str, job_id: str, offset: int, follow: bool, updates: bool = True
    ) -> AsyncGenerator[LogChunk | Job | JobUpdate, None]:
        """``follow``, and with ``updates`` (when following) the job whenever its
        status or status reason changed, the first at once."""
        if offset < 0:
            raise InvalidArgument("from_offset must not be negative")
        await self._current(org, job_id)  # first: a job that does not exist gets no watch
        shown: tuple[JobStatus, str] | None = None
        with self._logs.watch(job_id) as watch:  # removed however the follower leaves
            while True:
                changed = watch.changed()
                job = await self._current(org, job_id)
                if updates and follow and (job.status, job.status_reason) != shown:
                    shown = (job.status, job.status_reason)
                    yield JobUpdate((await self.with_agents(org, [job]))[0])
                async for chunk in self._logs.read(org, job_id, offset, job.log_size):
                    offset = chunk.offset + len(chunk.data)
                    yield chunk
                if not follow:
                    return
                # A LOST job about to be retried ends for its followers once they can see the retry.
                if job.status.terminal and offset >= job.log_size and not job.retryable:
                    yield (await self.with_agents(org, [job]))[0]
                    return
                if offset >= job.log_size:
                    try:
                        async with asyncio.timeout(self._follow_recheck_s(job, updates)):
                            await changed.wait()
                    except TimeoutError:
                        pass

    def _follow_recheck_s(self, job: Job, updates: bool) -> float:
        """How long a follower waits before reading the job again without a wake-up."""
        if updates and job.status in (JobStatus.QUEUED, JobStatus.ASSIGNED):
            # Why a job waits changes with agents coming and going, which wakes no follower.
            return WAITING_RECHECK_S
        session = self._scheduler.session_of(job.agent_id) if job.agent_id else None
        # A job whose agent another replica holds is written there: look again soon.
        if session is not None and job.id in session.jobs:
            return FOLLOW_RECHECK_S
        return self._scheduler.cluster.follow_recheck_s

    # agents -------------------------------------------------------------------
    # Whatever an agent says about a job is taken only if it holds the job at the epoch
    # it gives (JobStore.held_job; the store's report and log writes apply the same test in
    # their own transaction). Anything else raises NotHeld: the one answer a job that
    # does not exist gets too, naming neither its holder nor its epoch.
    async def leased(self, identity: AgentIdentity, job_id: str, epoch: int) -> Job:
        """The job, if this agent holds it at this epoch (it may have ended since)."""
        return await self._store.held_job(identity.org, job_id, identity.agent_id, epoch)

    async def workspace_for(self, identity: AgentIdentity, job_id: str, epoch: int) -> AsyncIterator[bytes]:
        job = await self.leased(identity, job_id, epoch)
        if not job.spec.workspace_id:
            raise NotFound(f"job {job_id} has no workspace")
        found = await self._store.get_blob(job.org, job.spec.workspace_id)
        if found is None:
            raise NotFound(f"the workspace of job {job_id} is gone")
        async for chunk in self._blobs.read(*found):
            yield chunk

    async def store_artifact(
        self,
        identity: AgentIdentity,
        job_id: str,
        epoch: int,
        path: str,
        kind: str,
        sha256: str,
        chunks: AsyncIterator[bytes],
    ) -> BlobInfo:
        job = await self.leased(identity, job_id, epoch)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} has already ended")
        validate_relative_path("artifact path", path)
        if kind == SERVICE_LOG and path not in {f"services/{s.name}.log" for s in job.spec.services}:
            raise InvalidArgument(f"a service log's path is services/NAME.log for a service of job {job_id}")
        stored = sum(b.size for b in await self._artifacts(job.org, job_id))
        limit = min(MAX_ARTIFACT_BYTES, MAX_JOB_ARTIFACT_BYTES - stored)
        report = bytearray()

        async def keep_report() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                report.extend(chunk)
                yield chunk

        if kind == "junit":
            info = await self._blobs.write(job.org, kind, job_id, path, keep_report(), MAX_REPORT_BYTES)
        else:
            info = await self._blobs.write(job.org, kind, job_id, path, chunks, limit)
        if info.sha256 != sha256:
            raise InvalidArgument(f"{path}: received data does not match the announced sha256")
        if kind == "junit":
            try:
                cases, error = parse_junit(bytes(report)), ""
            except JunitError as exc:
                cases, error = [], str(exc)
                log.warning("junit_report_refused", job_id=job_id, path=path, error=error)
            await self._store.record_test_report(job_id, path, cases, error)
        return info

    async def on_hello(self, session: AgentSession, running: dict[str, int]) -> None:
        """Reconcile what the agent says it runs with what the store says."""
        org = session.identity.org
        for job in await self._store.jobs_of_agent(org, session.identity.agent_id):
            if running.get(job.id) == job.epoch:
                session.jobs.add(job.id)
            elif job.status == JobStatus.ASSIGNED:
                await self._leases.release(job, JobStatus.QUEUED, "agent reconnected without it; requeued")
            else:
                await self._leases.release(job, JobStatus.LOST, "agent reconnected without it (it restarted)")
        for job_id in running.keys() - session.jobs:
            session.send(Cancel(job_id, str(NotHeld(job_id)), abandon=True))
        await self._leases.extend(session, {j: e for j, e in running.items() if j in session.jobs})
        await self._leases.retry_lost()
        self._scheduler.kick(org, session.identity.pool)

    async def on_heartbeat(self, session: AgentSession, held: dict[str, int], draining: bool) -> None:
        """``draining``: the agent takes no new jobs (shutting down, or its container engine is down)."""
        await self._leases.extend(session, held)
        if draining != session.draining:
            session.draining = draining
            log.info(
                "agent_availability_changed", agent_id=session.identity.agent_id, taking_jobs=not draining
            )
            if not draining:
                self._scheduler.kick(session.identity.org, session.identity.pool)

    async def on_refused(self, session: AgentSession, job_id: str, epoch: int, reason: str) -> None:
        """The agent will not run an assignment (it is shutting down): queue it again."""
        job = await self.leased(session.identity, job_id, epoch)
        session.jobs.discard(job_id)
        if job.status == JobStatus.ASSIGNED:
            await self._leases.release(job, JobStatus.QUEUED, f"agent refused it ({reason[:200]}); requeued")

    async def on_started(
        self,
        session: AgentSession,
        job_id: str,
        epoch: int,
        isolation: Isolation | None = None,
        services: tuple[ServiceIsolation, ...] = (),
    ) -> None:
        """RUNNING, with what the agent read back from the job's container and its services'
        (stored in the same transaction, so whoever sees the job running sees how it is isolated)."""
        report = JobReport(
            *_holder(session), job_id, epoch, JobStatus.RUNNING, isolation=isolation, services=services
        )
        await self._report_one(session, report)

    async def on_fetched(self, session: AgentSession, job_id: str, epoch: int, fetch: FetchStep) -> None:
        """What the job's fetch step did (or that its cache was restored), from its holder
        only; reported first as its container starts, with the facts checked then."""
        identity = session.identity
        await self._store.record_fetch(identity.org, job_id, identity.agent_id, epoch, fetch)
        log.info(
            "job_fetch_started" if fetch.running else "job_fetched",
            job_id=job_id,
            cache=fetch.cache,
            exit_code=fetch.exit_code,
            requests=len(fetch.requests),
            refused=sum(1 for r in fetch.requests if not r.allowed),
        )
        if fetch.isolation is not None:  # checked as the step runs (isolation_guard.py)
            job = await self.leased(identity, job_id, epoch)
            if (ended := await self._isolation.enforce_fetch(session, job, fetch.isolation)) is not None:
                if self._metrics is not None:
                    self._metrics.job_finished(ended)
                self._scheduler.kick(ended.org, ended.spec.pool)
        self._logs.notify(job_id)

    async def on_log_batch(
        self,
        session: AgentSession,
        job_id: str,
        epoch: int,
        seq: int,
        entries: builtins.list[tuple[LogStream, bytes]],
    ) -> None:
        identity = session.identity
        stored = await self._logs.append(identity.org, identity.agent_id, job_id, epoch, seq, entries)
        session.send(LogAck(job_id, stored))
        if self._metrics is not None:
            self._metrics.log_received(identity.org, identity.pool, sum(len(data) for _, data in entries))

    async def on_result(
        self,
        session: AgentSession,
        job_id: str,
        epoch: int,
        last_seq: int,
        status: JobStatus,
        exit_code: int | None,
        reason: str,
    ) -> None:
        report = JobReport(*_holder(session), job_id, epoch, status, reason, exit_code, last_seq)
        await self._report_one(session, report)

    async def _report_one(self, session: AgentSession, report: JobReport) -> None:
        if (refused := (await self.on_reports(session, [report]))[0]) is not None:
            raise refused

    async def on_reports(
        self, session: AgentSession, reports: builtins.list[JobReport]
    ) -> builtins.list[ControlPlaneError | None]:
        """The holder's RUNNING and results, written with other streams' (group commit); for each, None
        or why it was refused, nothing of it written. A result is acknowledged once committed.
        A RUNNING report's isolation facts are checked once stored (``isolation_guard.py``)."""
        outcomes: builtins.list[Outcome] = []
        for part in checked_parts(reports):
            outcomes += await self._reports.report(part)
            for ended in await self._isolation.check(session, part, outcomes[-len(part) :]):
                if self._metrics is not None:
                    self._metrics.job_finished(ended)
                self._logs.notify(ended.id)
                self._scheduler.kick(ended.org, ended.spec.pool)
        for report, outcome in zip(reports, outcomes, strict=True):
            if isinstance(outcome, ControlPlaneError):
                continue
            job, changed = outcome
            if report.status == JobStatus.RUNNING:
                if changed:
                    log.info("job_started", job_id=job.id, agent_id=report.agent_id)
                    if self._metrics is not None:
                        self._metrics.job_started(job)
                    self._logs.notify(job.id)
                continue
            if changed:
                log.info("job_finished", job_id=job.id, status=job.status.value, exit_code=job.exit_code)
                await check_log_chain(job, self._auditor)
                if self._metrics is not None:
                    self._metrics.job_finished(job)
            session.jobs.discard(job.id)
            session.send(ResultAck(job.id))
            self._logs.notify(job.id)
        if any(r.status != JobStatus.RUNNING for r in reports):
            self._scheduler.kick(session.identity.org, session.identity.pool)
        return [o if isinstance(o, ControlPlaneError) else None for o in outcomes]


def _holder(session: AgentSession) -> tuple[str, str]:
    return session.identity.org, session.identity.agent_id
