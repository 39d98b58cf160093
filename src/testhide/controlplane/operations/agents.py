"""Enrollment tokens, agents and pools of an organisation (the ``agents:admin`` scope).

Each change is a store call plus an audit entry with the actor. ``org`` is the one
organisation the actor may touch; what another organisation owns is NotFound with the
same words as what does not exist. Only the operator's commands, on the control-plane
host, pass ``org=None`` where they act across organisations (listing, revoking by id).
Listings are not audited: they change nothing.

Whether an agent is connected is read from its ``replica`` mark (the process holding its
stream) against the processes alive now, the ``holders``: the live replicas on
PostgreSQL, the serve processes on SQLite (`stream_holders`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import structlog

from testhide.controlplane.ca.enrollment import create_token
from testhide.controlplane.cluster import REPLICA_TIMEOUT
from testhide.controlplane.config import MAX_AGENT_CERT_TTL, MIN_AGENT_CERT_TTL
from testhide.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound, quoted
from testhide.controlplane.jobs.egress import egress_list
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.controlplane.jobs.validation import validate_name
from testhide.controlplane.operations import Actor
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord, PoolRecord, Store
from testhide.controlplane.store.postgres import PgStore

log = structlog.get_logger("testhide.operations")

RUNTIMES = ("runc", "runsc", "job")
"""What a pool's runtime may be set to: one enforced, or ``job`` (each job chooses)."""
MAX_IMAGE_PATTERNS = 64
MAX_IMAGE_PATTERN = 256

StreamHolders = Callable[[], Awaitable[set[str]]]


@dataclass(frozen=True)
class AgentView:
    record: AgentRecord
    connected: bool
    state: str
    """``revoked``, ``expired`` (its certificate), ``connected`` or ``disconnected``."""


@dataclass(frozen=True)
class PoolView:
    record: PoolRecord
    agents_connected: int


@dataclass(frozen=True)
class PolicyChange:
    """What `set_pool_policy` changes; None (and an empty list of images) keeps the pool's."""

    agent_cert_ttl: timedelta | None = None
    allowed_images: tuple[str, ...] = ()
    any_image: bool = False
    pull_policy: str | None = None
    runtime: str | None = None
    """``runc``, ``runsc``, or ``job``: each job chooses."""
    egress_allow: tuple[str, ...] = ()
    """HOST or HOST:PORT the fetch step may reach; a non-empty list replaces the pool's."""
    no_egress: bool = False
    """Clear the pool's egress list (its jobs' fetch steps are refused again)."""


async def stream_holders(store: Store, serve_processes: set[str]) -> set[str]:
    """The processes that may hold agents' streams now, as ``agents.replica`` names them:
    the live replicas on PostgreSQL; ``serve_processes`` (``pid:N``) on SQLite."""
    if isinstance(store, PgStore):
        since = datetime.now(UTC) - REPLICA_TIMEOUT
        return {replica for replica, _, _ in await store.live_replicas(since)}
    return serve_processes


# enrollment tokens ---------------------------------------------------------------------


def token_state(token: EnrollmentTokenRecord, now: datetime) -> str:
    if token.revoked_at:
        return "revoked"
    if token.used_at:
        return "used"
    return "expired" if token.expires_at <= now else "valid"


async def create_enrollment_token(
    actor: Actor, org: str, pool: str, ttl: timedelta, ca_certificate_pem: bytes
) -> tuple[str, EnrollmentTokenRecord]:
    """The token (shown once) and its record."""
    token = await create_token(actor.store, ca_certificate_pem, org, pool, ttl)
    token_id = token.split(".")[1]
    await actor.auditor.record(
        "enrollment_token_created",
        actor.name,
        org=org,
        target=token_id,
        source_ip=actor.source_ip,
        pool=pool,
        ttl_s=ttl.total_seconds(),
    )
    return token, await _token(actor.store, org, token_id)


async def list_enrollment_tokens(store: Store, org: str | None) -> list[EnrollmentTokenRecord]:
    return await store.list_enrollment_tokens(org)


