"""``statement-keys``: the keys that countersign jobs' statements (``ca/statement_keys.py``).
Not ``signing-keys``, which are the access-token keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from testhide.common.durations import parse_duration
from testhide.controlplane.ca.statement_keys import (
    DEFAULT_ACTIVE,
    DEFAULT_RETIREMENT_WINDOW,
    describe,
    rotate,
)
from testhide.controlplane.commands.common import data_dir_option, print_rows, run
from testhide.controlplane.operator import operator_context


def _duration(_: click.Context, param: click.Parameter, value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@click.group("statement-keys")
def statement_keys() -> None:
    """The keys that countersign jobs' signed statements."""


@statement_keys.command("rotate")
@data_dir_option
@click.option(
    "--active",
    default=f"{DEFAULT_ACTIVE.days}d",
    show_default=True,
    callback=_duration,
    help="How long the new key countersigns before the next one takes over.",
)
@click.option(
    "--retirement-window",
    default=f"{DEFAULT_RETIREMENT_WINDOW.days}d",
    show_default=True,
    callback=_duration,
    help="How long the new key's certificate outlasts its active period.",
)
@click.option("--dev", is_flag=True, help="Accept a data dir with development certificates.")
def statement_keys_rotate(data_dir: Path, active: timedelta, retirement_window: timedelta, dev: bool) -> None:
    """A new key countersigns from now on (a running serve takes it within a minute); the old
    keys stop, and what they countersigned still verifies."""

    async def go() -> tuple[str, list[str]]:
        async with operator_context(data_dir) as op:
            ca = op.directory.load_ca(op.master, allow_development=dev)
            record, retired = await rotate(
                op.store, ca, op.master, datetime.now(UTC), active, retirement_window
            )
            await op.auditor.record("statement_key_rotated", op.actor, target=record.id, retired=retired)
            return record.id, retired

    kid, retired = run(go())
    click.echo(f"statement key {kid} active; retired: {', '.join(retired) or 'none'}", err=True)


@statement_keys.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def statement_keys_list(data_dir: Path, as_json: bool) -> None:
    """Every statement key, oldest first, with its state and its certificate's end."""

    async def go() -> list[dict[str, object]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [describe(r, now) for r in await op.store.statement_keys()]

    columns = ["id", "state", "created_at", "stops_signing_at", "retired_at", "certificate_expires_at"]
    print_rows(run(go()), as_json, columns)
