"""``testhide admin``: administration of the logged-in organisation over the API, for a
credential with the ``agents:admin`` scope (enrollment tokens, agents, pools) or the
``org:admin`` scope (API keys, users, secrets). It mirrors the operator's
``testhide-controlplane`` commands without a shell on the control-plane host.

The agents:admin half is here: ``enroll-token``, ``agents``, ``incident`` and ``pools``. A new token goes
to stdout alone, so that it can be captured; what is said about it goes to stderr."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import click

from testhide.cli.common import call, echo_lines, json_option
from testhide.cli.model import PoolChange
from testhide.cli.output import (
    dumps,
    enrolled_agent_json,
    enrolled_agents_table,
    enrollment_token_json,
    enrollment_tokens_table,
    pool_json,
    pool_summary,
    pools_table,
)
from testhide.common.durations import Duration, format_duration
from testhide.common.incident_text import incident_lines
from testhide.common.since import Since

PULL_POLICIES = ("never", "if-not-present", "always")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"\.?{_LABEL}(\.{_LABEL})*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
EGRESS_FORM = (
    "HOST or HOST:PORT (a host name, a leading '.' for its subdomains too, or an IPv4 address; PORT 1-65535)"
)


def egress_entry(text: str) -> str:
    """``--egress-allow``, in lower case; the control plane checks it again, and whole."""
    host, sep, port = text.lower().partition(":")
    if not _HOST.fullmatch(host) or (sep and not (_PORT.fullmatch(port) and int(port) <= 65535)):
        raise click.BadParameter(f"takes {EGRESS_FORM}, not {text!r}", param_hint="'--egress-allow'")
    return f"{host}{sep}{port}"


@click.group()
def admin() -> None:
    """Administer your organisation (needs the agents:admin or org:admin scope)."""


@admin.group("enroll-token")
def enroll_token() -> None:
    """One-time tokens that enroll an agent into one of your pools."""


@enroll_token.command("create")
@click.option("--pool", default="default", show_default=True)
@click.option("--ttl", type=Duration(), default="10m", show_default=True, help="At most 24h.")
def enroll_token_create(pool: str, ttl: timedelta) -> None:
    """Print a one-time token that enrolls one agent into POOL."""
    token, info = call(lambda api: api.create_enrollment_token(pool, ttl))
    click.echo(
        f"enrollment token {info.id} for pool {pool}, valid {format_duration(ttl)}, one use:", err=True
    )
    click.echo(token)


@enroll_token.command("list")
@json_option
def enroll_token_list(as_json: bool) -> None:
    """Tokens with their state (valid, used, expired, revoked); never their secrets."""
    tokens = call(lambda api: api.enrollment_tokens())
    if as_json:
        click.echo(dumps([enrollment_token_json(t) for t in tokens]))
    else:
        echo_lines(enrollment_tokens_table(tokens))


@enroll_token.command("revoke")
@click.argument("token_id")
def enroll_token_revoke(token_id: str) -> None:
    """Make an unused token useless."""
    call(lambda api: api.revoke_enrollment_token(token_id))
    click.echo(f"enrollment token {token_id} revoked", err=True)


@admin.group()
def agents() -> None:
    """Your organisation's enrolled agents."""


@agents.command("list")
@json_option
def agents_list(as_json: bool) -> None:
    """Agents with their state (connected, disconnected, expired, revoked), last contact,
    what their last hello offered and their running jobs."""
    found = call(lambda api: api.agents())
    if as_json:
        click.echo(dumps([enrolled_agent_json(a) for a in found]))
    else:
        echo_lines(enrolled_agents_table(found))


@agents.command("revoke")
@click.argument("agent_id")
def agents_revoke(agent_id: str) -> None:
    """Cut an agent off at once: its stream is closed, its running jobs end as ERROR."""
    agent, jobs = call(lambda api: api.revoke_agent(agent_id))
    ended = f"; jobs ended: {', '.join(jobs)}" if jobs else ""
    click.echo(f"agent {agent.id} ({agent.name}) revoked{ended}", err=True)


@admin.group()
def incident() -> None:
    """The scope of an incident in your organisation, from the stored evidence."""