async def revoke_enrollment_token(actor: Actor, org: str | None, token_id: str) -> EnrollmentTokenRecord:
    if org is not None:
        await _token(actor.store, org, token_id)
    record = await actor.store.revoke_enrollment_token(token_id, datetime.now(UTC))
    if record is None:
        raise NotFound(f"enrollment token {quoted(token_id)} not found")
    await actor.auditor.record(
        "enrollment_token_revoked", actor.name, org=record.org, target=token_id, source_ip=actor.source_ip
    )
    return record


async def _token(store: Store, org: str, token_id: str) -> EnrollmentTokenRecord:
    found = [t for t in await store.list_enrollment_tokens(org) if t.id == token_id]
    if not found:
        raise NotFound(f"enrollment token {quoted(token_id)} not found")
    return found[0]


# agents ----------------------------------------------------------------------------------


def agent_view(agent: AgentRecord, holders: set[str], now: datetime) -> AgentView:
    connected = bool(agent.replica) and agent.replica in holders and not agent.revoked_at
    if agent.revoked_at:
        state = "revoked"
    elif agent.cert_not_after <= now:
        state = "expired"
    else:
        state = "connected" if connected else "disconnected"
    return AgentView(agent, connected, state)


async def list_agents(store: Store, org: str | None, holders: set[str]) -> list[AgentView]:
    now = datetime.now(UTC)
    return [agent_view(a, holders, now) for a in await store.list_agents(org)]


async def revoke_agent(actor: Actor, org: str | None, agent_id: str) -> tuple[AgentRecord, list[str]]:
    """Revoke, and end its unfinished jobs as ERROR (their ids are returned). A running
    control plane cuts the agent's stream off: its watcher, within a second; the Admin
    service's process, at once."""
    if org is not None and await actor.store.get_agent(org, agent_id) is None:
        raise NotFound(f"agent {quoted(agent_id)} not found")
    revoked = await actor.store.revoke_agent(agent_id, datetime.now(UTC))
    if revoked is None:
        raise NotFound(f"agent {quoted(agent_id)} not found")
    agent, jobs = revoked
    log.info("agent_revoked", agent_id=agent_id, org=agent.org, actor=actor.name, jobs_ended=jobs)
    await actor.auditor.record(
        "agent_revoked",
        actor.name,
        org=agent.org,
        target=agent_id,
        source_ip=actor.source_ip,
        jobs_ended=jobs,
    )
    return agent, jobs


# pools -------------------------------------------------------------------------------------


async def list_pools(store: Store, org: str | None, holders: set[str]) -> list[PoolView]:
    now = datetime.now(UTC)
    connected: dict[tuple[str, str], int] = {}
    for agent in await store.list_agents(org):
        if agent_view(agent, holders, now).connected:
            connected[(agent.org, agent.pool)] = connected.get((agent.org, agent.pool), 0) + 1
    return [PoolView(p, connected.get((p.org, p.name), 0)) for p in await store.list_pools(org)]


async def pool_view(store: Store, org: str, pool: str, holders: set[str]) -> PoolView:
    for view in await list_pools(store, org, holders):
        if view.record.name == pool:
            return view
    raise NotFound(f"pool {quoted(pool)} not found")


async def create_pool(actor: Actor, org: str, pool: str, agent_cert_ttl: timedelta | None) -> None:
    validate_name("pool", pool)
    ttl = pool_cert_ttl(agent_cert_ttl) if agent_cert_ttl else None
    if await actor.store.pool_exists(org, pool):
        raise FailedPrecondition(f"pool {quoted(pool)} already exists")
    await actor.store.create_pool(org, pool, datetime.now(UTC))
    if ttl:
        await actor.store.set_pool_cert_ttl(org, pool, ttl)
    await actor.auditor.record(
        "pool_created",
        actor.name,
        org=org,
        target=pool,
        source_ip=actor.source_ip,
        agent_cert_ttl_s=ttl.total_seconds() if ttl else None,
    )


