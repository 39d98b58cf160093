"""The scope of an incident: everything a suspect agent touched, from the stored evidence, in
one report (``testhide-controlplane incident agent``, the Admin service's ``IncidentAgent``).

Each job it was handed (with its org, pool, image and times), the secrets those jobs received
by name (never a value: the report never reads one), the artifacts and test results they
produced, and whether each job still verifies (``operations/verdict.py``). Only the operator
passes ``org=None`` (any organisation); the Admin service passes the caller's, and an agent of
another organisation is NotFound with the words of any other admin call. Reading it is audited:
who looked into which agent is part of the incident's record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from testhide.controlplane.errors import NotFound, quoted
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import SecretInfo
from testhide.controlplane.operations import Actor
from testhide.controlplane.operations.agents import AgentView, agent_view
from testhide.controlplane.operations.verdict import Verdict, job_verdict
from testhide.controlplane.store.incident import MAX_INCIDENT_JOBS, AgentCertificate, AgentJob


@dataclass(frozen=True)
class JobScope:
    record: AgentJob
    verdict: Verdict

    @property
    def secret_names(self) -> tuple[str, ...]:
        """Every secret handed over with the job: its own and its fetch step's."""
        spec = self.record.job.spec
        return tuple(dict.fromkeys(spec.secrets + spec.fetch_secrets))


@dataclass(frozen=True)
class SecretExposure:
    """A secret handed to the agent with one or more of its jobs (its name only)."""

    name: str
    job_ids: tuple[str, ...]
    last_handed_at: datetime | None
    """When it was last handed to this agent (its job's assignment)."""
    info: SecretInfo | None
    """As stored now: updated when, last used by which job; None: deleted since."""

    @property
    def changed_since(self) -> bool:
        """Its value was set again after the agent last received it."""
        handed = self.last_handed_at
        return self.info is not None and handed is not None and self.info.updated_at > handed


@dataclass(frozen=True)
class IncidentReport:
    agent: AgentView
    certificates: list[AgentCertificate]
    since: datetime | None
    jobs: list[JobScope]
    secrets: list[SecretExposure]
    truncated: bool
    """More jobs than MAX_INCIDENT_JOBS: the oldest are left out (narrow with ``since``)."""

    @property
    def artifacts(self) -> int:
        return sum(len(j.record.artifacts) for j in self.jobs)

    def verdicts(self, verifies: bool | None) -> int:
        return sum(1 for j in self.jobs if j.verdict.verifies is verifies)


async def agent_incident(
    actor: Actor, logs: LogBook, org: str | None, agent_id: str, since: datetime | None, holders: set[str]
) -> IncidentReport:
    store = actor.store
    agent = await store.incident_agent(agent_id, org)
    if agent is None:
        raise NotFound(f"agent {quoted(agent_id)} not found")
    found = await store.agent_jobs(agent.org, agent.id, since, MAX_INCIDENT_JOBS + 1)
    truncated = len(found) > MAX_INCIDENT_JOBS
    jobs = [JobScope(j, await job_verdict(store, logs, j.job)) for j in found[:MAX_INCIDENT_JOBS]]
    report = IncidentReport(
        agent_view(agent, holders, datetime.now(UTC)),
        await store.agent_certificates(agent.org, agent.id),
        since,
        jobs,
        _exposures(jobs, {s.name: s for s in await store.list_secrets(agent.org)}),
        truncated,
    )
    await actor.auditor.record(
        "agent_incident_reported",
        actor.name,
        org=agent.org,
        target=agent.id,
        source_ip=actor.source_ip,
        since=since.isoformat() if since else None,
        jobs=len(jobs),
        secrets=[s.name for s in report.secrets],
    )
    return report


def _exposures(jobs: list[JobScope], stored: dict[str, SecretInfo]) -> list[SecretExposure]:
    by_name: dict[str, list[JobScope]] = {}
    for scope in jobs:
        for name in scope.secret_names:
            by_name.setdefault(name, []).append(scope)
    exposures = []
    for name in sorted(by_name):
        handed = [s.record.assigned_at for s in by_name[name] if s.record.assigned_at is not None]
        exposures.append(
            SecretExposure(
                name,
                tuple(s.record.job.id for s in by_name[name]),
                max(handed, default=None),
                stored.get(name),
            )
        )
    return exposures
