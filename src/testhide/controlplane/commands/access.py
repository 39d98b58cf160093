"""Who may call the API: ``orgs``, ``users``, ``api-keys`` and ``signing-keys``. Each command
calls the operation the Admin service calls too (`operations/access.py`), as the operator:
the scopes it grants are not limited to any credential's."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from testhide.common.durations import Duration, parse_duration
from testhide.controlplane.auth.principal import SCOPES
from testhide.controlplane.commands.common import data_dir_option, org_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.operations import Actor
from testhide.controlplane.operations import access as ops
from testhide.controlplane.operator import operator_context

T = TypeVar("T")


def _as_operator(data_dir: Path, operation: Callable[[Actor], Awaitable[T]]) -> T:
    async def run() -> T:
        async with operator_context(data_dir) as op:
            return await operation(Actor(op.store, op.auditor, op.actor))

    return _run(run())


def rfc3339(value: datetime | None) -> str | None:
    """As every ``--json`` of the three programs writes a time."""
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lifetime(text: str) -> timedelta | None:
    if text.strip().lower() == "none":
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}, or none", param_hint="--admin-key-max-lifetime") from None


@click.group()
def orgs() -> None:
    """Organisations: tenants that never see each other's data."""


@orgs.command("create")
@data_dir_option
@click.argument("org")
def orgs_create(data_dir: Path, org: str) -> None:
    """Create ORG with a pool named default."""
    created = _as_operator(data_dir, lambda actor: ops.create_org(actor, org))
    limit = created.admin_key_max_lifetime
    click.echo(
        f"organisation {org} created (with pool default; API keys with an admin scope live at most"
        f" {ops.lifetime_text(limit) if limit else 'forever'})",
        err=True,
    )


@orgs.command("revoke")
@data_dir_option
@click.argument("org")
def orgs_revoke(data_dir: Path, org: str) -> None:
    """Cut an organisation off: its API keys, users, sessions, agents and
    enrollment tokens are revoked; its data stays for export."""
    counts = _as_operator(data_dir, lambda actor: ops.revoke_org(actor, org))
    click.echo(f"organisation {org} revoked: " + ", ".join(f"{n} {t}" for t, n in counts.items()), err=True)


@orgs.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Name, times and policy of each.")
def orgs_list(data_dir: Path, as_json: bool) -> None:
    """Organisation names, one a line (with --json, each one's times and policy)."""
    found = _as_operator(data_dir, ops.list_orgs)
    if not as_json:
        for org in found:
            click.echo(org.name)
        return
    print_rows(
        [
            {
                "name": o.name,
                "created_at": rfc3339(o.created_at),
                "revoked_at": rfc3339(o.revoked_at),
                "state": "revoked" if o.revoked_at else "active",
                "admin_key_max_lifetime_s": int(o.admin_key_max_lifetime.total_seconds())
                if o.admin_key_max_lifetime
                else None,
            }
            for o in found
        ],
        True,
        [],
    )


@orgs.command("set")
@data_dir_option
@click.argument("org")
@click.option(
    "--admin-key-max-lifetime",
    "lifetime",
    required=True,
    metavar="DURATION|none",
    help="The longest an API key with agents:admin or org:admin may live (new orgs: 90d); none: no limit."
    " Existing keys are not touched.",
)
def orgs_set(data_dir: Path, org: str, lifetime: str) -> None:
    """Set ORG's policy."""
    limit = _lifetime(lifetime)
    _as_operator(data_dir, lambda actor: ops.set_admin_key_max_lifetime(actor, org, limit))
    shown = ops.lifetime_text(limit) if limit else "no limit"
    click.echo(f"organisation {org}: API keys with an admin scope may live {shown}", err=True)


scopes_option = click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(SCOPES),
    help="Repeatable; default: jobs:read and jobs:write.",
)


@click.group()
def users() -> None:
    """People who log in with a password."""


