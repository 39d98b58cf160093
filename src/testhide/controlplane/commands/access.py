"""Who may call the API: ``orgs``, ``users``, ``api-keys`` and ``signing-keys``."""

from __future__ import annotations

import re
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration
from testhide.controlplane.auth.principal import SCOPES
from testhide.controlplane.commands.common import data_dir_option, org_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import NotFound
from testhide.controlplane.operator import OperatorContext, operator_context

DEFAULT_SCOPES = ("jobs:read", "jobs:write")
USER_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


@click.group()
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

    print_rows(_run(run()), as_json, ["id", "name", "scopes", "state"])


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


@click.group("api-keys")
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

    print_rows(_run(run()), as_json, ["prefix", "name", "scopes", "state", "expires_at", "last_used_at"])


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
