"""Several control planes on one database (replicas), and what they tell each
other. Each replica assigns jobs only to the agents whose streams it holds, so
replicas never race for an agent; the store's conditional assignment fences
them on jobs. What a replica must learn from the others:

- jobs were queued in (org, pool) through another replica: its dispatcher looks
  at that pool again (so a job submitted anywhere reaches an idle agent at once);
- a job whose agent it holds was canceled through another replica;
- who sweeps leases: exactly one replica at a time holds that role.

``LocalCluster`` is the one-process case (SQLite): every role is ours and
nothing needs telling. ``PgCluster`` runs over PostgreSQL: a heartbeat row
per replica, a lease row per role, a mark on each agent saying which replica
holds its stream, and LISTEN/NOTIFY for the messages, coalesced over a few
milliseconds and sent after (never inside) the transactions they announce.
A notification missed while the listening connection was down is made up
for: on reconnecting, the replica looks at every pool it has agents for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from testhide.controlplane.errors import StorageUnavailable

log = structlog.get_logger("testhide.cluster")

HEARTBEAT = timedelta(seconds=1)
REPLICA_TIMEOUT = timedelta(seconds=5)
"""A replica not seen for this long is gone: its roles and agents are free."""
ROLE_LEASE = timedelta(seconds=5)
COALESCE_S = 0.002
"""Queue announcements made within this window go out as one NOTIFY round trip."""
LEASE_SWEEP = "lease-sweep"


class Handlers(Protocol):
    def queued(self, org: str, pool: str) -> None:
        """Jobs were queued in (org, pool) through another replica."""

    async def cancel(self, org: str, job_id: str) -> None:
        """A job whose agent this replica holds was canceled elsewhere."""

    def resync(self) -> None:
        """Notifications may have been missed: look at everything again."""


class Cluster(Protocol):
    replica_id: str
    follow_recheck_s: float
    """How often a log follower re-reads a job whose agent this replica does not
    hold (another replica writes its log, and wakes only its own followers)."""

    def announce_queued(self, org: str, pool: str) -> None: ...
    async def cancel_elsewhere(self, org: str, job_id: str, agent_id: str) -> bool:
        """Tell the replica that holds ``agent_id``'s stream to cancel the job;
        False when no other live replica holds it."""
        ...

    def holds(self, role: str) -> bool: ...
    async def agent_attached(self, org: str, agent_id: str) -> None: ...
    async def agent_detached(self, agent_id: str) -> None: ...
    async def run(self, handlers: Handlers) -> None: ...
    async def close(self) -> None: ...


class LocalCluster:
    """One control plane on its own (SQLite): every role is ours, nobody to tell."""

    replica_id = "local"
    follow_recheck_s = 5.0

    def announce_queued(self, org: str, pool: str) -> None:
        pass

    async def cancel_elsewhere(self, org: str, job_id: str, agent_id: str) -> bool:
        return False

    def holds(self, role: str) -> bool:
        return True

    async def agent_attached(self, org: str, agent_id: str) -> None:
        pass

    async def agent_detached(self, agent_id: str) -> None:
        pass

    async def run(self, handlers: Handlers) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


class ClusterStore(Protocol):
    async def replica_alive(
        self, replica: str, now: datetime, api: str, agent: str, key_ids: tuple[str, ...] = ()
    ) -> None: ...
    async def replica_gone(self, replica: str) -> None: ...
    async def prune_replicas(self, now: datetime) -> int: ...
    async def claim_role(self, role: str, holder: str, now: datetime, until: datetime) -> bool: ...
    async def set_agent_replica(self, org: str, agent_id: str, replica: str) -> None: ...
    async def clear_agent_replica(self, agent_id: str, replica: str) -> None: ...
    async def agent_replica(self, org: str, agent_id: str, alive_since: datetime) -> str: ...
    async def notify(self, payloads: list[str]) -> None: ...
    async def listen(self, on_message: Callable[[str], None], on_listening: Callable[[], None]) -> None: ...


class PgCluster:
    follow_recheck_s = 0.1

    def __init__(
        self,
        store: ClusterStore,
        api: str = "",
        agent: str = "",
        key_ids: Callable[[], tuple[str, ...]] = tuple,
    ) -> None:
        self.replica_id = secrets.token_hex(6)
        self._key_ids = key_ids
        """The master keys this replica holds (current first): a master-key rotation waits for all."""
        self._store = store
        self._api, self._agent = api, agent
        self._roles: dict[str, datetime] = {}
        """Role -> until when we hold it, by our own clock (renewed each heartbeat)."""
        self._pending: list[str] = []
        self._flush = asyncio.Event()
        self._handlers: Handlers | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def set_addresses(self, api: str, agent: str) -> None:
        self._api, self._agent = api, agent

    # what this replica says -------------------------------------------------------
    def announce_queued(self, org: str, pool: str) -> None:
        payload = json.dumps(["queued", self.replica_id, org, pool])
        if payload not in self._pending:
            self._pending.append(payload)
        self._flush.set()

    async def cancel_elsewhere(self, org: str, job_id: str, agent_id: str) -> bool:
        now = datetime.now(UTC)
        holder = await self._store.agent_replica(org, agent_id, now - REPLICA_TIMEOUT)
        if not holder or holder == self.replica_id:
            return False
        await self._store.notify([json.dumps(["cancel", holder, org, job_id])])
        log.info("job_cancel_forwarded", job_id=job_id, replica=holder)
        return True

    def holds(self, role: str) -> bool:
        until = self._roles.get(role)
        return until is not None and datetime.now(UTC) < until

    async def agent_attached(self, org: str, agent_id: str) -> None:
        await self._store.set_agent_replica(org, agent_id, self.replica_id)

    async def agent_detached(self, agent_id: str) -> None:
        await self._store.clear_agent_replica(agent_id, self.replica_id)

    # what it hears -------------------------------------------------------------------
    def _heard(self, payload: str) -> None:
        handlers = self._handlers
        if handlers is None:
            return
        try:
            kind, sender, org, subject = json.loads(payload)
        except (ValueError, TypeError):
            log.warning("cluster_message_unreadable", payload=payload[:100])
            return
        if kind == "queued" and sender != self.replica_id:
            log.debug("cluster_queued_heard", org=org, pool=subject, replica=sender)
            handlers.queued(org, subject)
        elif kind == "cancel" and sender == self.replica_id:  # addressed to us
            task = asyncio.ensure_future(handlers.cancel(org, subject))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # background ----------------------------------------------------------------------
    async def run(self, handlers: Handlers) -> None:
        self._handlers = handlers
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeat())
            group.create_task(self._publish())
            group.create_task(self._listen(handlers))

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            now = datetime.now(UTC)
            try:
                await self._store.replica_alive(self.replica_id, now, self._api, self._agent, self._key_ids())
                if await self._store.claim_role(LEASE_SWEEP, self.replica_id, now, now + ROLE_LEASE):
                    if LEASE_SWEEP not in self._roles:
                        log.info("cluster_role_taken", role=LEASE_SWEEP, replica=self.replica_id)
                    # By our clock, and a heartbeat short of the lease: we stop before anyone may start.
                    self._roles[LEASE_SWEEP] = now + ROLE_LEASE - HEARTBEAT
                elif self._roles.pop(LEASE_SWEEP, None) is not None:
                    log.info("cluster_role_lost", role=LEASE_SWEEP, replica=self.replica_id)
                beats += 1
                if beats % 3600 == 1:
                    await self._store.prune_replicas(now)
            except StorageUnavailable as exc:
                log.warning("cluster_heartbeat_deferred", error=str(exc))
                if LEASE_SWEEP in self._roles and not self.holds(LEASE_SWEEP):
                    del self._roles[LEASE_SWEEP]  # lapsed unrenewed: another replica may hold it now
                    log.info("cluster_role_lost", role=LEASE_SWEEP, replica=self.replica_id, reason=str(exc))
            await asyncio.sleep(HEARTBEAT.total_seconds())

    async def _publish(self) -> None:
        while True:
            await self._flush.wait()
            await asyncio.sleep(COALESCE_S)
            self._flush.clear()
            payloads, self._pending = self._pending, []
            if not payloads:
                continue
            try:
                await self._store.notify(payloads)
            except StorageUnavailable as exc:
                # The queue is in the database: the others find these jobs when they resync.
                log.warning("cluster_notify_failed", error=str(exc), messages=len(payloads))

    async def _listen(self, handlers: Handlers) -> None:
        delay = 0.1
        attempt = 0

        def listening() -> None:
            log.info("cluster_listening", replica=self.replica_id, attempt=attempt, reconnected=attempt > 1)
            handlers.resync()

        while True:
            attempt += 1
            log.debug("cluster_listen_connecting", replica=self.replica_id, attempt=attempt)
            try:
                await self._store.listen(self._heard, listening)
                delay = 0.1
                log.warning("cluster_listener_lost", retry_in_s=delay)
            except StorageUnavailable as exc:
                log.warning("cluster_listener_unavailable", error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(StorageUnavailable):
            await self._store.replica_gone(self.replica_id)
