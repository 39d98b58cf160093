"""What the `testhide` command modules share: running a coroutine as a command (Ctrl-C is
exit 130), one call against the control plane as the stored session, printing, and the
options several commands take."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import click

from testhide.cli import exitcodes
from testhide.cli.config import Login
from testhide.cli.follow import DEFAULT_WINDOW
from testhide.common.durations import Duration, format_duration

# gRPC and the generated messages (cli/wire.py) are imported by the commands
# that talk to the control plane, not for `testhide --help` or a usage error.
if TYPE_CHECKING:
    from testhide.cli.wire import ControlPlaneClient

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(exitcodes.CANCELED) from None


def echo_lines(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


def notice(line: str) -> None:
    click.echo(line, err=True)


def call(operation: Callable[[ControlPlaneClient], Awaitable[T]]) -> T:
    """Run ``operation`` against the control plane as the stored session of the active profile."""
    from testhide.cli.wire import connect

    async def go() -> T:
        async with connect(Login.load()) as api:
            return await operation(api)

    return run_async(go())


json_option = click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")


def reconnect_window(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--reconnect-window",
        type=Duration(),
        default=format_duration(DEFAULT_WINDOW),
        envvar="TESTHIDE_RECONNECT_WINDOW",
        show_envvar=True,
        show_default=True,
        help="After losing the control plane, keep reconnecting this long (counted afresh at each loss).",
    )(command)


def pair(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} takes KEY=VALUE, not {text!r}")
    return key, value
