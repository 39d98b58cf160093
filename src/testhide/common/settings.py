"""Settings of the daemons' long-running commands (``testhide-controlplane
serve``, ``testhide-agent run``), resolved here, in the command-line layer only.

Every option of a ``SettingsCommand`` comes from, in increasing precedence:
its default, a TOML file (``--config FILE`` or ``<PREFIX>CONFIG``), an
environment variable (``<PREFIX><OPTION_NAME>``, shown in ``--help``), the
command line. The generic part is the point: an option added to such a command
gets its variable and its file key without a line here. The file's keys are
the long option names, with dashes or underscores (``agent-listen`` or
``agent_listen``); an unknown key, or a value of the wrong type, is a usage
error that names the key and the file. ``--print-config`` prints the settings
that would be used, as TOML that can be saved as a config file, each with where
it came from, secrets left out, and exits.

An option that the parent group has too and was given there on the command
line (``testhide-agent --log-level debug run``) counts as given to the command.

``Reloader`` is what SIGHUP does: the same command line is parsed again with
the file read anew; the log level and format change at once, other changed
settings are logged as needing a restart, and a file that no longer parses is
logged while the settings in use stay."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from click.core import ParameterSource

from testhide.common.durations import Duration, format_duration
from testhide.common.logging import LEVELS, SECRET_KEYS, configure
from testhide.common.sizes import Size, format_size

log = structlog.get_logger("testhide.settings")

F = TypeVar("F", bound=Callable[..., Any])

# Kept in click's context meta, which a command's context shares with its parent.
_ARGS = "testhide.settings.args"
_FILE = "testhide.settings.file"
_PRINT = "testhide.settings.print"
_OWN = ("config_file", "print_config")

RUNTIME = frozenset({"log_level", "log_format"})
"""What a reload changes in a running daemon; any other change waits for a restart."""


class SecretOption(click.Option):
    """An option whose value ``--print-config`` never shows (``cls=SecretOption``).
    Options with ``hide_input`` or named like a credential (``SECRET_KEYS``) are secret too."""


def log_options(envvar_prefix: str) -> Callable[[F], F]:
    """``--log-format`` and ``--log-level``: on a daemon's group, and again on its
    long-running command, so that they are accepted before and after it."""

    def decorate(command: F) -> F:
        command = click.option(
            "--log-level",
            type=click.Choice(LEVELS, case_sensitive=False),
            default="info",
            show_default=True,
            envvar=f"{envvar_prefix}LOG_LEVEL",
            show_envvar=True,
            help="Log this level and above (changes on SIGHUP).",
        )(command)
        return click.option(
            "--log-format",
            type=click.Choice(["console", "json"]),
            default="console",
            show_default=True,
            envvar=f"{envvar_prefix}LOG_FORMAT",
            show_envvar=True,
            help="key=value lines, or one JSON object a line (changes on SIGHUP).",
        )(command)

    return decorate


def key_of(option: click.Option) -> str:
    """The option's name in a config file and in ``--print-config``: its long flag without dashes."""
    for opt in option.opts:
        if opt.startswith("--"):
            return opt[2:]
    return str(option.name)


def is_secret(option: click.Option) -> bool:
    return isinstance(option, SecretOption) or option.hide_input or option.name in SECRET_KEYS