@users.command("create")
@data_dir_option
@org_option
@click.argument("name")
@scopes_option
def users_create(data_dir: Path, org: str, name: str, scopes: tuple[str, ...]) -> None:
    """Create a user; the password is read from stdin (or prompted)."""
    if not ops.NAME_RE.match(name):
        raise click.BadParameter(ops.NAME_RULE, param_hint="NAME")
    password = (
        click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
        if sys.stdin.isatty()
        else sys.stdin.readline().rstrip("\n")
    )
    _as_operator(data_dir, lambda actor: ops.create_user(actor, org, name, scopes, password, None))
    click.echo(f"user {org}/{name} created", err=True)


@users.command("list")
@data_dir_option
@org_option
@click.option("--json", "as_json", is_flag=True)
def users_list(data_dir: Path, org: str, as_json: bool) -> None:
    rows: list[dict[str, Any]] = [
        {
            "name": u.name,
            "org": org,
            "scopes": list(u.scopes) if as_json else " ".join(u.scopes),
            "state": ops.user_state(u),
            "mfa": mfa if as_json else "yes" if mfa else "no",
            "created_at": rfc3339(u.created_at),
            "revoked_at": rfc3339(u.revoked_at),
        }
        for u, mfa in _as_operator(data_dir, lambda actor: ops.list_users(actor, org))
    ]
    print_rows(rows, as_json, ["name", "scopes", "state", "mfa"])


@users.command("revoke")
@data_dir_option
@org_option
@click.argument("name")
def users_revoke(data_dir: Path, org: str, name: str) -> None:
    """Remove a user's access and end their sessions."""
    _as_operator(data_dir, lambda actor: ops.revoke_user(actor, org, name))
    click.echo(f"user {org}/{name} revoked; their sessions are over", err=True)


@click.group("api-keys")
def api_keys() -> None:
    """Scoped API keys for service accounts (stored only as hashes)."""


@api_keys.command("create")
@data_dir_option
@org_option
@click.option("--name", required=True, help="What the key is for (e.g. the service account).")
@scopes_option
@click.option(
    "--expires-in",
    type=Duration(),
    default=None,
    help="Lifetime, e.g. 30d; required with agents:admin or org:admin (at most the organisation's limit,"
    " 90d unless the operator set another).",
)
def api_keys_create(
    data_dir: Path, org: str, name: str, scopes: tuple[str, ...], expires_in: timedelta | None
) -> None:
    """Print a new key, last on its own line: it is shown this once."""
    key, record = _as_operator(
        data_dir, lambda actor: ops.create_api_key(actor, org, name, scopes, expires_in, None)
    )
    until = f", expires {rfc3339(record.expires_at)}" if record.expires_at else ""
    click.echo(f"API key for {org}/{name} (shown once{until}):", err=True)
    click.echo(key)


@api_keys.command("list")
@data_dir_option
@org_option
@click.option("--json", "as_json", is_flag=True)
def api_keys_list(data_dir: Path, org: str, as_json: bool) -> None:
    """Keys by prefix, with scopes, expiry and last use; never the secret."""
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = [
        {
            "id": k.id,
            "prefix": f"thk_{k.id}",
            "org": org,
            "name": k.name,
            "scopes": list(k.scopes) if as_json else " ".join(k.scopes),
            "state": ops.api_key_state(k, now),
            "created_at": rfc3339(k.created_at),
            "expires_at": rfc3339(k.expires_at),
            "revoked_at": rfc3339(k.revoked_at),
            "last_used_at": rfc3339(k.last_used_at),
        }
        for k in _as_operator(data_dir, lambda actor: ops.list_api_keys(actor, org))
    ]
    print_rows(rows, as_json, ["prefix", "name", "scopes", "state", "expires_at", "last_used_at"])


@api_keys.command("revoke")
@data_dir_option
@org_option
@click.argument("key_id")
def api_keys_revoke(data_dir: Path, org: str, key_id: str) -> None:
    """Revoke one key (by id or thk_ prefix) and end the sessions it opened."""
    revoked = _as_operator(data_dir, lambda actor: ops.revoke_api_key(actor, org, key_id))
    click.echo(f"API key {revoked.id} revoked; its sessions are over", err=True)


@click.group("signing-keys")
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
