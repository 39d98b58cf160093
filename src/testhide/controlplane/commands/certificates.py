"""``server-cert`` and ``ca``: rotating the listeners' certificate and the agent CA."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import SubjectAlternativeName

from testhide.common.tls import fingerprint
from testhide.controlplane.commands.common import data_dir_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.errors import FailedPrecondition
from testhide.controlplane.operator import OperatorContext, operator_context


@click.group("server-cert")
def server_cert() -> None:
    """The listeners' certificate."""


@server_cert.command("rotate")
@data_dir_option
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="DNS name or IP the listeners answer as (repeatable: every replica's); replaces the names"
    " given before. Default: the names given before.",
)
def server_cert_rotate(data_dir: Path, server_names: tuple[str, ...]) -> None:
    """Issue a new server certificate; a running control plane serves it to
    new connections within a second, open streams carry on."""
    from testhide.controlplane.ca.rotation import rotate_server_certificate

    async def run() -> tuple[str, list[str]]:
        async with operator_context(data_dir) as op:
            cert = rotate_server_certificate(op.directory, op.master, server_names)
            serial = format(cert.serial_number, "x")
            sans = cert.extensions.get_extension_for_class(SubjectAlternativeName).value
            names = [str(name.value) for name in sans]
            await op.auditor.record(
                "server_certificate_rotated",
                op.actor,
                target=serial,
                not_after=cert.not_valid_after_utc.isoformat(),
                names=names,
            )
            return serial, names

    serial, names = _run(run())
    click.echo(f"new server certificate {serial} for {', '.join(names)}", err=True)


@click.group()
def ca() -> None:
    """The agent certificate authority."""


@ca.command("rotate")
@data_dir_option
@click.argument("stage", type=click.Choice(["prepare", "activate", "retire", "status"]))
@click.option("--force", is_flag=True, help="retire even if agents still hold certificates of the old CA.")
def ca_rotate(data_dir: Path, stage: str, force: bool) -> None:
    """Rotate the CA in stages: prepare, activate, retire (wait one agent
    certificate lifetime between stages)."""
    from testhide.controlplane.ca import rotation

    async def run() -> str:
        async with operator_context(data_dir) as op:
            if stage == "status":
                state = rotation.ca_state(op.directory)
                return f"active CA generation {state.active}; trusted {list(state.trusted)}"
            if stage == "prepare":
                generation = rotation.prepare(op.directory, op.master)
            elif stage == "activate":
                generation = rotation.activate(op.directory, op.master)
            else:
                await _check_retirable(op, force)
                generation = rotation.ca_state(op.directory).active
                rotation.retire(op.directory)
            await op.auditor.record(f"ca_rotation_{stage}", op.actor, target=str(generation))
            return f"CA rotation: {stage} done (generation {generation})"

    click.echo(_run(run()), err=True)


async def _check_retirable(op: OperatorContext, force: bool) -> None:
    from testhide.controlplane.ca import rotation

    old = {
        fingerprint(op.directory.ca_certificate(g).public_bytes(Encoding.DER))
        for g in rotation.retiring(op.directory)
    }
    now = datetime.now(UTC)
    holding = [
        a.id
        for a in await op.store.list_agents()
        if a.cert_issuer in old and a.revoked_at is None and a.cert_not_after > now
    ]
    if holding and not force:
        raise FailedPrecondition(
            f"agents still hold certificates of the CA being retired: {', '.join(holding)}; "
            "wait for them to renew, or pass --force"
        )
