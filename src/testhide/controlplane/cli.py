"""``testhide-controlplane``: the operator's command."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import structlog
from cryptography.hazmat.primitives.serialization import Encoding

from testhide import __version__
from testhide.common.durations import Duration, format_duration
from testhide.common.logging import configure
from testhide.common.tls import fingerprint
from testhide.controlplane.auth.principal import SCOPES
from testhide.controlplane.cli_common import data_dir_option
from testhide.controlplane.cli_common import run as _run
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.controlplane.operator import OperatorContext, operator_context

DEFAULT_SCOPES = ("jobs:read", "jobs:write")
USER_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
log = structlog.get_logger("testhide.operator")


org_option = click.option("--org", default="default", show_default=True, help="Organisation.")


@click.group()
@click.version_option(__version__, prog_name="testhide-controlplane", message="%(prog)s %(version)s")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True)
@click.option("--log-level", default="info", show_default=True)
def main(log_format: str, log_level: str) -> None:
    """Run and administer a testhide control plane."""
    configure(log_level, json_output=log_format == "json")


@main.command()
@data_dir_option
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="DNS name or IP the listeners answer as (repeatable). Default: localhost, 127.0.0.1.",
)
@click.option("--trust-domain", default="testhide.local", show_default=True)
@click.option(
    "--import-ca",
    nargs=2,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="CERT KEY",
    help="Use an existing CA (PEM certificate and ECDSA key).",
)
@click.option("--dev", is_flag=True, help="Allow development certificates from certs-dev/.")
def init(
    data_dir: Path,
    server_names: tuple[str, ...],
    trust_domain: str,
    import_ca: tuple[Path, Path] | None,
    dev: bool,
) -> None:
    """Create the data dir: CA, server certificate, database, admin API key."""
    from cryptography import x509

    from testhide.controlplane.ca.authority import is_development_ca
    from testhide.controlplane.datadir import initialise

    imported = None
    if import_ca:
        imported = (import_ca[0].read_bytes(), import_ca[1].read_bytes())
        if is_development_ca(x509.load_pem_x509_certificate(imported[0])) and not dev:
            raise click.ClickException(
                "that CA is development material from certs-dev/; pass --dev to use it"
            )
    admin_key = _run(
        initialise(data_dir, list(server_names) or ["localhost", "127.0.0.1"], trust_domain, imported)
    )
    click.echo(f"initialised {data_dir}", err=True)
    click.echo("admin API key (shown once; store it now):", err=True)
    click.echo(admin_key)


@main.command()
@data_dir_option
@click.option(
    "--listen",
    default="127.0.0.1:7443",
    show_default=True,
    envvar="TESTHIDE_LISTEN",
    help="HOST:PORT of the API port.",
)
@click.option("--agent-listen", default=None, help="HOST:PORT of the mutual-TLS agent port [API port + 1].")
@click.option("--agent-cert-ttl", type=Duration(), default="1h", show_default=True)
@click.option(
    "--job-lease",
    type=Duration(),
    default="60s",
    show_default=True,
    help="How long a job's agent may stay silent before the job is requeued or LOST.",
)
@click.option(
    "--db-busy-timeout",
    type=Duration(),
    default="10s",
    show_default=True,
    help="How long a write waits for a database lock another process holds.",
)
@click.option(
    "--address-failure-budget",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    envvar="TESTHIDE_ADDRESS_FAILURE_BUDGET",
    show_envvar=True,
    help="Failed logins from one client address (all accounts) before exponential backoff.",
)
@click.option(
    "--address-failure-window",
    type=Duration(),
    default="15m",
    show_default=True,
    envvar="TESTHIDE_ADDRESS_FAILURE_WINDOW",
    show_envvar=True,
    help="An address's failures are forgotten after this long without one.",
)
@click.option(
    "--password-workers",
    type=click.IntRange(1, 64),
    default=None,
    envvar="TESTHIDE_PASSWORD_WORKERS",
    show_envvar=True,
    help="Threads that check passwords (bcrypt) [half the cores].",
)
@click.option(
    "--password-queue",
    type=click.IntRange(0, 10_000),
    default=16,
    show_default=True,
    envvar="TESTHIDE_PASSWORD_QUEUE",
    show_envvar=True,
    help="Password logins that may wait for a thread; more get RESOURCE_EXHAUSTED at once.",
)
@click.option("--dev", is_flag=True, help="Accept development certificates. Never in production.")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound ports as JSON here once serving (for port 0).",
)
def serve(
    data_dir: Path,
    listen: str,
    agent_listen: str | None,
    agent_cert_ttl: Any,
    job_lease: Any,
    db_busy_timeout: Any,
    address_failure_budget: int,
    address_failure_window: timedelta,
    password_workers: int | None,
    password_queue: int,
    dev: bool,
    port_file: Path | None,
) -> None:
    """Serve the API and agent ports until SIGTERM or SIGINT."""
    from testhide.controlplane.auth.limits import DEFAULT_ADDRESS_LOCKOUT
    from testhide.controlplane.auth.passwords import default_workers
    from testhide.controlplane.daemon import ControlPlane

    address_lockout = replace(
        DEFAULT_ADDRESS_LOCKOUT, failures=address_failure_budget, window=address_failure_window
    )

    async def run() -> None:
        daemon = ControlPlane(
            ControlPlaneConfig(
                data_dir=data_dir,
                listen=listen,
                agent_listen=agent_listen,
                agent_cert_ttl=agent_cert_ttl,
                job_lease=job_lease,
                db_busy_timeout=db_busy_timeout,
                address_lockout=address_lockout,
                password_workers=password_workers or default_workers(),
                password_queue=password_queue,
                dev=dev,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(daemon.shutdown()))
        await daemon.start()
        if port_file:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(json.dumps({"api_port": daemon.api_port, "agent_port": daemon.agent_port}))
            tmp.replace(port_file)
        await daemon.run()

    _run(run())


@main.group("enroll-token")
def enroll_token() -> None:
    """One-time agent enrollment tokens."""


@enroll_token.command("create")
@data_dir_option
@org_option
@click.option("--pool", default="default", show_default=True)
@click.option("--ttl", type=Duration(), default="10m", show_default=True)
def enroll_token_create(data_dir: Path, org: str, pool: str, ttl: Any) -> None:
    """Print a one-time token that enrolls one agent into ORG/POOL."""
    from testhide.controlplane.ca.enrollment import create_token

    async def run() -> str:
        async with operator_context(data_dir) as op:
            token = await create_token(
                op.store,
                op.directory.load_ca(op.master, allow_development=True).certificate_pem,
                org,
                pool,
                ttl,
            )
            await op.auditor.record(
                "enrollment_token_created",
                op.actor,
                org=org,
                target=token.split(".")[1],
                pool=pool,
                ttl_s=ttl.total_seconds(),
            )
            return token

    token = _run(run())
    click.echo(f"enrollment token for {org}/{pool}, valid {format_duration(ttl)}, one use:", err=True)
    click.echo(token)


@enroll_token.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def enroll_token_list(data_dir: Path, as_json: bool) -> None:
    """Tokens with their state; never their secrets."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [
                {
                    "id": t.id,
                    "org": t.org,
                    "pool": t.pool,
                    "created_at": t.created_at.isoformat(),
                    "expires_at": t.expires_at.isoformat(),
                    "state": "revoked"
                    if t.revoked_at
                    else "used"
                    if t.used_at
                    else "expired"
                    if t.expires_at <= now
                    else "usable",
                }
                for t in await op.store.list_enrollment_tokens()
            ]

    _print_rows(_run(run()), as_json, ["id", "org", "pool", "state", "expires_at"])


