"""Operator commands that keep data recoverable: master-key rotation, backup
and restore. Registered on ``testhide-controlplane`` by ``controlplane.cli``."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

import click

from testhide.controlplane import hsm
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey, read_key_file
from testhide.controlplane.commands.common import data_dir_option, master_key_option, run
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.operator import operator_context


@click.group("master-key")
def master_key() -> None:
    """The master key ring that wraps every data key and sealed file."""


@master_key.command("rotate")
@data_dir_option
@master_key_option
@click.option(
    "--force",
    is_flag=True,
    help="Drop the old key even if some objects failed authentication (they stay unreadable).",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for running serve processes to pick up the new key.",
)
def master_key_rotate(data_dir: Path, master_key: str | None, force: bool, wait_s: float) -> None:
    """Re-wrap every data key and re-seal every private key under a new master
    key, while serve keeps running. Safe to run again after a crash: it resumes."""
    from datetime import timedelta

    from testhide.controlplane import masterkey

    async def run_rotation() -> masterkey.RotationResult:
        async with operator_context(data_dir, master_key) as op:
            result = await masterkey.rotate(
                op.directory,
                op.store,
                op.master,
                force=force,
                holder_timeout=timedelta(seconds=wait_s),
                progress=lambda line: click.echo(line, err=True),
            )
            await op.auditor.record(
                "master_key_rotated",
                op.actor,
                target=result.new_key_id,
                retired=list(result.retired_key_ids),
                rewrapped=result.rewrapped,
                resealed_files=result.resealed_files,
                damaged=list(result.damaged),
                dropped=result.dropped,
                source=op.master.kind,
            )
            return result

    result = run(run_rotation())
    click.echo(
        f"master key {result.new_key_id} is current: {result.rewrapped} data keys re-wrapped, "
        f"{result.resealed_files} files re-sealed in {result.seconds:.1f}s",
        err=True,
    )
    for problem in result.damaged:
        click.echo(f"failed authentication: {problem}", err=True)
    if result.dropped:
        click.echo(f"retired key(s) {', '.join(result.retired_key_ids)} removed from the ring", err=True)
    elif not result.damaged:
        click.echo(
            f"nothing is sealed by {', '.join(result.retired_key_ids)} any more: set {MASTER_KEY_ENV} "
            f"to the new key alone and restart serve",
            err=True,
        )
    else:
        raise click.ClickException(
            f"{len(result.damaged)} stored object(s) failed authentication (tampered or damaged) and were "
            "left as they are; the old key stays in the ring so this rotation loses nothing. Restore them "
            "from a backup and run rotate again, or pass --force to drop the old key anyway."
        )


@master_key.command("status")
@data_dir_option
@master_key_option
def master_key_status(data_dir: Path, master_key: str | None) -> None:
    """The ring's key ids, what each seals, and which keys running serves hold."""
    from testhide.controlplane import masterkey

    async def run_status() -> list[str]:
        async with operator_context(data_dir, master_key) as op:
            counts = await masterkey.census(op.directory, op.store)
            source = op.master.describe()
            lines = [f"ring from {source}: {', '.join(op.master.key_ids)} (current {op.master.current_id})"]
            lines += [f"sealed by {kid}: {n}" for kid, n in sorted(counts.items())]
            return lines + masterkey.holders_summary(op.directory)

    for line in run(run_status()):
        click.echo(line)


@master_key.command("generate")
def master_key_generate() -> None:
    """Print a new random master key (base64), for rings kept in the environment."""
    click.echo(MasterKey.generate().serialise().strip())


@click.command("backup")
@data_dir_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The backup file to write (0600; replaced atomically).",
)
@master_key_option
def backup(data_dir: Path, out: Path, master_key: str | None) -> None:
    """Write an encrypted, consistent backup of the data dir while serve runs.
    The master key is not in it: keep it elsewhere, restoring needs it."""
    from testhide.controlplane.backup import BackupSummary, take_backup

    async def run_backup() -> BackupSummary:
        async with operator_context(data_dir, master_key) as op:
            return await take_backup(op.directory, op.master, op.store, op.auditor, out, op.actor)

    summary = run(run_backup())
    click.echo(
        f"backup {summary.backup_id} written to {out} ({summary.size} bytes, {summary.files} files, "
        f"sha256 {summary.sha256})",
        err=True,
    )
    if summary.wrapped_by is not None:
        click.echo(
            f"The key ring is in this backup only as wrapped by the HSM ({summary.wrapped_by}): restoring"
            " it needs that HSM key and its PIN.",
            err=True,
        )
        return
    click.echo(
        f"The master key is NOT in this backup. Restoring it needs master key {summary.master_key_id}: "
        f"keep a copy of {data_dir / 'master.key'} (or {MASTER_KEY_ENV}) somewhere other than the backup.",
        err=True,
    )


@click.command("restore")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The backup file.",
)
@data_dir_option
@click.option(
    "--master-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"The master key (ring) file, copied 0600 into the new data dir [default: {MASTER_KEY_ENV}].",
)
@click.option(
    "--master-key",
    metavar="pkcs11:URI|file:PATH",
    envvar="TESTHIDE_MASTER_KEY_URI",
    show_envvar=True,
    help="For a backup of a data dir whose ring an HSM wraps: the HSM key, which unwraps the ring the"
    " backup holds; the new data dir keeps it as keyring.pkcs11 [the key the backup names]."
    " file:PATH is --master-key-file.",
)
def restore(source: Path, data_dir: Path, master_key_file: Path | None, master_key: str | None) -> None:
    """Restore a backup into a new (absent or empty) data dir. A tampered or
    truncated backup is refused and leaves nothing behind."""
    from testhide.controlplane.backup import restore as restore_backup

    master, text = _restore_key(master_key_file, master_key)
    summary = run(restore_backup(source, data_dir, master, text, f"operator:{getpass.getuser()}"))
    click.echo(
        f"restored backup {summary.backup_id} (taken {summary.created_at}) into {data_dir}; "
        f"audit log intact ({summary.audit_entries} entries)",
        err=True,
    )
    if summary.wrapped_by is not None:
        click.echo(f"its key ring is wrapped by the HSM: {summary.wrapped_by}", err=True)
    elif text is None:
        click.echo(f"the data dir has no master.key: serve it with the same {MASTER_KEY_ENV}", err=True)


def _restore_key(
    master_key_file: Path | None, master_key: str | None
) -> tuple[MasterKey | hsm.Pkcs11Uri | None, str | None]:
    """The ring to restore with (an HSM key, or None: the one the backup names), and the
    key file's text to copy (None: environment or HSM)."""
    try:
        choice = hsm.master_key_choice(master_key)
        if choice is not None and master_key_file is not None:
            raise click.UsageError("give --master-key or --master-key-file, not both")
        if isinstance(choice, hsm.Pkcs11Uri):
            return choice, None
        master_key_file = choice or master_key_file
        if master_key_file is not None:
            text = read_key_file(master_key_file)
            return MasterKey.from_env_value(text, source=master_key_file), text
        if os.environ.get(MASTER_KEY_ENV):
            return MasterKey.from_env_value(os.environ[MASTER_KEY_ENV]), None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return None, None  # the backup's own HSM-wrapped ring, if it holds one
