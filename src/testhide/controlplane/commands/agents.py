"""``agents``: list and revoke enrolled agents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import structlog

from testhide.controlplane.commands.common import data_dir_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import NotFound
from testhide.controlplane.operator import operator_context

log = structlog.get_logger("testhide.operator")


@click.group()
def agents() -> None:
    """Enrolled agents."""


@agents.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def agents_list(data_dir: Path, as_json: bool) -> None:
    """Agents with their certificate serial and expiry, last contact and state."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [
                {
                    "id": a.id,
                    "name": a.name,
                    "org": a.org,
                    "pool": a.pool,
                    "cert_serial": a.cert_serial,
                    "cert_not_after": a.cert_not_after.isoformat(),
                    "last_seen_at": a.last_seen_at.isoformat() if a.last_seen_at else None,
                    "version": a.version or None,
                    "state": "revoked"
                    if a.revoked_at
                    else "expired"
                    if a.cert_not_after <= now
                    else "active",
                }
                for a in await op.store.list_agents()
            ]

    columns = ["id", "name", "org", "pool", "state", "version", "cert_not_after", "last_seen_at"]
    print_rows(_run(run()), as_json, columns)


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