@enroll_token.command("revoke")
@data_dir_option
@click.argument("token_id")
def enroll_token_revoke(data_dir: Path, token_id: str) -> None:
    """Make an unused token useless."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            record = await op.store.revoke_enrollment_token(token_id, datetime.now(UTC))
            if record is None:
                raise NotFound(f"no enrollment token {token_id}")
            await op.auditor.record("enrollment_token_revoked", op.actor, org=record.org, target=token_id)

    _run(run())
    click.echo(f"enrollment token {token_id} revoked", err=True)


@main.group()
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
    _print_rows(_run(run()), as_json, columns)


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


@main.group("server-cert")
def server_cert() -> None:
    """The listeners' certificate."""


@server_cert.command("rotate")
@data_dir_option
def server_cert_rotate(data_dir: Path) -> None:
    """Issue a new server certificate; a running control plane serves it to
    new connections within a second, open streams carry on."""
    from testhide.controlplane.ca.rotation import rotate_server_certificate

    async def run() -> str:
        async with operator_context(data_dir) as op:
            cert = rotate_server_certificate(op.directory, op.master)
            serial = format(cert.serial_number, "x")
            await op.auditor.record(
                "server_certificate_rotated",
                op.actor,
                target=serial,
                not_after=cert.not_valid_after_utc.isoformat(),
            )
            return serial

    click.echo(f"new server certificate {_run(run())}", err=True)


