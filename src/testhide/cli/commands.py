"""``testhide``'s commands (the program itself starts in `cli/main.py`). Each
command parses its options, talks to the control plane through `cli/wire.py`
in the CLI's own model, and prints (`cli/output.py`); its exit status follows
`cli/exitcodes.py`."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from testhide import __version__
from testhide.cli import exitcodes
from testhide.cli.config import Login, active_profile, check_profile, read_ca_file, use_profile
from testhide.cli.errors import CliError, debugging, explain
from testhide.cli.model import (
    ApiKeyLogin,
    PasswordLogin,
)

# gRPC and the generated messages (cli/wire.py) are imported by the commands
# that talk to the control plane, not for `testhide --help` or a usage error.


@contextmanager
def _own_failures() -> Iterator[None]:
    """click exits 2 on a usage error and 1 on its other errors, numbers a
    job's own command uses too: every failure of testhide itself exits 125."""
    try:
        yield
    except click.ClickException as exc:
        # An instance attribute on purpose: click's main() reads it, and the
        # exception keeps its own message and usage text.
        exc.exit_code = exitcodes.TOOL_FAILED  # type: ignore[misc]
        explain(exc)
        raise
    except click.Abort as exc:  # a prompt got Ctrl-C or end of input
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise click.exceptions.Exit(exitcodes.CANCELED) from exc
        raise CliError("aborted: no input") from exc
    except KeyboardInterrupt:
        raise click.exceptions.Exit(exitcodes.CANCELED) from None


# Each command's module and attribute, imported when the command is looked up: `testhide run`
# imports what `run` needs, not the admin commands' modules (`testhide --help` imports them all).
_COMMANDS = {
    "admin": ("testhide.cli.admin", "admin"),
    "pools": ("testhide.cli.admin", "engineer_pools"),  # `testhide pools list`
    "run": ("testhide.cli.run_command", "run"),
    "jobs": ("testhide.cli.job_commands", "jobs"),
    "logs": ("testhide.cli.job_commands", "logs"),
    "tests": ("testhide.cli.job_commands", "tests"),
    "artifacts": ("testhide.cli.job_commands", "artifacts"),
    "cancel": ("testhide.cli.job_commands", "cancel"),
    "secrets": ("testhide.cli.job_commands", "secrets"),
    "logout": ("testhide.cli.sessions", "logout"),
    "whoami": ("testhide.cli.sessions", "whoami"),
    "profiles": ("testhide.cli.sessions", "profiles"),
    "completion": ("testhide.cli.completion", "completion"),
    "mfa": ("testhide.cli.mfa", "mfa"),
    "verify": ("testhide.cli.verify", "verify"),
}


class _Testhide(click.Group):
    """The group whose commands (`_COMMANDS`) are imported when looked up by name; walking
    ``commands`` (help, completion, a suggestion for a mistyped command) imports them all."""

    _loaded: dict[str, click.Command]

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        for name in _COMMANDS:
            self._load(name)
        return self._loaded

    @commands.setter
    def commands(self, value: MutableMapping[str, click.Command]) -> None:
        self._loaded = dict(value)

    def _load(self, name: str) -> click.Command | None:
        if name not in self._loaded and name in _COMMANDS:
            module, attribute = _COMMANDS[name]
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command), name
            assert command.name == name, name
            self._loaded[name] = command
        return self._loaded.get(name)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if name is None:
            raise TypeError("Command has no name.")
        self._loaded[name] = cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._loaded, *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _own_failures():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _own_failures():
            return super().invoke(ctx)


def _profile(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_profile(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group(cls=_Testhide)
@click.version_option(__version__, prog_name="testhide", message="%(prog)s %(version)s")
@click.option(
    "--profile",
    default="default",
    envvar="TESTHIDE_PROFILE",
    show_envvar=True,
    show_default=True,
    callback=_profile,
    help="The stored session to use: one per control plane.",
)
@click.option("--debug", is_flag=True, help="Show gRPC's own log lines and the traceback behind an error.")
def main(profile: str, debug: bool) -> None:
    """Run CI jobs on testhide.

    Exit status: the job's own exit code; 124 timed out, 125 testhide itself
    failed (or the job could not be set up), 126 the command could not be
    executed, 127 the command was not found, 130 canceled.
    """
    use_profile(profile)
    debugging(debug)


@main.command()
@click.option(
    "--server",
    "servers",
    required=True,
    multiple=True,
    help="HOST:PORT of the control plane's API port; repeat for each replica (tried in order).",
)
@click.option(
    "--api-key",
    envvar="TESTHIDE_API_KEY",
    show_envvar=True,
    help="An API key (or log in as a user with --user); kept out of shell history by the environment.",
)
@click.option("--api-key-stdin", is_flag=True, help="Read the API key from standard input.")
@click.option("--org", default="default", show_default=True, help="Organisation of --user.")
@click.option(
    "--user", help="Log in with a user name and password (TESTHIDE_PASSWORD, --password-stdin, or asked)."
)
@click.option("--password-stdin", is_flag=True, help="Read --user's password from standard input.")
@click.option(
    "--totp-code",
    envvar="TESTHIDE_TOTP_CODE",
    show_envvar=True,
    help="--user's second factor: a code from the authenticator app (asked at a terminal if needed).",
)
@click.option("--recovery-code", help="--user's second factor: one of the recovery codes (each works once).")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate of the control plane, PEM (default: the system's trust store).",
)
def login(
    servers: tuple[str, ...],
    api_key: str | None,
    api_key_stdin: bool,
    org: str,
    user: str | None,
    password_stdin: bool,
    totp_code: str | None,
    recovery_code: str | None,
    ca_file: Path | None,
) -> None:
    """Log in: the credential buys a session (a 10-minute access token, renewed
    with a rotating refresh token); only the session is stored (mode 0600).
    Every command tries the servers in order and passes over one that does not
    connect."""
    from testhide.cli.mfa import log_in  # asks for a second factor when one is wanted
    from testhide.cli.sessions import password, stdin_secret

    if user and click.get_current_context().get_parameter_source("api_key") == ParameterSource.ENVIRONMENT:
        api_key = None  # TESTHIDE_API_KEY set, and a user named: the user logs in
    if api_key_stdin:
        api_key = stdin_secret("--api-key-stdin")
    if bool(api_key) == bool(user) or (password_stdin and not user):
        raise click.UsageError("log in with either --api-key (or --api-key-stdin) or --user")
    credential: ApiKeyLogin | PasswordLogin
    if user:
        credential = PasswordLogin(
            org, user, password(password_stdin), (totp_code or "").strip(), (recovery_code or "").strip()
        )
    else:
        assert api_key is not None
        credential = ApiKeyLogin(api_key.strip())
    servers = tuple(dict.fromkeys(servers))
    ca_pem = read_ca_file(ca_file) if ca_file else None
    session = log_in(Login(servers, ca_pem, profile=active_profile()), credential)
    path = session.save()
    click.echo(f"logged in to {', '.join(servers)}; session stored in {path}", err=True)
