"""What the scope of an incident reads from storage (``operations/incident.py``): a suspect
agent, the certificates it was issued, and every job it was handed with what came back.

An agent was handed a job, its secrets and its workspace, each time the job was assigned to
it: its ``ASSIGNED`` transition says ``agent ID``. The job's ``agent_id`` names only its last
holder, so a job whose lease lapsed before it started, and that another agent then ran, is
found by its transitions (indexed for this: migration 16)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from testhide.controlplane.jobs.model import BlobInfo, Job
    from testhide.controlplane.store.base import AgentRecord

CERTIFICATE_EVENTS = ("agent_enrolled", "agent_certificate_renewed")
"""The audit actions that record a certificate issued to an agent, with its serial
(``ca/enrollment.py``, ``ca/renewal.py``; the store may not import those: they import it)."""

MAX_INCIDENT_JOBS = 5000
"""The most jobs one report holds, newest first; more are cut off and the report says so."""


def assignment_reason(agent_id: str) -> str:
    """The reason of the ``ASSIGNED`` transition of a job handed to ``agent_id`` (both backends)."""
    return f"agent {agent_id}"


def certificate_of(action: str, at: datetime, details: dict[str, object]) -> AgentCertificate:
    """The certificate an audit entry of CERTIFICATE_EVENTS recorded."""
    not_after = details.get("not_after")
    return AgentCertificate(
        str(details.get("serial", "")),
        at,
        datetime.fromisoformat(not_after) if isinstance(not_after, str) and not_after else None,
        action,
    )


@dataclass(frozen=True)
class AgentCertificate:
    """A certificate issued to the agent, as the audit log recorded it."""

    serial: str
    issued_at: datetime
    not_after: datetime | None
    """None if the audit entry does not say."""
    event: str
    """``agent_enrolled`` or ``agent_certificate_renewed``."""


@dataclass(frozen=True)
class TestSummary:
    __test__ = False  # a domain type, not a pytest test class

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    unreadable_reports: int = 0
    """JUnit files the control plane could not read."""


@dataclass(frozen=True)
class AgentJob:
    """A job handed to the agent, with what it produced."""

    job: Job
    assigned_at: datetime | None
    """When it was last handed to this agent (None: its transitions do not say)."""
    artifacts: tuple[BlobInfo, ...]
    tests: TestSummary | None
    """None: the job stored no JUnit report."""
    held: bool
    """Whether this agent is the job's last holder (False: it was taken back from the agent
    before it started, and requeued)."""


class IncidentStore(Protocol):
    async def incident_agent(self, agent_id: str, org: str | None) -> AgentRecord | None:
        """The agent ``agent_id`` of ``org`` (of any organisation: None)."""
        ...

    async def agent_certificates(self, org: str, agent_id: str) -> list[AgentCertificate]:
        """Certificates issued to the agent (enrollment and renewals), oldest first."""
        ...

    async def agent_jobs(
        self, org: str, agent_id: str, since: datetime | None, limit: int = MAX_INCIDENT_JOBS
    ) -> list[AgentJob]:
        """Jobs of ``org`` handed to the agent, newest first, with their artifacts and test
        summaries; with ``since``, those not finished before it. At most ``limit``."""
        ...
