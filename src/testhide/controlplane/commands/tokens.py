"""``enroll-token``: one-time agent enrollment tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration, format_duration
from testhide.controlplane.commands.common import data_dir_option, org_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import NotFound
from testhide.controlplane.operator import operator_context


@click.group("enroll-token")
def enroll_token() -> None:
    """One-time agent enrollment tokens."""


@enroll_token.command("create")
@data_dir_option
@org_option
@click.option("--pool", default="default", show_default=True)
@click.option("--ttl", type=Duration(), default="10m", show_default=True)
def enroll_token_create(data_dir: Path, org: str, pool: str, ttl: Any) -> None:
    """Print a one-time token that enrolls one agent into ORG/POOL."""
    from testhide.controlplane.ca.enrollment import create_token

    async def run() -> str:
        async with operator_context(data_dir) as op:
            token = await create_token(
                op.store,
                op.directory.load_ca(op.master, allow_development=True).certificate_pem,
                org,
                pool,
                ttl,
            )
            await op.auditor.record(
                "enrollment_token_created",
                op.actor,
                org=org,
                target=token.split(".")[1],
                pool=pool,
                ttl_s=ttl.total_seconds(),
            )
            return token

    token = _run(run())
    click.echo(f"enrollment token for {org}/{pool}, valid {format_duration(ttl)}, one use:", err=True)
    click.echo(token)


@enroll_token.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def enroll_token_list(data_dir: Path, as_json: bool) -> None:
    """Tokens with their state; never their secrets."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [
                {
                    "id": t.id,
                    "org": t.org,
                    "pool": t.pool,
                    "created_at": t.created_at.isoformat(),
                    "expires_at": t.expires_at.isoformat(),
                    "state": "revoked"
                    if t.revoked_at
                    else "used"
                    if t.used_at
                    else "expired"
                    if t.expires_at <= now
                    else "usable",
                }
                for t in await op.store.list_enrollment_tokens()
            ]

    print_rows(_run(run()), as_json, ["id", "org", "pool", "state", "expires_at"])


@enroll_token.command("revoke")
@data_dir_option
@click.argument("token_id")
def enroll_token_revoke(data_dir: Path, token_id: str) -> None:
    """Make an unused token useless."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            record = await op.store.revoke_enrollment_token(token_id, datetime.now(UTC))
            if record is None:
                raise NotFound(f"no enrollment token {token_id}")
            await op.auditor.record("enrollment_token_revoked", op.actor, org=record.org, target=token_id)

    _run(run())
    click.echo(f"enrollment token {token_id} revoked", err=True)