@main.group()
def ca() -> None:
    """The agent certificate authority."""


@ca.command("rotate")
@data_dir_option
@click.argument("stage", type=click.Choice(["prepare", "activate", "retire", "status"]))
@click.option("--force", is_flag=True, help="retire even if agents still hold certificates of the old CA.")
def ca_rotate(data_dir: Path, stage: str, force: bool) -> None:
    """Rotate the CA in stages: prepare, activate, retire (wait one agent
    certificate lifetime between stages)."""
    from testhide.controlplane.ca import rotation

    async def run() -> str:
        async with operator_context(data_dir) as op:
            if stage == "status":
                state = rotation.ca_state(op.directory)
                return f"active CA generation {state.active}; trusted {list(state.trusted)}"
            if stage == "prepare":
                generation = rotation.prepare(op.directory, op.master)
            elif stage == "activate":
                generation = rotation.activate(op.directory, op.master)
            else:
                await _check_retirable(op, force)
                generation = rotation.ca_state(op.directory).active
                rotation.retire(op.directory)
            await op.auditor.record(f"ca_rotation_{stage}", op.actor, target=str(generation))
            return f"CA rotation: {stage} done (generation {generation})"

    click.echo(_run(run()), err=True)


async def _check_retirable(op: OperatorContext, force: bool) -> None:
    from testhide.controlplane.ca import rotation

    old = {
        fingerprint(op.directory.ca_certificate(g).public_bytes(Encoding.DER))
        for g in rotation.retiring(op.directory)
    }
    now = datetime.now(UTC)
    holding = [
        a.id
        for a in await op.store.list_agents()
        if a.cert_issuer in old and a.revoked_at is None and a.cert_not_after > now
    ]
    if holding and not force:
        raise FailedPrecondition(
            f"agents still hold certificates of the CA being retired: {', '.join(holding)}; "
            "wait for them to renew, or pass --force"
        )


@main.group()
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


