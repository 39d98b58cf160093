"""``pools``: pools of agents and their policy."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration, format_duration
from testhide.controlplane.commands.common import data_dir_option, org_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.controlplane.operator import operator_context


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
    from testhide.controlplane.jobs.validation import validate_name

    async def run() -> None:
        async with operator_context(data_dir) as op:
            validate_name("pool", pool)
            await op.store.create_pool(org, pool, datetime.now(UTC))
            if agent_cert_ttl:
                await op.store.set_pool_cert_ttl(org, pool, _pool_ttl(agent_cert_ttl))
            await op.auditor.record(
                "pool_created",
                op.actor,
                org=org,
                target=pool,
                agent_cert_ttl_s=agent_cert_ttl.total_seconds() if agent_cert_ttl else None,
            )

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
    type=click.Choice(["runc", "runsc", "job"]),
    default=None,
    help="Enforce a runtime for every job of the pool ('job' lets each job choose).",
)
def pools_set(
    data_dir: Path,
    org: str,
    pool: str,
    agent_cert_ttl: Any,
    allowed_images: tuple[str, ...],
    any_image: bool,
    pull_policy: str | None,
    runtime: str | None,
) -> None:
    """Change a pool's policy: certificate lifetime, allowed images, pull policy, runtime."""

    async def run() -> PoolPolicy:
        async with operator_context(data_dir) as op:
            if agent_cert_ttl:
                await op.store.set_pool_cert_ttl(org, pool, _pool_ttl(agent_cert_ttl))
            policy = await op.store.pool_policy(org, pool)
            policy = replace(
                policy,
                allowed_images=() if any_image else (allowed_images or policy.allowed_images),
                pull_policy=PullPolicy(pull_policy) if pull_policy else policy.pull_policy,
                runtime=policy.runtime if runtime is None else ("" if runtime == "job" else runtime),
            )
            await op.store.set_pool_policy(org, pool, policy)
            await op.auditor.record(
                "pool_updated",
                op.actor,
                org=org,
                target=pool,
                agent_cert_ttl_s=agent_cert_ttl.total_seconds() if agent_cert_ttl else None,
                allowed_images=list(policy.allowed_images),
                pull_policy=policy.pull_policy.value,
                runtime=policy.runtime,
            )
            return policy

    policy = _run(run())
    click.echo(
        f"pool {org}/{pool}: images {', '.join(policy.allowed_images) or 'any'}, "
        f"pull {policy.pull_policy.value}, runtime {policy.runtime or 'chosen by each job'}"
        + (f", agent certificates live {format_duration(agent_cert_ttl)}" if agent_cert_ttl else ""),
        err=True,
    )


def _pool_ttl(ttl: timedelta) -> timedelta:
    from testhide.controlplane.config import MAX_AGENT_CERT_TTL, MIN_AGENT_CERT_TTL

    if not MIN_AGENT_CERT_TTL <= ttl <= MAX_AGENT_CERT_TTL:
        raise InvalidArgument("agent certificate lifetime must be between 10s and 24h")
    return ttl
