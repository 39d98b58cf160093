"""The control plane's answer to a job container that is not isolated as it must be
(``isolation_policy.py``), its own or its fetch step's or a service's: the job ends
ERROR, naming every differing field and whose container it is; its
agent is told to stop the container and say nothing more about it (the cancel
that an agent gets for a job taken back from it: no artifacts come from a
container whose isolation failed); the event goes to the log and the audit
chain. The facts themselves are stored with the started report either way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog

from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, NotFound
from testhide.controlplane.jobs.isolation_policy import (
    Mismatch,
    fetch_mismatches,
    isolation_mismatches,
    mismatch_reason,
    service_mismatches,
)
from testhide.controlplane.jobs.model import (
    Isolation,
    Job,
    JobReport,
    JobStatus,
    PoolPolicy,
    ServiceIsolation,
)
from testhide.controlplane.jobs.reports import Outcome
from testhide.controlplane.jobs.scheduler import AgentSession, Cancel

if TYPE_CHECKING:
    from testhide.controlplane.auth.audit import Auditor

log = structlog.get_logger("testhide.jobs")

MISMATCH_EVENT = "job_isolation_mismatch"


class StatusStore(Protocol):
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


class IsolationGuard:
    def __init__(
        self,
        store: StatusStore,
        pool_policy: Callable[[str, str], Awaitable[PoolPolicy]],
        auditor: Auditor | None = None,
    ) -> None:
        self._store = store
        self._pool_policy = pool_policy
        self._auditor = auditor

    async def check(
        self, session: AgentSession, reports: Sequence[JobReport], outcomes: Sequence[Outcome]
    ) -> list[Job]:
        """Each stored RUNNING report's facts (``outcomes``: the store's, in order) against
        its job and pool: the jobs that ended ERROR for them."""
        ended: list[Job] = []
        for report, outcome in zip(reports, outcomes, strict=True):
            if not has_facts(report) or isinstance(outcome, ControlPlaneError):
                continue
            job = await self.enforce(session, outcome[0], report.isolation, report.services)
            if job is not None:
                ended.append(job)
        return ended

    async def enforce(
        self,
        session: AgentSession,
        job: Job,
        facts: Isolation | None,
        services: Sequence[ServiceIsolation] = (),
    ) -> Job | None:
        """``job`` (as just reported RUNNING by ``session``'s agent) ended ERROR if
        ``facts`` (its container's) or ``services`` (its services') break what its spec
        and pool require; None if they hold, or if the job has ended or moved on
        meanwhile (nothing left to stop)."""

        def check(policy: PoolPolicy) -> list[Mismatch]:
            found = isolation_mismatches(job.spec, policy, facts) if facts is not None else []
            return found + service_mismatches(job.spec, policy, services, facts)

        return await self._end_if(session, job, check)

    async def enforce_fetch(self, session: AgentSession, job: Job, facts: Isolation) -> Job | None:
        """As ``enforce``, for the facts of the job's fetch step's container (reported with
        the step, before the job step may run)."""
        return await self._end_if(
            session, job, lambda policy: fetch_mismatches(job.id, job.spec, policy, facts)
        )

    async def _end_if(
        self, session: AgentSession, job: Job, check: Callable[[PoolPolicy], list[Mismatch]]
    ) -> Job | None:
        if job.status.terminal:
            return None
        try:
            policy = await self._pool_policy(job.org, job.spec.pool)
        except NotFound:  # the pool was removed under the job: the job's own spec still binds it
            policy = PoolPolicy()
        mismatches = check(policy)
        if not mismatches:
            return None
        return await self._end(session, job, mismatches)

    async def _end(self, session: AgentSession, job: Job, mismatches: list[Mismatch]) -> Job | None:
        reason = mismatch_reason(mismatches)
        fields = [m.where for m in mismatches]
        agent_id = session.identity.agent_id
        log.warning(MISMATCH_EVENT, job_id=job.id, agent_id=agent_id, fields=fields, reason=reason)
        try:
            ended = await self._store.set_job_status(
                job.org, job.id, job.epoch, JobStatus.ERROR, datetime.now(UTC), reason
            )
        except (FailedPrecondition, NotFound) as exc:  # ended, or taken back, meanwhile
            log.info("job_isolation_mismatch_not_applied", job_id=job.id, error=str(exc))
            return None
        session.jobs.discard(job.id)
        session.send(Cancel(job.id, reason, abandon=True))
        if self._auditor is not None:
            try:
                await self._auditor.record(
                    MISMATCH_EVENT,
                    f"agent:{agent_id}",
                    org=job.org,
                    target=job.id,
                    fields=fields,
                    mismatches=[str(m) for m in mismatches],
                )
            except ControlPlaneError as exc:  # the job has ended all the same; the log above has it
                log.error("audit_record_failed", action=MISMATCH_EVENT, job_id=job.id, error=str(exc))
        return ended


def checked_parts(reports: Sequence[JobReport]) -> list[list[JobReport]]:
    """``reports`` in consecutive parts, each written in a transaction of its own: a
    RUNNING report with isolation facts ends its part when a later report names the same
    job (its result, in the same batch), so the facts are checked before the result is
    taken: a job whose isolation failed ends ERROR, however fast it ran."""
    last = {report.job_id: i for i, report in enumerate(reports)}
    parts: list[list[JobReport]] = [[]]
    for i, report in enumerate(reports):
        parts[-1].append(report)
        if has_facts(report) and last[report.job_id] > i:
            parts.append([])
    return [part for part in parts if part]


def has_facts(report: JobReport) -> bool:
    """Does the report carry isolation facts to check (its container's or its services')?"""
    return report.isolation is not None or bool(report.services)
