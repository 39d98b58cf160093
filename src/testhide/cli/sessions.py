"""``testhide logout``, ``whoami`` and ``profiles``: the engineer's sessions,
one per profile (``cli/config.py``). Logging out ends the session on the
control plane too, so a copy of the refresh token left anywhere is worthless."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from typing import Any

import click

from testhide.cli.config import Login, active_profile, stored_profiles
from testhide.cli.errors import CliError, RpcFailed
from testhide.cli.model import Identity
from testhide.cli.output import dumps, timestamp


def stdin_secret(option: str) -> str:
    """One secret read from standard input (``--api-key-stdin``, ``--password-stdin``):
    the first line, without its end of line."""
    text = sys.stdin.readline().rstrip("\r\n")
    if not text:
        raise click.UsageError(f"{option}: standard input is empty")
    return text


def password(from_stdin: bool, confirm: bool = False) -> str:
    """A password (``login --user``'s, or a new user's with ``confirm``, asked twice):
    standard input, TESTHIDE_PASSWORD, or asked at the terminal (never echoed, and
    never asked without one)."""
    if from_stdin:
        return stdin_secret("--password-stdin")
    if from_env := os.environ.get("TESTHIDE_PASSWORD"):
        return from_env
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password: set TESTHIDE_PASSWORD or use --password-stdin")
    return str(click.prompt("password", hide_input=True, confirmation_prompt=confirm, err=True))


def _when(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


@click.command()
@click.option(
    "--local", is_flag=True, help="Only forget the session here, without telling the control plane."
)
def logout(local: bool) -> None:
    """Log out: end the session on the control plane (its refresh tokens are
    revoked), then remove it from this machine."""
    from testhide.cli.wire import log_out

    login = Login.load()
    if not local:
        try:
            asyncio.run(log_out(login))
        except RpcFailed as exc:
            if exc.code != "UNAUTHENTICATED":  # an ended session: nothing left to end
                raise RpcFailed(
                    exc.code,
                    exc.details,
                    "the session is kept, so that 'testhide logout' can try again "
                    "('testhide logout --local' forgets it here only)",
                ) from exc
    login.forget()
    where = "" if local else " and on the control plane"
    click.echo(f"logged out of profile {login.profile}: session ended here{where}", err=True)


def _identity_json(login: Login, server: str, who: Identity) -> dict[str, Any]:
    return {
        "profile": login.profile,
        "server": server,
        "servers": list(login.servers),
        "server_version": who.server_version,
        "org": who.org,
        "principal_kind": who.principal_kind,
        "principal_id": who.principal_id,
        "scopes": list(who.scopes),
        "amr": list(who.amr),
        "access_expires_at": timestamp(who.access_expires_at),
        "session_expires_at": timestamp(_when(login.refresh_expires_at)),
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def whoami(as_json: bool) -> None:
    """Who the stored session is, as the control plane sees it: server, org,
    principal, scopes and when the session expires."""
    from testhide.cli.wire import connect

    async def go() -> tuple[Login, str, Identity]:
        async with connect(Login.load()) as api:
            who = await api.who_am_i()
            return Login.load(), api.server, who  # reloaded: the call may have refreshed it

    login, server, who = asyncio.run(go())
    shown = _identity_json(login, server, who)
    if as_json:
        click.echo(dumps(shown))
        return
    for key in ("profile", "server", "server_version", "org", "principal_kind", "principal_id"):
        click.echo(f"{key + ':':<20}{shown[key]}")
    click.echo(f"{'scopes:':<20}{' '.join(who.scopes) or '-'}")
    click.echo(f"{'amr:':<20}{' '.join(who.amr) or '-'}")
    click.echo(f"{'access_expires_at:':<20}{shown['access_expires_at'] or '-'}")
    click.echo(f"{'session_expires_at:':<20}{shown['session_expires_at'] or 'unknown (log in again)'}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def profiles(as_json: bool) -> None:
    """The profiles with a stored session (nothing is asked of a control plane)."""
    current = active_profile()
    rows = []
    for name in stored_profiles():
        row: dict[str, Any] = {"name": name, "active": name == current, "servers": []}
        try:
            login = Login.load(name)
        except click.ClickException as exc:
            rows.append({**row, "session_expires_at": None, "error": exc.message})
            continue
        rows.append(
            {
                **row,
                "servers": list(login.servers),
                "session_expires_at": timestamp(_when(login.refresh_expires_at)),
                "error": None,
            }
        )
    if as_json:
        click.echo(dumps(rows))
        return
    for row in rows:
        mark = "*" if row["active"] else " "
        detail = row.get("error") or f"{','.join(row['servers'])}  {row['session_expires_at'] or '-'}"
        click.echo(f"{mark} {row['name']:<20} {detail}")