async def set_pool_policy(actor: Actor, org: str, pool: str, change: PolicyChange) -> PoolPolicy:
    """The pool's policy after ``change``; checked whole before anything is written."""
    ttl = pool_cert_ttl(change.agent_cert_ttl) if change.agent_cert_ttl else None
    policy = _changed(await _pool_policy(actor.store, org, pool), change)
    if ttl:
        await actor.store.set_pool_cert_ttl(org, pool, ttl)
    await actor.store.set_pool_policy(org, pool, policy)
    await actor.auditor.record(
        "pool_updated",
        actor.name,
        org=org,
        target=pool,
        source_ip=actor.source_ip,
        agent_cert_ttl_s=ttl.total_seconds() if ttl else None,
        allowed_images=list(policy.allowed_images),
        pull_policy=policy.pull_policy.value,
        runtime=policy.runtime,
        egress_allow=list(policy.egress_allow),
    )
    return policy


def _changed(policy: PoolPolicy, change: PolicyChange) -> PoolPolicy:
    if change.any_image and change.allowed_images:
        raise InvalidArgument("allow any image or list the allowed images, not both")
    if len(change.allowed_images) > MAX_IMAGE_PATTERNS:
        raise InvalidArgument(f"at most {MAX_IMAGE_PATTERNS} allowed-image patterns")
    for pattern in change.allowed_images:
        if not pattern or len(pattern) > MAX_IMAGE_PATTERN or not pattern.isprintable() or " " in pattern:
            raise InvalidArgument(f"allowed-image pattern {quoted(pattern)} is not an image pattern")
    if change.pull_policy is not None and change.pull_policy not in {p.value for p in PullPolicy}:
        raise InvalidArgument(
            f"pull policy {quoted(change.pull_policy)} is not never, if-not-present or always"
        )
    if change.runtime is not None and change.runtime not in RUNTIMES:
        raise InvalidArgument(f"runtime {quoted(change.runtime)} is not runc, runsc or job")
    if change.no_egress and change.egress_allow:
        raise InvalidArgument("allow egress hosts or clear the egress list, not both")
    egress = egress_list(change.egress_allow)
    return replace(
        policy,
        allowed_images=() if change.any_image else (change.allowed_images or policy.allowed_images),
        egress_allow=() if change.no_egress else (egress or policy.egress_allow),
        pull_policy=PullPolicy(change.pull_policy) if change.pull_policy else policy.pull_policy,
        runtime=policy.runtime
        if change.runtime is None
        else ("" if change.runtime == "job" else change.runtime),
    )


async def pause_pool(actor: Actor, org: str, pool: str) -> None:
    """Nothing new is dispatched in the pool; its running jobs finish, its agents stay."""
    await _set_paused(actor.store, org, pool, True)
    await actor.auditor.record("pool_paused", actor.name, org=org, target=pool, source_ip=actor.source_ip)


async def resume_pool(actor: Actor, org: str, pool: str) -> None:
    """Dispatch again. The caller wakes the dispatchers (`Scheduler.queued`, or a
    notification); a serve also finds the resumption within a second on its own."""
    await _set_paused(actor.store, org, pool, False)
    await actor.auditor.record("pool_resumed", actor.name, org=org, target=pool, source_ip=actor.source_ip)


async def _set_paused(store: Store, org: str, pool: str, paused: bool) -> None:
    try:
        await store.set_pool_paused(org, pool, paused, datetime.now(UTC))
    except NotFound as exc:
        raise NotFound(f"pool {quoted(pool)} not found") from exc


async def _pool_policy(store: Store, org: str, pool: str) -> PoolPolicy:
    try:
        return await store.pool_policy(org, pool)
    except NotFound as exc:
        raise NotFound(f"pool {quoted(pool)} not found") from exc


def pool_cert_ttl(ttl: timedelta) -> timedelta:
    if not MIN_AGENT_CERT_TTL <= ttl <= MAX_AGENT_CERT_TTL:
        raise InvalidArgument("agent certificate lifetime must be between 10s and 24h")
    return ttl