@main.group()
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("verify")
@data_dir_option
def audit_verify(data_dir: Path) -> None:
    """Check the whole chain; exit 1 and list what is wrong if anything is."""

    async def run() -> tuple[int, list[str]]:
        async with operator_context(data_dir) as op:
            entries, problems = await op.auditor.verify()
            return len(entries), problems

    count, problems = _run(run())
    if problems:
        for problem in problems:
            click.echo(f"audit log damaged: {problem}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"audit log intact: {count} entries", err=True)


@audit.command("export")
@data_dir_option
def audit_export(data_dir: Path) -> None:
    """Write every entry as a JSON line, with its chain hashes."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            entries, _ = await op.store.read_audit()
            return [e.as_json() for e in entries]

    for entry in _run(run()):
        click.echo(json.dumps(entry, sort_keys=True))


@main.group()
def orgs() -> None:
    """Organisations: tenants that never see each other's data."""


@orgs.command("create")
@data_dir_option
@click.argument("org")
def orgs_create(data_dir: Path, org: str) -> None:
    """Create ORG with a pool named default."""
    from testhide.controlplane.jobs.validation import validate_name

    async def run() -> None:
        async with operator_context(data_dir) as op:
            validate_name("org", org)
            now = datetime.now(UTC)
            await op.store.create_org(org, now)
            await op.store.create_pool(org, "default", now)
            await op.auditor.record("org_created", op.actor, org=org, target=org)

    _run(run())
    click.echo(f"organisation {org} created (with pool default)", err=True)


@orgs.command("revoke")
@data_dir_option
@click.argument("org")
def orgs_revoke(data_dir: Path, org: str) -> None:
    """Cut an organisation off: its API keys, users, sessions, agents and
    enrollment tokens are revoked; its data stays for export."""

    async def run() -> dict[str, int]:
        async with operator_context(data_dir) as op:
            counts = await op.store.revoke_org(org, datetime.now(UTC))
            if counts is None:
                raise NotFound(f"no organisation {org}")
            await op.auditor.record("org_revoked", op.actor, org=org, target=org, revoked=counts)
            return counts

    counts = _run(run())
    click.echo(f"organisation {org} revoked: " + ", ".join(f"{n} {t}" for t, n in counts.items()), err=True)


@orgs.command("list")
@data_dir_option
def orgs_list(data_dir: Path) -> None:
    async def run() -> list[str]:
        async with operator_context(data_dir) as op:
            return await op.store.list_orgs()

    for org in _run(run()):
        click.echo(org)


scopes_option = click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(SCOPES),
    help="Repeatable; default: jobs:read and jobs:write.",
)


@main.group()
def users() -> None:
    """People who log in with a password."""


@users.command("create")
@data_dir_option
@org_option
@click.argument("name")
@scopes_option
def users_create(data_dir: Path, org: str, name: str, scopes: tuple[str, ...]) -> None:
    """Create a user; the password is read from stdin (or prompted)."""
    from testhide.controlplane.auth.passwords import check_complexity, hash_password
    from testhide.controlplane.store.base import UserRecord

    if not USER_NAME_RE.match(name):
        raise click.BadParameter("1-64 letters, digits, '.', '_', '@' or '-'", param_hint="NAME")
    password = (
        click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
        if sys.stdin.isatty()
        else sys.stdin.readline().rstrip("\n")
    )

    async def run() -> None:
        check_complexity(password, name)
        async with operator_context(data_dir) as op:
            await _require_org(op, org)
            await op.store.create_user(
                UserRecord(
                    "u" + secrets.token_hex(8),
                    org,
                    name,
                    hash_password(password),
                    scopes or DEFAULT_SCOPES,
                    datetime.now(UTC),
                )
            )
            await op.auditor.record(
                "user_created", op.actor, org=org, target=name, scopes=list(scopes or DEFAULT_SCOPES)
            )

    _run(run())
    click.echo(f"user {org}/{name} created", err=True)


@users.command("list")
@data_dir_option
@org_option
@click.option("--json", "as_json", is_flag=True)
def users_list(data_dir: Path, org: str, as_json: bool) -> None:
    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            return [
                {
                    "id": u.id,
                    "name": u.name,
                    "scopes": " ".join(u.scopes),
                    "state": "revoked" if u.revoked_at else "active",
                }
                for u in await op.store.list_users(org)
            ]

    _print_rows(_run(run()), as_json, ["id", "name", "scopes", "state"])


