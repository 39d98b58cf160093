"""``users reset-mfa``: the operator's way back in for a user who lost both the
authenticator and the recovery codes. The user's factors go (pending and
confirmed, with their codes); the user enrolls again with the password
(``testhide mfa enroll``), which a user who holds an admin scope must do
before logging in again."""

from __future__ import annotations

from pathlib import Path

import click

from testhide.controlplane.commands.common import data_dir_option, org_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import NotFound
from testhide.controlplane.operator import operator_context


@click.command("reset-mfa")
@data_dir_option
@org_option
@click.argument("name")
def users_reset_mfa(data_dir: Path, org: str, name: str) -> None:
    """Remove the second factor of user NAME, who then enrolls a new one."""

    async def run() -> int:
        async with operator_context(data_dir) as op:
            user = await op.store.find_user(org, name)
            if user is None:
                raise NotFound(f"no user {org}/{name}")
            removed = await op.store.delete_mfa_factors(org, user.id)
            await op.auditor.record("mfa_reset", op.actor, org=org, target=name, factors=removed)
            return removed

    removed = _run(run())
    if removed:
        click.echo(
            f"second factor of {org}/{name} removed; they enroll again with 'testhide mfa enroll'", err=True
        )
    else:
        click.echo(f"user {org}/{name} had no second factor; nothing changed", err=True)
