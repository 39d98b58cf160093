"""``audit``: verify and export the tamper-evident audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from testhide.controlplane.commands.common import data_dir_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.operator import operator_context


@click.group()
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("verify")
@data_dir_option
def audit_verify(data_dir: Path) -> None:
    """Check the whole chain; exit 1 and list what is wrong if anything is."""

    async def run() -> tuple[int, list[str]]:
        async with operator_context(data_dir) as op:
            entries, problems = await op.auditor.verify()
            return len(entries), problems

    count, problems = _run(run())
    if problems:
        for problem in problems:
            click.echo(f"audit log damaged: {problem}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"audit log intact: {count} entries", err=True)


@audit.command("export")
@data_dir_option
def audit_export(data_dir: Path) -> None:
    """Write every entry as a JSON line, with its chain hashes."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            entries, _ = await op.store.read_audit()
            return [e.as_json() for e in entries]

    for entry in _run(run()):
        click.echo(json.dumps(entry, sort_keys=True))