@incident.command("agent")
@click.argument("agent_id")
@click.option(
    "--since", type=Since(), default=None, help="Only jobs not finished before: 2h, 3d or an RFC 3339 time."
)
@json_option
def incident_agent(agent_id: str, since: datetime | None, as_json: bool) -> None:
    """Everything AGENT_ID touched: each job it was handed with its pool, image and times;
    the secrets those jobs received, by name (never a value); the artifacts and test
    results they produced; and whether each job still verifies. Audited with you as actor."""
    document = call(lambda api: api.incident_agent(agent_id, since))
    click.echo(dumps(document) if as_json else "\n".join(incident_lines(document)))


@admin.group()
def pools() -> None:
    """Your organisation's pools of agents, their policy, pausing them."""


@pools.command("create")
@click.argument("pool")
@click.option(
    "--agent-cert-ttl", type=Duration(), default=None, help="Shorter agent certificates for this pool."
)
def pools_create(pool: str, agent_cert_ttl: timedelta | None) -> None:
    created = call(lambda api: api.create_pool(pool, agent_cert_ttl))
    click.echo(f"pool {created.name} created", err=True)


@pools.command("set")
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
@click.option("--pull-policy", type=click.Choice(PULL_POLICIES), default=None)
@click.option(
    "--runtime",
    type=click.Choice(["runc", "runsc", "job"]),
    default=None,
    help="Enforce a runtime for every job of the pool ('job' lets each job choose).",
)
@click.option(
    "--egress-allow",
    "egress_allow",
    multiple=True,
    metavar="HOST[:PORT]",
    callback=lambda _ctx, _param, values: tuple(egress_entry(v) for v in values),
    help="What a job's fetch step may reach (ports 80 and 443 without PORT; repeatable; replaces the list).",
)
@click.option("--no-egress", is_flag=True, help="Clear the egress list: fetch steps are refused.")
def pools_set(
    pool: str,
    agent_cert_ttl: timedelta | None,
    allowed_images: tuple[str, ...],
    any_image: bool,
    pull_policy: str | None,
    runtime: str | None,
    egress_allow: tuple[str, ...],
    no_egress: bool,
) -> None:
    """Change a pool's policy: certificate lifetime, allowed images, pull policy, runtime,
    and the egress list of its jobs' fetch steps."""
    if egress_allow and no_egress:
        raise click.UsageError("give either --egress-allow (the new list) or --no-egress (none), not both")
    change = PoolChange(
        agent_cert_ttl,
        allowed_images,
        any_image,
        pull_policy,
        runtime,
        tuple(dict.fromkeys(egress_allow)),
        no_egress,
    )
    click.echo(pool_summary(call(lambda api: api.set_pool_policy(pool, change))), err=True)


@pools.command("pause")
@click.argument("pool")
def pools_pause(pool: str) -> None:
    """Dispatch nothing new in POOL: its running jobs finish, its agents stay connected,
    its queued jobs wait (saying why) until it is resumed."""
    paused = call(lambda api: api.pause_pool(pool, True))
    click.echo(
        f"pool {paused.name} paused: {paused.jobs_running} running job(s) finish, "
        f"{paused.jobs_queued} queued wait until `testhide admin pools resume {paused.name}`",
        err=True,
    )


@pools.command("resume")
@click.argument("pool")
def pools_resume(pool: str) -> None:
    """Dispatch POOL's queued jobs again."""
    resumed = call(lambda api: api.pause_pool(pool, False))
    click.echo(
        f"pool {resumed.name} resumed; its {resumed.jobs_queued} queued job(s) are dispatched", err=True
    )


@pools.command("list")
@json_option
def pools_list(as_json: bool) -> None:
    """Your organisation's pools: policy, whether paused, agents connected/enrolled, jobs."""
    list_pools(as_json)


def list_pools(as_json: bool) -> None:
    """`testhide pools list` and `testhide admin pools list` (the first needs only jobs:read)."""
    found = call(lambda api: api.pools())
    if as_json:
        click.echo(dumps([pool_json(p) for p in found]))
    else:
        echo_lines(pools_table(found))


@click.group("pools")
def engineer_pools() -> None:
    """The pools of your organisation, and whether they are paused."""


@engineer_pools.command("list")
@json_option
def engineer_pools_list(as_json: bool) -> None:
    """Pools: policy, whether paused, agents connected/enrolled, queued and running jobs."""
    list_pools(as_json)


def _add_org_commands() -> None:
    from testhide.cli.admin_org import register

    register(admin)


_add_org_commands()