@users.command("revoke")
@data_dir_option
@org_option
@click.argument("name")
def users_revoke(data_dir: Path, org: str, name: str) -> None:
    """Remove a user's access and end their sessions."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            if await op.store.revoke_user(org, name, datetime.now(UTC)) is None:
                raise NotFound(f"no user {org}/{name}")
            await op.auditor.record("user_revoked", op.actor, org=org, target=name)

    _run(run())
    click.echo(f"user {org}/{name} revoked; their sessions are over", err=True)


async def _require_org(op: OperatorContext, org: str) -> None:
    if org not in await op.store.list_orgs():
        raise NotFound(f"no organisation {org!r}; create it first: testhide-controlplane orgs create {org}")


@main.group("api-keys")
def api_keys() -> None:
    """Scoped API keys for service accounts (stored only as hashes)."""


@api_keys.command("create")
@data_dir_option
@org_option
@click.option("--name", required=True, help="What the key is for (e.g. the service account).")
@scopes_option
@click.option("--expires-in", type=Duration(), default=None, help="Optional lifetime, e.g. 90d.")
def api_keys_create(data_dir: Path, org: str, name: str, scopes: tuple[str, ...], expires_in: Any) -> None:
    """Print a new key, last on its own line: it is shown this once."""
    from testhide.controlplane.auth.secrets import hash_secret, new_api_key
    from testhide.controlplane.store.base import ApiKeyRecord

    async def run() -> str:
        async with operator_context(data_dir) as op:
            await _require_org(op, org)
            text, parsed = new_api_key()
            now = datetime.now(UTC)
            await op.store.create_api_key(
                ApiKeyRecord(
                    parsed.key_id,
                    org,
                    name,
                    hash_secret(parsed.secret),
                    scopes or DEFAULT_SCOPES,
                    now,
                    owner=f"service-account:{name}",
                    expires_at=now + expires_in if expires_in else None,
                )
            )
            await op.auditor.record(
                "api_key_created",
                op.actor,
                org=org,
                target=parsed.key_id,
                name=name,
                scopes=list(scopes or DEFAULT_SCOPES),
            )
            return text

    key = _run(run())
    click.echo(f"API key for {org}/{name} (shown once):", err=True)
    click.echo(key)


@api_keys.command("list")
@data_dir_option
@org_option
@click.option("--json", "as_json", is_flag=True)
def api_keys_list(data_dir: Path, org: str, as_json: bool) -> None:
    """Keys by prefix, with scopes, expiry and last use; never the secret."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [
                {
                    "prefix": f"thk_{k.id}",
                    "id": k.id,
                    "name": k.name,
                    "scopes": " ".join(k.scopes),
                    "expires_at": k.expires_at.isoformat() if k.expires_at else None,
                    "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                    "state": "revoked"
                    if k.revoked_at
                    else "expired"
                    if k.expires_at and k.expires_at <= now
                    else "active",
                }
                for k in await op.store.list_api_keys(org)
            ]

    _print_rows(_run(run()), as_json, ["prefix", "name", "scopes", "state", "expires_at", "last_used_at"])


@api_keys.command("revoke")
@data_dir_option
@org_option
@click.argument("key_id")
def api_keys_revoke(data_dir: Path, org: str, key_id: str) -> None:
    """Revoke one key (by id or thk_ prefix) and end the sessions it opened."""
    key_id = key_id.removeprefix("thk_").split("_")[0]

    async def run() -> None:
        async with operator_context(data_dir) as op:
            if await op.store.revoke_api_key(org, key_id, datetime.now(UTC)) is None:
                raise NotFound(f"no API key {key_id} in {org}")
            await op.auditor.record("api_key_revoked", op.actor, org=org, target=key_id)

    _run(run())
    click.echo(f"API key {key_id} revoked; its sessions are over", err=True)


@main.group("signing-keys")
def signing_keys() -> None:
    """The keys that sign access tokens."""


@signing_keys.command("rotate")
@data_dir_option
def signing_keys_rotate(data_dir: Path) -> None:
    """A new signing key; the previous one still verifies until a second rotation."""
    from testhide.controlplane.auth.tokens import rotate_signing_key

    async def run() -> str:
        async with operator_context(data_dir) as op:
            kid = rotate_signing_key(op.directory, op.master)
            await op.auditor.record("signing_key_rotated", op.actor, target=kid)
            return kid

    click.echo(f"signing key {_run(run())} active", err=True)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    widths = {c: max([len(c)] + [len(str(r.get(c) or "-")) for r in rows]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c) or "-").ljust(widths[c]) for c in columns))


def _register_recovery_commands() -> None:
    from testhide.controlplane.recovery_cli import backup, master_key, restore

    for command in (master_key, backup, restore):
        main.add_command(command)


_register_recovery_commands()

if __name__ == "__main__":
    main()
