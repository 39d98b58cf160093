"""``agents``: list and revoke enrolled agents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import structlog

from testhide.controlplane.cluster import REPLICA_TIMEOUT
from testhide.controlplane.commands.common import data_dir_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import NotFound
from testhide.controlplane.masterkey import ring_holders
from testhide.controlplane.operator import OperatorContext, operator_context
from testhide.controlplane.store.base import AgentRecord
from testhide.controlplane.store.postgres import PgStore

log = structlog.get_logger("testhide.operator")


@click.group()
def agents() -> None:
    """Enrolled agents."""


@agents.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def agents_list(data_dir: Path, as_json: bool) -> None:
    """Agents: whether each is connected now and its last contact; what its last
    hello offered (labels, runtimes, jobs at once), its running jobs and version;
    its certificate and state. An agent that never connected has no last contact:
    if its host could not save what enrollment gave it, revoke it."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            holders = await _stream_holders(op)
            now = datetime.now(UTC)
            return [_agent_row(a, now, a.replica in holders) for a in await op.store.list_agents()]

    columns = [
        "id",
        "name",
        "org",
        "pool",
        "state",
        "connected",
        "last_seen_at",
        "running_jobs",
        "max_jobs",
        "labels",
        "runtimes",
        "version",
    ]
    rows = _run(run())
    if as_json:
        print_rows(rows, True, columns)
        return
    print_rows([_shown(row) for row in rows], False, columns)


async def _stream_holders(op: OperatorContext) -> set[str]:
    """The control plane processes alive now, as agents.replica names them: the live
    replicas on PostgreSQL; on SQLite, the serve processes running on this data dir."""
    if isinstance(op.store, PgStore):
        since = datetime.now(UTC) - REPLICA_TIMEOUT
        return {replica for replica, _, _ in await op.store.live_replicas(since)}
    return {f"pid:{holder.pid}" for holder in ring_holders(op.directory)}


def _agent_row(a: AgentRecord, now: datetime, connected: bool) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "org": a.org,
        "pool": a.pool,
        "state": "revoked" if a.revoked_at else "expired" if a.cert_not_after <= now else "active",
        "connected": connected,
        "last_seen_at": a.last_seen_at.isoformat() if a.last_seen_at else None,
        "running_jobs": a.running_jobs,
        "max_jobs": a.max_jobs or None,
        "labels": a.labels,
        "runtimes": list(a.runtimes),
        "version": a.version or None,
        "cert_serial": a.cert_serial,
        "cert_not_after": a.cert_not_after.isoformat(),
    }


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """The table's text for the values that are not text."""
    never = row["last_seen_at"] is None
    return {
        **row,
        "connected": "yes" if row["connected"] else "never" if never else "no",
        "running_jobs": str(row["running_jobs"]),
        "labels": ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())),
        "runtimes": ",".join(row["runtimes"]),
    }


@agents.command("revoke")
@data_dir_option
@click.argument("agent_id")
def agents_revoke(data_dir: Path, agent_id: str) -> None:
    """Cut an agent off: a running control plane closes its stream within
    seconds, refuses its RPCs and renewals, and ends its jobs as ERROR."""

    async def run() -> list[str]:
        async with operator_context(data_dir) as op:
            revoked = await op.store.revoke_agent(agent_id, datetime.now(UTC))
            if revoked is None:
                raise NotFound(f"no agent {agent_id}")
            agent, jobs = revoked
            log.info("agent_revoked", agent_id=agent_id, org=agent.org, jobs_ended=jobs)
            await op.auditor.record(
                "agent_revoked", op.actor, org=agent.org, target=agent_id, jobs_ended=jobs
            )
            return jobs

    jobs = _run(run())
    click.echo(f"agent {agent_id} revoked" + (f"; jobs ended: {', '.join(jobs)}" if jobs else ""), err=True)
