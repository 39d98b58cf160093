"""Connected agents and the dispatch of queued jobs to them. One dispatcher
task owns assignment, so two agents never race for one job; the store's
conditional update fences other replicas."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from testhide.common.identity import AgentIdentity
from testhide.controlplane.cluster import Cluster, LocalCluster
from testhide.controlplane.errors import ControlPlaneError
from testhide.controlplane.jobs.model import Job, JobStatus, PoolPolicy
from testhide.controlplane.jobs.store import QueueStore

if TYPE_CHECKING:
    from testhide.controlplane.metrics import ControlPlaneMetrics

log = structlog.get_logger("testhide.scheduler")

DEFAULT_LEASE = timedelta(seconds=60)
DISPATCH_RETRY_S = 1.0
MAX_WINDOW = 1024
"""Queued jobs looked at per dispatch round (a round repeats while it assigns)."""


@dataclass(frozen=True)
class AssignDetails:
    """What the agent needs beyond the spec, resolved at assignment time."""

    secret_env: dict[str, str]
    policy: PoolPolicy
    runtime: str
    fetch_secret_env: dict[str, str] = field(default_factory=dict)
    """The values of the secrets the job's fetch step names (for the fetch step only)."""


@dataclass(frozen=True)
class Assign:
    job: Job
    details: AssignDetails


@dataclass(frozen=True)
class Cancel:
    job_id: str
    reason: str
    abandon: bool = False
    """The agent no longer holds the job: stop it and report nothing more."""


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


@dataclass(frozen=True)
class RenewAnswer:
    """The answer to a renewal the agent asked for on its stream: a certificate, or why none."""

    certificate_pem: bytes = b""
    ca_bundle_pem: bytes = b""
    refused: tuple[str, str] | None = None
    """(gRPC status code name, message), as the Renew RPC would have ended."""


Outbound = Assign | Cancel | LogAck | ResultAck | TrustBundle | RenewAnswer


