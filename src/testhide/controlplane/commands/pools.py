"""``pools``: pools of agents, their policy, pausing them (`operations/agents.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration, format_duration
from testhide.controlplane.commands.agents import operator_actor, rfc3339, stream_holders
from testhide.controlplane.commands.common import data_dir_option, org_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.egress import egress_list
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.controlplane.operations import agents as ops
from testhide.controlplane.operator import operator_context
from testhide.controlplane.store.postgres import PgStore


@click.group()
def pools() -> None:
    """Pools of agents within an organisation."""


@pools.command("create")
@data_dir_option
@org_option
@click.argument("pool")
@click.option(
    "--agent-cert-ttl", type=Duration(), default=None, help="Shorter agent certificates for this pool."
)
def pools_create(data_dir: Path, org: str, pool: str, agent_cert_ttl: Any) -> None:
    async def run() -> None:
        async with operator_context(data_dir) as op:
            await ops.create_pool(operator_actor(op), org, pool, agent_cert_ttl)

    _run(run())
    click.echo(f"pool {org}/{pool} created", err=True)


@pools.command("set")
@data_dir_option
@org_option
@click.argument("pool")
@click.option(
    "--agent-cert-ttl", type=Duration(), default=None, help="Agent certificate lifetime (next renewal)."
)
@click.option(
    "--allowed-image",
    "allowed_images",
    multiple=True,
    metavar="PATTERN",
    help="fnmatch pattern of allowed images (repeatable; replaces the list).",
)
@click.option("--any-image", is_flag=True, help="Allow any image (clears the list).")
@click.option("--pull-policy", type=click.Choice([p.value for p in PullPolicy]), default=None)
@click.option(
    "--runtime",
    type=click.Choice(list(ops.RUNTIMES)),
    default=None,
    help="Enforce a runtime for every job of the pool ('job' lets each job choose).",
)
@click.option(
    "--egress-allow",
    "egress_allow",
    multiple=True,
    metavar="HOST[:PORT]",
    callback=lambda _context, _option, entries: _egress_entries(entries),
    help="A host the fetch step may reach through the egress proxy, port 80 and 443 unless given; "
    "'.example.org' also allows its subdomains (repeatable; replaces the list).",
)
@click.option("--no-egress", is_flag=True, help="Clear the egress list: jobs with a fetch step are refused.")
def pools_set(
    data_dir: Path,
    org: str,
    pool: str,
    agent_cert_ttl: Any,
    allowed_images: tuple[str, ...],
    any_image: bool,
    pull_policy: str | None,
    runtime: str | None,
    egress_allow: tuple[str, ...],
    no_egress: bool,
) -> None:
    """Change a pool's policy: certificate lifetime, allowed images, pull policy, runtime,
    the hosts its jobs' fetch steps may reach."""
    if egress_allow and no_egress:
        raise click.UsageError("give --egress-allow or --no-egress, not both")
    change = ops.PolicyChange(
        agent_cert_ttl, allowed_images, any_image, pull_policy, runtime, egress_allow, no_egress
    )

    async def run() -> PoolPolicy:
        async with operator_context(data_dir) as op:
            return await ops.set_pool_policy(operator_actor(op), org, pool, change)

    policy = _run(run())
    click.echo(
        f"pool {org}/{pool}: images {', '.join(policy.allowed_images) or 'any'}, "
        f"pull {policy.pull_policy.value}, runtime {policy.runtime or 'chosen by each job'}, "
        f"egress {', '.join(policy.egress_allow) or 'none'}"
        + (f", agent certificates live {format_duration(agent_cert_ttl)}" if agent_cert_ttl else ""),
        err=True,
    )


def _egress_entries(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Checked as the control plane checks them, as a usage error naming the entry."""
    try:
        return egress_list(entries)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="'--egress-allow'") from exc


@pools.command("pause")
@data_dir_option
@org_option
@click.argument("pool")
def pools_pause(data_dir: Path, org: str, pool: str) -> None:
    """Dispatch nothing new in POOL: its running jobs finish, its agents stay connected,
    its queued jobs wait (saying why) until it is resumed."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            await ops.pause_pool(operator_actor(op), org, pool)

    _run(run())
    click.echo(f"pool {org}/{pool} paused: nothing new is dispatched until `pools resume`", err=True)


@pools.command("resume")
@data_dir_option
@org_option
@click.argument("pool")
def pools_resume(data_dir: Path, org: str, pool: str) -> None:
    """Dispatch POOL's queued jobs again."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            await ops.resume_pool(operator_actor(op), org, pool)
            if isinstance(op.store, PgStore):  # the replicas dispatch at once (a serve on SQLite: within 1 s)
                await op.store.notify([json.dumps(["queued", "operator", org, pool])])

    _run(run())
    click.echo(f"pool {org}/{pool} resumed", err=True)


@pools.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def pools_list(data_dir: Path, as_json: bool) -> None:
    """Every organisation's pools: policy, whether paused, agents and jobs in each."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            return [
                {"org": v.record.org, **pool_json(v)}
                for v in await ops.list_pools(op.store, None, await stream_holders(op))
            ]

    rows = _run(run())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    shown = [
        {
            **r,
            "paused": "yes" if r["paused"] else "no",
            "images": ",".join(r["allowed_images"]),
            "egress": ",".join(r["egress_allow"]),
        }
        for r in rows
    ]
    columns = ["org", "name", "paused", "images", "egress", "pull_policy", "runtime"]
    columns += ["agents_connected", "jobs_queued"]
    print_rows(
        [{k: str(v) if isinstance(v, int) else v for k, v in r.items()} for r in shown], False, columns
    )


def pool_json(view: ops.PoolView) -> dict[str, Any]:
    """A pool as every --json shows it (`testhide pools list` too, from the API)."""
    pool, policy = view.record, view.record.policy
    return {
        "name": pool.name,
        "paused": policy.paused,
        "allowed_images": list(policy.allowed_images),
        "pull_policy": policy.pull_policy.value,
        "runtime": policy.runtime,
        "agent_cert_ttl_s": pool.agent_cert_ttl.total_seconds() if pool.agent_cert_ttl else None,
        "agents_enrolled": pool.agents_enrolled,
        "agents_connected": view.agents_connected,
        "jobs_queued": pool.jobs_queued,
        "jobs_running": pool.jobs_running,
        "created_at": rfc3339(pool.created_at),
        "egress_allow": list(policy.egress_allow),
    }
