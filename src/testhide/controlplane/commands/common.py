"""What the operator's commands share: running a coroutine with domain errors
shown as messages, the data-dir and org options, and printing rows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from testhide.controlplane.errors import ControlPlaneError
from testhide.controlplane.store.sqlite import RESTORE_HINT, is_damage

T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    envvar="TESTHIDE_DATA_DIR",
    help="The control plane's data directory.",
)

org_option = click.option("--org", default="default", show_default=True, help="Organisation.")

master_key_option = click.option(
    "--master-key",
    metavar="file:PATH|pkcs11:URI",
    envvar="TESTHIDE_MASTER_KEY_URI",  # not TESTHIDE_MASTER_KEY: that one holds a ring itself
    show_envvar=True,
    help="Where the master key ring is: a ring file, or the HSM key that wraps DATA_DIR/keyring.pkcs11"
    " (pkcs11:token=T;object=K?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/PIN)"
    " [what the data dir has: keyring.pkcs11, else TESTHIDE_MASTER_KEY, else master.key].",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        # Opening checks the file's header and schema; a damaged page further in shows only when read.
        raise click.ClickException(
            f"the control plane's database is damaged ({exc}); {RESTORE_HINT}"
        ) from exc


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    widths = {c: max([len(c)] + [len(str(r.get(c) or "-")) for r in rows]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c) or "-").ljust(widths[c]) for c in columns))
