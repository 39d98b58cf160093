"""``testhide mfa``: a user's TOTP second factor, and the second step of
``testhide login --user`` when the control plane asks for one.

Enrolling is authenticated by the password (and, to replace a factor, a
current code of it), not by a session: a user who holds an admin scope cannot
log in before enrolling. The new secret and ten one-use recovery codes are
printed once; the factor takes effect when a code from the authenticator app
confirms it."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from testhide.cli.config import Login, read_ca_file
from testhide.cli.errors import CliError, RpcFailed
from testhide.cli.model import ApiKeyLogin, MfaEnrollment, PasswordLogin
from testhide.cli.output import dumps

SECOND_FACTOR_REQUIRED = "a second factor is required"
"""How the control plane's refusal of a login without the user's second factor begins."""
_TOTP_CODE = re.compile(r"\A\s*[0-9]{6}\s*\Z")


def second_factor_required(error: RpcFailed) -> bool:
    return error.code == "UNAUTHENTICATED" and error.details.startswith(SECOND_FACTOR_REQUIRED)


def with_code(credential: PasswordLogin, code: str) -> PasswordLogin:
    """``code`` as the login's second factor: six digits are a TOTP code, anything else a recovery code."""
    if _TOTP_CODE.match(code):
        return replace(credential, totp_code=code.strip(), recovery_code="")
    return replace(credential, totp_code="", recovery_code=code.strip())


def log_in(login: Login, credential: ApiKeyLogin | PasswordLogin) -> Login:
    """``testhide login``'s exchange: when the control plane wants a second
    factor that was not given and a terminal can be asked, ask and try once more."""
    from testhide.cli.wire import log_in as exchange

    try:
        return asyncio.run(exchange(login, credential))
    except RpcFailed as exc:
        if not (isinstance(credential, PasswordLogin) and second_factor_required(exc) and sys.stdin.isatty()):
            raise
    code = click.prompt("second factor (a code from your authenticator app, or a recovery code)", err=True)
    return asyncio.run(exchange(login, with_code(credential, str(code))))


def _server_options(command: Any) -> Any:
    options = (
        click.option(
            "--server",
            "servers",
            required=True,
            multiple=True,
            help="HOST:PORT of the control plane's API port; repeat for each replica (tried in order).",
        ),
        click.option(
            "--ca-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="CA certificate of the control plane, PEM (default: the system's trust store).",
        ),
        click.option("--org", default="default", show_default=True, help="Organisation of --user."),
        click.option("--user", required=True, help="Your user name (password: TESTHIDE_PASSWORD, or asked)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _login(servers: tuple[str, ...], ca_file: Path | None) -> Login:
    return Login(tuple(dict.fromkeys(servers)), read_ca_file(ca_file) if ca_file else None)


def _credential(org: str, user: str) -> PasswordLogin:
    from testhide.cli.sessions import password

    return PasswordLogin(org=org, user=user, password=password(False))


async def _enroll(login: Login, credential: PasswordLogin) -> MfaEnrollment:
    from testhide.cli.wire import connect

    async with connect(login) as client:
        return await client.enroll_mfa(credential)


async def _confirm(login: Login, credential: PasswordLogin) -> None:
    from testhide.cli.wire import connect

    async with connect(login) as client:
        await client.confirm_mfa(credential)


@click.group()
def mfa() -> None:
    """Your second factor: a TOTP authenticator app (required if you hold an admin scope)."""


@mfa.command()
@_server_options
@click.option("--current-code", help="A code of your current factor, to replace it with a new one.")
@click.option("--no-confirm", is_flag=True, help="Print the new factor only; confirm it with 'mfa confirm'.")
@click.option("--json", "as_json", is_flag=True, help="Print the new factor as JSON.")
def enroll(
    servers: tuple[str, ...],
    ca_file: Path | None,
    org: str,
    user: str,
    current_code: str | None,
    no_confirm: bool,
    as_json: bool,
) -> None:
    """Enroll a TOTP second factor: prints its otpauth:// URI (for the app), its
    secret and ten recovery codes, then asks for a code from the app to confirm it."""
    login, credential = _login(servers, ca_file), _credential(org, user)
    enrollment = asyncio.run(_enroll(login, replace(credential, totp_code=current_code or "")))
    if as_json:
        document = {
            "otpauth_uri": enrollment.otpauth_uri,
            "secret": enrollment.secret,
            "recovery_codes": list(enrollment.recovery_codes),
        }
        click.echo(dumps(document))
    else:
        click.echo(f"otpauth_uri: {enrollment.otpauth_uri}")
        click.echo(f"secret: {enrollment.secret}")
        click.echo("recovery_codes:")
        for code in enrollment.recovery_codes:
            click.echo(f"  {code}")
    click.echo(
        "store the recovery codes somewhere safe, away from this device:"
        " each logs you in once, without the app",
        err=True,
    )
    if no_confirm:
        click.echo(
            f"confirm with: testhide mfa confirm --server HOST:PORT --org {org} --user {user} --code CODE",
            err=True,
        )
        return
    code = str(click.prompt("code from your authenticator app", err=True)).strip()
    asyncio.run(_confirm(login, replace(credential, totp_code=code)))
    click.echo(f"second factor of {org}/{user} confirmed: logins now ask for a code", err=True)


@mfa.command()
@_server_options
@click.option(
    "--code",
    envvar="TESTHIDE_TOTP_CODE",
    show_envvar=True,
    help="A code from the factor being enrolled (asked if not given).",
)
def confirm(servers: tuple[str, ...], ca_file: Path | None, org: str, user: str, code: str | None) -> None:
    """Confirm the factor 'mfa enroll --no-confirm' printed, with a code from it."""
    login, credential = _login(servers, ca_file), _credential(org, user)
    if not code:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask for the code: pass --code or set TESTHIDE_TOTP_CODE")
        code = str(click.prompt("code from your authenticator app", err=True))
    asyncio.run(_confirm(login, replace(credential, totp_code=code.strip())))
    click.echo(f"second factor of {org}/{user} confirmed: logins now ask for a code", err=True)
