"""``agents``: list and revoke enrolled agents (`operations/agents.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from testhide.controlplane.commands.common import data_dir_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.masterkey import ring_holders
from testhide.controlplane.operations import Actor
from testhide.controlplane.operations import agents as ops
from testhide.controlplane.operator import OperatorContext, operator_context


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
            return [_agent_row(v) for v in await ops.list_agents(op.store, None, await stream_holders(op))]

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


async def stream_holders(op: OperatorContext) -> set[str]:
    """The control plane processes alive now, as agents.replica names them: the live
    replicas on PostgreSQL; on SQLite, the serve processes running on this data dir."""
    return await ops.stream_holders(op.store, {f"pid:{h.pid}" for h in ring_holders(op.directory)})


def operator_actor(op: OperatorContext) -> Actor:
    """The operator at this shell, as the audit log names them (``operator:LOGIN``)."""
    return Actor(op.store, op.auditor, op.actor)


def rfc3339(value: datetime | None) -> str | None:
    """A time as every --json shows it: RFC 3339, UTC, microseconds, Z."""
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _agent_row(view: ops.AgentView) -> dict[str, Any]:
    a = view.record
    return {
        "id": a.id,
        "name": a.name,
        "pool": a.pool,
        "host": a.host,
        "version": a.version or None,
        "labels": a.labels,
        "runtimes": list(a.runtimes),
        "max_jobs": a.max_jobs or None,
        "running_jobs": a.running_jobs,
        # The operator's word for a usable certificate; `connected` says the rest.
        "state": view.state if view.state in ("revoked", "expired") else "active",
        "enrolled_at": rfc3339(a.enrolled_at),
        "last_seen_at": rfc3339(a.last_seen_at),
        "cert_expires_at": rfc3339(a.cert_not_after),
        "revoked_at": rfc3339(a.revoked_at),
        "org": a.org,
        "cert_serial": a.cert_serial,
        "connected": view.connected,
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
            _, jobs = await ops.revoke_agent(operator_actor(op), None, agent_id)
            return jobs

    jobs = _run(run())
    click.echo(f"agent {agent_id} revoked" + (f"; jobs ended: {', '.join(jobs)}" if jobs else ""), err=True)
