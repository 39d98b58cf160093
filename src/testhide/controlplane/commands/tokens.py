"""``enroll-token``: one-time agent enrollment tokens (`operations/agents.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration, format_duration
from testhide.controlplane.commands.agents import operator_actor, rfc3339
from testhide.controlplane.commands.common import data_dir_option, org_option, print_rows
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.operations import agents as ops
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

    async def run() -> str:
        async with operator_context(data_dir) as op:
            ca_pem = op.directory.load_ca(op.master, allow_development=True).certificate_pem
            token, _ = await ops.create_enrollment_token(operator_actor(op), org, pool, ttl, ca_pem)
            return token

    token = _run(run())
    click.echo(f"enrollment token for {org}/{pool}, valid {format_duration(ttl)}, one use:", err=True)
    click.echo(token)


@enroll_token.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def enroll_token_list(data_dir: Path, as_json: bool) -> None:
    """Tokens with their state (valid, used, expired, revoked); never their secrets."""

    async def run() -> list[dict[str, Any]]:
        async with operator_context(data_dir) as op:
            now = datetime.now(UTC)
            return [
                {
                    "id": t.id,
                    "org": t.org,
                    "pool": t.pool,
                    "state": ops.token_state(t, now),
                    "created_at": rfc3339(t.created_at),
                    "expires_at": rfc3339(t.expires_at),
                    "used_at": rfc3339(t.used_at),
                    "revoked_at": rfc3339(t.revoked_at),
                }
                for t in await ops.list_enrollment_tokens(op.store, None)
            ]

    print_rows(_run(run()), as_json, ["id", "org", "pool", "state", "expires_at"])


@enroll_token.command("revoke")
@data_dir_option
@click.argument("token_id")
def enroll_token_revoke(data_dir: Path, token_id: str) -> None:
    """Make an unused token useless."""

    async def run() -> None:
        async with operator_context(data_dir) as op:
            await ops.revoke_enrollment_token(operator_actor(op), None, token_id)

    _run(run())
    click.echo(f"enrollment token {token_id} revoked", err=True)