class SettingsCommand(click.Command):
    """A click command whose options come from flags, ``envvar_prefix`` variables and a TOML file:
    ``@click.command(cls=SettingsCommand, envvar_prefix="TESTHIDE_")``."""

    def __init__(self, *args: Any, envvar_prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.envvar_prefix = envvar_prefix
        for option in self.settings_options():
            if option.envvar is None:  # an existing name stays what operators already use
                option.envvar = envvar_prefix + key_of(option).replace("-", "_").upper()
            option.show_envvar = True
        self.params += [
            click.Option(
                ["--config", "config_file"],
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                envvar=f"{envvar_prefix}CONFIG",
                show_envvar=True,
                is_eager=True,
                expose_value=False,
                callback=_read_config,
                metavar="FILE",
                help="TOML file of settings, keyed by the long option names; variables and flags override"
                " it. Read again on SIGHUP.",
            ),
            click.Option(
                ["--print-config"],
                is_flag=True,
                expose_value=False,
                callback=_remember_print,
                help="Print the settings in effect (as TOML, secrets left out) and exit.",
            ),
        ]

    def settings_options(self) -> Iterator[click.Option]:
        for param in self.params:
            if isinstance(param, click.Option) and param.name not in _OWN:
                yield param

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)  # for Reloader: the same command line, the file read anew
        rest = super().parse_args(ctx, args)
        parent = ctx.parent
        if parent is not None:
            for name, value in parent.params.items():
                given_there = parent.get_parameter_source(name) is ParameterSource.COMMANDLINE
                given_here = ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
                if given_there and name in ctx.params and not given_here:
                    ctx.params[name] = value
                    ctx.set_parameter_source(name, ParameterSource.COMMANDLINE)
        return rest

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.meta.get(_PRINT):
            click.echo(self.render(ctx), nl=False)
            return None
        return super().invoke(ctx)

    def read_config(self, ctx: click.Context, path: Path) -> dict[str, Any]:
        """The file's settings by parameter name, checked (a usage error names key and file)."""
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise click.UsageError(f"cannot read the config file {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"{path} is not a valid TOML file: {exc}") from exc
        by_key: dict[str, click.Option] = {}
        for option in self.settings_options():
            by_key[key_of(option)] = by_key[key_of(option).replace("-", "_")] = option
        unknown = sorted(key for key in data if key not in by_key)
        if unknown:
            raise click.UsageError(
                f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                f" (the keys are the long option names of {ctx.command_path} --help)"
            )
        settings: dict[str, Any] = {}
        for key, value in data.items():
            option = by_key[key]
            if option.name in settings:
                raise click.UsageError(f"{path}: {key_of(option)} is given twice")
            settings[str(option.name)] = _checked(ctx, option, key, value, path)
        return settings

    def render(self, ctx: click.Context) -> str:
        """The settings in ``ctx`` as TOML, each with where it came from; secrets as comments."""
        file = ctx.meta.get(_FILE)
        lines = [
            f"# {ctx.command_path}: the settings in effect. Precedence: flag, then {self.envvar_prefix}*"
            " variable, then config file, then default.",
        ]
        for option in self.settings_options():
            name = str(option.name)
            value = ctx.params.get(name)
            origin = {
                ParameterSource.COMMANDLINE: "flag",
                ParameterSource.ENVIRONMENT: f"{option.envvar}",
                ParameterSource.DEFAULT_MAP: f"{file}",
            }.get(ctx.get_parameter_source(name) or ParameterSource.DEFAULT, "default")
            if value is None:
                lines.append(f"# {key_of(option)}: not set  ({origin})")
            elif is_secret(option):
                lines.append(f"# {key_of(option)}: set, not shown (secret)  ({origin})")
            else:
                lines.append(f"{key_of(option)} = {_toml_value(option, value)}  # {origin}")
        return "\n".join(lines) + "\n"


def _read_config(ctx: click.Context, _: click.Parameter, path: Path | None) -> None:
    if path is None:
        return
    command = ctx.command
    assert isinstance(command, SettingsCommand)
    ctx.meta[_FILE] = path
    ctx.default_map = {**(ctx.default_map or {}), **command.read_config(ctx, path)}


def _remember_print(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    ctx.meta[_PRINT] = value


def _expected(option: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types an option takes, and how to say so."""
    kind = option.type
    if option.is_flag or isinstance(kind, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(kind, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(kind, click.types.FloatParamType):
        return (int, float), "a number"
    if isinstance(kind, Size):
        return (int, str), 'a size ("512MiB") or a number of bytes'
    if isinstance(kind, Duration):
        return (int, str), 'a duration ("90s", "1h30m") or a number of seconds'
    return (str,), "a string"


def _checked(ctx: click.Context, option: click.Option, key: str, value: Any, path: Path) -> Any:
    types, what = _expected(option)

    def fits(item: Any) -> bool:
        return isinstance(item, types) and (bool in types or not isinstance(item, bool))

    if option.multiple or option.nargs != 1:
        if not isinstance(value, list) or not all(fits(item) for item in value):
            raise click.UsageError(f"{path}: {key} must be a list, each item {what}")
    elif not fits(value):
        raise click.UsageError(f"{path}: {key} must be {what}, not {_toml_type(value)}")
    if isinstance(option.type, Duration):  # a bare number is seconds, as on the command line
        value = [str(v) for v in value] if isinstance(value, list) else str(value)
    try:
        option.type_cast_value(ctx, tuple(value) if isinstance(value, list) else value)
    except click.BadParameter as exc:
        raise click.UsageError(f"{path}: {key}: {exc.message}") from exc
    return value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "a table" if isinstance(value, dict) else "a date or time")


def _toml_value(option: click.Option, value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(option, item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(option.type, Size) and isinstance(value, int):
        return _toml_string(format_size(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, timedelta):
        if value % timedelta(seconds=1):
            return _toml_string(f"{value // timedelta(milliseconds=1)}ms")
        return _toml_string(format_duration(value))
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string. A lone surrogate (undecodable bytes in a path) has no TOML form: U+FFFD."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class Reloader:
    """SIGHUP for a daemon started by a ``SettingsCommand``, with ``ctx`` its context."""

    def __init__(self, ctx: click.Context) -> None:
        assert isinstance(ctx.command, SettingsCommand)
        self._ctx, self._command = ctx, ctx.command
        self.started = dict(ctx.params)
        """The settings the daemon started with."""

    def reload(self) -> dict[str, Any] | None:
        """Read the settings again and apply what can change at runtime: the new
        settings, or None when they are refused (logged; the ones in use stay)."""
        try:
            fresh = self._command.make_context(
                self._ctx.info_name, list(self._ctx.meta[_ARGS]), parent=self._ctx.parent
            )
        except (click.ClickException, click.exceptions.Exit, click.Abort) as exc:
            error = exc.format_message() if isinstance(exc, click.ClickException) else repr(exc)
            log.error("config_reload_failed", error=error, note="the settings in use stay")
            return None
        except Exception:  # a reload never ends a running daemon
            log.exception("config_reload_failed", note="the settings in use stay")
            return None
        settings = fresh.params
        if "log_level" in settings and "log_format" in settings:
            configure(settings["log_level"], json_output=settings["log_format"] == "json")
        waiting = [
            key_of(option)
            for option in self._command.settings_options()
            if option.name not in RUNTIME and settings.get(str(option.name)) != self.started.get(option.name)
        ]
        if waiting:
            log.warning("config_change_needs_restart", settings=waiting)
        file = fresh.meta.get(_FILE)
        log.info(
            "config_reloaded",
            config_file=str(file) if file else None,
            new_level=settings.get("log_level"),
            new_format=settings.get("log_format"),
        )
        return settings
