"""``testhide admin api-keys|users|secrets``: the organisation's API keys, users and secrets
listing over the API, for a session with the ``org:admin`` scope (the Admin service's
``org:admin`` half). A new key goes to stdout alone, so that it can be captured; what is
said about it goes to stderr. A new user's password is asked twice without echo, or read
from TESTHIDE_PASSWORD or standard input (``--password-stdin``); never asked without a
terminal."""

from __future__ import annotations

from datetime import timedelta

import click

from testhide.cli.common import call, echo_lines, json_option
from testhide.cli.output import (
    api_key_json,
    api_keys_table,
    dumps,
    secret_json,
    secrets_table,
    timestamp,
    user_json,
    users_table,
)
from testhide.common.durations import Duration

SCOPES = ("jobs:read", "jobs:write", "secrets:write", "agents:admin", "org:admin")
"""The scopes a credential may hold (the control plane's auth/principal.py)."""


scopes_option = click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(SCOPES),
    help="Repeatable; default: jobs:read and jobs:write. Only scopes your session holds.",
)


@click.group("api-keys")
def api_keys() -> None:
    """API keys of your organisation: machine credentials, stored only as hashes."""


@api_keys.command("create")
@click.argument("name")
@scopes_option
@click.option(
    "--expires-in",
    type=Duration(),
    default=None,
    help="Lifetime, e.g. 30d; required with agents:admin or org:admin (your organisation's limit, 90d unless"
    " the operator set another).",
)
def api_keys_create(name: str, scopes: tuple[str, ...], expires_in: timedelta | None) -> None:
    """Create a key NAME and print it: it is shown this once."""
    key, info = call(lambda api: api.create_api_key(name, scopes, expires_in))
    until = f"expires {timestamp(info.expires_at)}" if info.expires_at else "no expiry"
    click.echo(f"API key {info.id} ({name}; {' '.join(info.scopes)}; {until}), shown once:", err=True)
    click.echo(key)


@api_keys.command("list")
@json_option
def api_keys_list(as_json: bool) -> None:
    """Every key of the organisation, with its scopes, state and expiry; never the key."""
    keys = call(lambda api: api.api_keys())
    if as_json:
        click.echo(dumps([api_key_json(k) for k in keys]))
    else:
        echo_lines(api_keys_table(keys))


@api_keys.command("revoke")
@click.argument("key_id")
def api_keys_revoke(key_id: str) -> None:
    """Revoke a key (by id or thk_ prefix); the sessions it opened end too."""
    info = call(lambda api: api.revoke_api_key(key_id))
    click.echo(f"API key {info.id} ({info.name}) revoked; its sessions are over", err=True)


@click.group()
def users() -> None:
    """People of your organisation who log in with a password."""


@users.command("create")
@click.argument("name")
@scopes_option
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_create(name: str, scopes: tuple[str, ...], password_stdin: bool) -> None:
    """Create user NAME (password: asked twice, TESTHIDE_PASSWORD, or --password-stdin)."""
    from testhide.cli.sessions import password as ask

    password = ask(password_stdin, confirm=True)
    user = call(lambda api: api.create_user(name, scopes, password))
    click.echo(f"user {user.name} created ({' '.join(user.scopes)})", err=True)


@users.command("list")
@json_option
def users_list(as_json: bool) -> None:
    found = call(lambda api: api.users())
    if as_json:
        click.echo(dumps([user_json(u) for u in found]))
    else:
        echo_lines(users_table(found))


@users.command("revoke")
@click.argument("name")
def users_revoke(name: str) -> None:
    """Remove a user's access; their sessions end too."""
    user = call(lambda api: api.revoke_user(name))
    click.echo(f"user {user.name} revoked; their sessions are over", err=True)


@click.group()
def secrets() -> None:
    """Your organisation's secrets, with when each was last handed to a job."""


@secrets.command("list")
@json_option
def secrets_list(as_json: bool) -> None:
    found = call(lambda api: api.admin_secrets())
    if as_json:
        click.echo(dumps([secret_json(s) for s in found]))
    else:
        echo_lines(secrets_table(found))


def register(admin: click.Group) -> None:
    """Adds these groups to ``testhide admin``."""
    for group in (api_keys, users, secrets):
        admin.add_command(group)
