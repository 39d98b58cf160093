"""Connected agents and the dispatch of queued jobs to them. One dispatcher
task owns assignment, so two agents never race for one job; the store's
conditional update fences other replicas."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from common.identity import AgentIdentity
from controlplane.jobs.model import Job
from controlplane.store.base import Store

log = structlog.get_logger("testhide.scheduler")


@dataclass(frozen=True)
class Assign:
    job: Job


@dataclass(frozen=True)
class Cancel:
    job_id: str
    reason: str


@dataclass(frozen=True)
class LogAck:
    job_id: str
    seq: int


@dataclass(frozen=True)
class ResultAck:
    job_id: str


@dataclass(frozen=True)
class TrustBundle:
    bundle_pem: bytes


Outbound = Assign | Cancel | LogAck | ResultAck | TrustBundle


@dataclass(eq=False)
class AgentSession:
    """One open Connect stream of one agent."""

    identity: AgentIdentity
    cert_serial: int
    cert_not_after: datetime
    cert_issuer: str
    max_jobs: int = 1
    close_reason: tuple[str, str] | None = None
    """Why the control plane ended the stream: (status code name, message)."""
    jobs: set[str] = field(default_factory=set)
    outbox: asyncio.Queue[Outbound] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free_slots(self) -> int:
        return self.max_jobs - len(self.jobs)

    def send(self, message: Outbound) -> None:
        self.outbox.put_nowait(message)

    def close(self, code: str, message: str) -> None:
        """End the stream with a status, at once."""
        if self.close_reason is None:
            self.close_reason = (code, message)
        self.closed.set()


class Scheduler:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._sessions: dict[str, AgentSession] = {}
        self._wake = asyncio.Event()
        self._pending: set[tuple[str, str]] = set()
        self._attached = asyncio.Condition()

    def session_of(self, agent_id: str) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def sessions(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def attach(self, session: AgentSession) -> None:
        previous = self._sessions.get(session.identity.agent_id)
        if previous is not None:
            previous.closed.set()  # the newer stream of the same agent wins
        self._sessions[session.identity.agent_id] = session
        self.kick(session.identity.org, session.identity.pool)
        asyncio.ensure_future(self._announce())

    async def _announce(self) -> None:
        async with self._attached:
            self._attached.notify_all()

    async def wait_for_agent(self, agent_id: str, replacing: AgentSession | None = None) -> AgentSession:
        """Until the agent has an open session, other than ``replacing`` if
        given (operators' tooling and tests)."""
        def ready() -> bool:
            session = self._sessions.get(agent_id)
            return session is not None and session is not replacing

        async with self._attached:
            await self._attached.wait_for(ready)
        return self._sessions[agent_id]

    def detach(self, session: AgentSession) -> None:
        if self._sessions.get(session.identity.agent_id) is session:
            del self._sessions[session.identity.agent_id]
        session.closed.set()

    def kick(self, org: str, pool: str) -> None:
        """Something changed in (org, pool): a job queued, an agent freed up."""
        self._pending.add((org, pool))
        self._wake.set()

    async def run(self) -> None:
        for org, pool in await self._store.queued_pools():
            self.kick(org, pool)
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, set()
            for org, pool in sorted(pending):
                try:
                    await self._dispatch(org, pool)
                except Exception:
                    log.exception("dispatch_failed", org=org, pool=pool)
                    self._pending.add((org, pool))

    async def _dispatch(self, org: str, pool: str) -> None:
        idle = [s for s in self._sessions.values()
                if s.identity.org == org and s.identity.pool == pool and s.free_slots > 0 and not s.closed.is_set()]
        if not idle:
            return
        capacity = sum(s.free_slots for s in idle)
        for job in await self._store.queued_jobs(org, pool, capacity):
            session = max(idle, key=lambda s: s.free_slots)
            if session.free_slots <= 0:
                break
            assigned = await self._store.assign_job(org, job.id, session.identity.agent_id, datetime.now(UTC))
            if assigned is None:
                continue
            session.jobs.add(job.id)
            session.send(Assign(assigned))
            log.info("job_assigned", job_id=job.id, agent_id=session.identity.agent_id, epoch=assigned.epoch)