class Mailbox:
    """What the control plane sends one agent, in order: a deque while messages wait and,
    only while the writer waits, one future (an asyncio.Queue costs four deques per agent,
    and an idle agent's empty deque 600 bytes: ten thousand idle streams hold none)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Outbound] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, message: Outbound) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(message)
        if (waiter := self._waiter) is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def arrival(self) -> asyncio.Future[None]:
        """Done once a message is put: the writer awaits it when ``take`` gave nothing (a
        future, not a coroutine of the mailbox's own held while the stream idles)."""
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    async def get(self) -> Outbound:
        """The next message, waited for."""
        while (message := self.take()) is None:
            await self.arrival()
        return message

    def take(self) -> Outbound | None:
        """The next message if one waits, without waiting."""
        return self._next(self._items) if self._items else None

    def _next(self, items: deque[Outbound]) -> Outbound:
        message = items.popleft()
        if not items:
            self._items = None
        return message

    def __len__(self) -> int:
        return len(self._items) if self._items else 0


class Flag:
    """``asyncio.Event``'s set, is_set and wait, for one stream's end: an Event allocates
    its waiters' deque up front, held by every one of ten thousand idle streams."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = None

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        await waiter


@dataclass(eq=False, slots=True)
class AgentSession:
    """One open Connect stream of one agent."""

    identity: AgentIdentity
    cert_serial: int
    cert_not_after: datetime
    cert_issuer: str
    max_jobs: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    runtimes: frozenset[str] = frozenset({"runc"})
    draining: bool = False
    """The agent is shutting down: it takes no new jobs."""
    reads_batches: bool = False
    """The agent reads several messages in one (its Hello said so)."""
    renewing: bool = False
    """A renewal the agent asked for on this stream is under way (one at a time)."""
    close_reason: tuple[str, str] | None = None
    """Why the control plane ended the stream: (status code name, message)."""
    jobs: set[str] = field(default_factory=set)
    outbox: Mailbox = field(default_factory=Mailbox)
    closed: Flag = field(default_factory=Flag)
    interrupt: Callable[[], object] | None = None
    """Stops the stream's reader (set while the stream is served)."""

    @property
    def free_slots(self) -> int:
        return 0 if self.draining else self.max_jobs - len(self.jobs)

    def can_run(self, job: Job) -> bool:
        wanted_runtime = job.spec.runtime or "runc"
        return (
            all(self.labels.get(k) == v for k, v in job.spec.labels.items())
            and wanted_runtime in self.runtimes
        )

    def send(self, message: Outbound) -> None:
        self.outbox.put_nowait(message)

    def close(self, code: str, message: str) -> None:
        """End the stream with a status, at once."""
        if self.close_reason is None:
            self.close_reason = (code, message)
        self.end()

    def end(self) -> None:
        """End the stream (with the status ``close`` gave, if any)."""
        self.closed.set()
        if self.interrupt is not None:
            interrupt, self.interrupt = self.interrupt, None
            interrupt()


class Scheduler:
    def __init__(
        self,
        store: QueueStore,
        prepare: Callable[[Job], Awaitable[AssignDetails]] | None = None,
        lease: timedelta = DEFAULT_LEASE,
        cluster: Cluster | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.prepare = prepare
        """Resolves secrets and policy for an assignment; a failure ends the job as ERROR."""
        self.lease = lease
        self.cluster: Cluster = cluster or LocalCluster()
        """The other replicas on the same database (none on SQLite)."""
        self._store = store
        self._sessions: dict[str, AgentSession] = {}
        self._by_pool: dict[tuple[str, str], dict[str, AgentSession]] = {}
        self._wake = asyncio.Event()
        self._pending: set[tuple[str, str]] = set()
        self._attached = asyncio.Condition()
        self._announcements: set[asyncio.Task[None]] = set()
        """Held until done: the event loop keeps only weak references to tasks."""
        self._metrics = metrics

    def session_of(self, agent_id: str) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def sessions(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def attach(self, session: AgentSession) -> None:
        previous = self._sessions.get(session.identity.agent_id)
        if previous is not None:
            previous.end()  # the newer stream of the same agent wins
        self._sessions[session.identity.agent_id] = session
        identity = session.identity
        self._by_pool.setdefault((identity.org, identity.pool), {})[identity.agent_id] = session
        self.kick(session.identity.org, session.identity.pool)
        announcement = asyncio.ensure_future(self._announce())
        self._announcements.add(announcement)
        announcement.add_done_callback(self._announcements.discard)

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
        identity = session.identity
        if self._sessions.get(identity.agent_id) is session:
            del self._sessions[identity.agent_id]
            pool = self._by_pool.get((identity.org, identity.pool), {})
            pool.pop(identity.agent_id, None)
            if not pool:
                self._by_pool.pop((identity.org, identity.pool), None)
        session.closed.set()

    def kick(self, org: str, pool: str) -> None:
        """Something changed in (org, pool): a job queued, an agent freed up."""
        self._pending.add((org, pool))
        self._wake.set()

    def queued(self, org: str, pool: str) -> None:
        """Jobs were queued in (org, pool): here, and on the other replicas, whose
        agents may be the idle ones."""
        self.kick(org, pool)
        self.cluster.announce_queued(org, pool)

    def resync(self) -> None:
        """Look at every pool this replica has agents for (announcements may have been missed)."""
        for org, pool in list(self._by_pool):
            self.kick(org, pool)

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
                except ControlPlaneError as exc:  # e.g. the database is locked: try again shortly
                    log.warning("dispatch_deferred", org=org, pool=pool, error=str(exc))
                    asyncio.get_running_loop().call_later(DISPATCH_RETRY_S, self.kick, org, pool)
                except Exception:
                    log.exception("dispatch_failed", org=org, pool=pool)
                    asyncio.get_running_loop().call_later(DISPATCH_RETRY_S, self.kick, org, pool)

    def _pool_sessions(self, org: str, pool: str) -> list[AgentSession]:
        return [s for s in self._by_pool.get((org, pool), {}).values() if not s.closed.is_set()]

    def _idle_sessions(self, org: str, pool: str) -> tuple[list[AgentSession], int]:
        """The pool's open sessions with free slots, most free first (in the order
        they attached among equals), and their free slots in all: one pass over the
        pool's sessions, which a round with a thousand agents makes many times a second."""
        by_free: dict[int, list[AgentSession]] = {}
        total = 0
        for session in self._by_pool.get((org, pool), {}).values():
            free = session.free_slots
            if free > 0 and not session.closed.is_set():
                total += free
                same = by_free.get(free)
                if same is None:
                    by_free[free] = [session]
                else:
                    same.append(session)
        return [s for free in sorted(by_free, reverse=True) for s in by_free[free]], total

    async def _dispatch(self, org: str, pool: str) -> None:
        # Most free slots first; the first able agent takes a job, then queues up
        # behind the others: linear in jobs plus agents, not their product.
        idle, free_slots = self._idle_sessions(org, pool)
        if not idle:
            log.debug(
                "dispatch_no_idle_agent", org=org, pool=pool, connected=len(self._pool_sessions(org, pool))
            )
            return
        # A round reads about as many queued jobs as there are free slots: with a deep queue
        # and agents freeing up one by one, reading a wide window every round cost a job's
        # worth of reads many times over. Only when the head of the queue holds jobs no idle
        # agent can take does the round look further, so those never block the others.
        window = min(MAX_WINDOW, max(4, 2 * free_slots))
        queued = await self._store.queued_jobs(org, pool, window)
        plan = _Plan(idle)
        plan.add(queued)
        wider = min(MAX_WINDOW, max(64, 4 * free_slots))
        if plan.idle and plan.unmatched and len(queued) == window and wider > window:
            seen = {job.id for job in queued}
            further = [job for job in await self._store.queued_jobs(org, pool, wider) if job.id not in seen]
            plan.add(further)
            queued += further
        assigned = await self._assign(org, plan.assignments)
        if assigned < len(plan.assignments):  # taken elsewhere, or ended ERROR: fill those slots
            self.kick(org, pool)
        log.debug(
            "dispatch_round",
            org=org,
            pool=pool,
            idle_agents=len(plan.idle) + len(plan.taken),
            queued_seen=len(queued),
            assigned=assigned,
            passed_over=plan.unmatched,
        )

    async def _assign(self, org: str, plan: list[tuple[Job, AgentSession]]) -> int:
        """The round's assignments, written in one transaction; how many took."""
        ready: list[tuple[Job, AgentSession, AssignDetails]] = []
        for job, session in plan:
            try:
                details = await self.prepare(job) if self.prepare else AssignDetails({}, PoolPolicy(), "runc")
            except ControlPlaneError as exc:
                now = datetime.now(UTC)
                await self._store.set_job_status(org, job.id, None, JobStatus.ERROR, now, str(exc))
                log.warning("job_not_assignable", job_id=job.id, error=str(exc))
                continue
            ready.append((job, session, details))
        if not ready:
            return 0
        now = datetime.now(UTC)
        pairs = [(job.id, session.identity.agent_id) for job, session, _ in ready]
        claimed = await self._store.assign_jobs(org, pairs, now, now + self.lease)
        for (job, session, details), assigned in zip(ready, claimed, strict=True):
            if assigned is None:
                continue
            session.jobs.add(job.id)
            session.send(Assign(assigned, details))
            log.info("job_assigned", job_id=job.id, agent_id=session.identity.agent_id, epoch=assigned.epoch)
            if self._metrics is not None:
                self._metrics.job_assigned(assigned, now)
        return sum(1 for assigned in claimed if assigned is not None)

    def explain_queued(self, job: Job, paused: bool = False) -> str:
        """Why a queued job has not started yet, in words for its owner; ``paused``: its pool is."""
        if paused:
            return (
                f"waiting: pool {job.spec.pool!r} is paused by an administrator; "
                "nothing new is dispatched until it is resumed"
            )
        sessions = self._pool_sessions(job.org, job.spec.pool)
        if not sessions:
            return f"waiting: no agent of pool {job.spec.pool!r} is connected"
        if not any(s.can_run(job) for s in sessions):
            wants = ", ".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items()))
            offer = f"labels {wants} and " if wants else ""
            return (
                f"waiting: no connected agent of pool {job.spec.pool!r} offers "
                f"{offer}runtime {job.spec.runtime or 'runc'}"
            )
        able = [s for s in sessions if s.can_run(job)]
        if all(s.draining for s in able):
            return (
                f"waiting: the {len(able)} able agent(s) of pool {job.spec.pool!r} take no jobs now "
                "(shutting down, or their container engine is down)"
            )
        return f"waiting for a free agent ({len(able)} able, all busy)"


class _Plan:
    """One dispatch round's plan: queued jobs matched to the idle sessions, each session
    taking as many jobs as it has free slots."""

    def __init__(self, idle: list[AgentSession]) -> None:
        self.idle = idle
        self.assignments: list[tuple[Job, AgentSession]] = []
        self.taken: dict[str, int] = {}
        self.unmatched = 0

    def add(self, queued: list[Job]) -> None:
        for job in queued:
            if not self.idle:
                return
            index = next((i for i, s in enumerate(self.idle) if s.can_run(job)), None)
            if index is None:
                self.unmatched += 1  # no idle agent offers its labels or runtime: `jobs show` says why
                continue
            session = self.idle.pop(index)
            self.assignments.append((job, session))
            agent_id = session.identity.agent_id
            self.taken[agent_id] = self.taken.get(agent_id, 0) + 1
            if session.free_slots > self.taken[agent_id]:
                self.idle.append(session)
