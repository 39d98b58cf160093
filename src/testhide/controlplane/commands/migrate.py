"""``testhide-controlplane migrate``: bring the store's schema up to date, a
backup first; and ``decrypt-backup``, to take such a backup out again.

Only ``serve`` (as it starts) and ``migrate`` change the schema; every other
command opens the store as it is and refuses one that is behind. Both write a
backup before they apply anything, and only when something is pending, into
BACKUP_DIR (DATA_DIR/backups unless given, created 0700; serve: its --backup-dir):

- SQLite: ``pre-migrate-schema-7-to-8-20300102T030405Z.thb``, the same
  encrypted backup ``backup`` writes; ``restore`` takes it back, old schema
  and all (``serve`` or ``migrate`` bring it up to date again).
- PostgreSQL: ``pre-migrate-schema-4-to-5-20300102T030405Z.pgdump.thb``:
  ``pg_dump --format=custom`` (postgresql-client) piped through the same
  encryption under the master key; ``decrypt-backup`` writes the archive out
  for ``pg_restore``. pg_dump gets the password in PGPASSWORD, never on its
  command line. Replicas that start together take turns on a lock of
  ``schema_migrations`` that pg_dump's reads pass (``PgStore.migrate``): the
  first backs up and migrates, the others then find nothing pending and
  write no backup.

``schema_migrated`` goes into the audit log with both versions and the backup."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import click

from testhide.common.files import atomic_file
from testhide.controlplane import backupfile
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey, read_key_file
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.backup import create_backup
from testhide.controlplane.commands.common import data_dir_option, run
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import ConfigError, ControlPlaneError, FailedPrecondition
from testhide.controlplane.operator import operator_context
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
from testhide.controlplane.store.pgdriver import split_url
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore

PG_DUMP_FALLBACK = "/usr/lib/postgresql/*/bin/pg_dump"
"""Debian's versioned client tools, for a host without the pg_dump wrapper on PATH."""


@dataclass(frozen=True)
class SchemaMigration:
    from_version: int
    to_version: int
    applied: tuple[int, ...]
    backup: Path
    """The backup written before anything was applied."""


def backup_name(found: int, target: int, now: datetime, postgres: bool) -> str:
    kind = ".pgdump" if postgres else ""
    return f"pre-migrate-schema-{found}-to-{target}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}{kind}.thb"


def known_version(store: Store) -> int:
    return max(v for v, _ in (PG_MIGRATIONS if isinstance(store, PgStore) else MIGRATIONS))


async def migrate_schema(
    directory: DataDir, master: MasterKey, store: Store, backup_dir: Path, actor: str
) -> SchemaMigration | None:
    """Back ``store`` up into ``backup_dir`` and apply the pending schema
    versions; None when none were pending (then nothing is written)."""
    if not isinstance(store, SqliteStore | PgStore):
        raise TypeError(f"cannot migrate a {type(store).__name__}")
    before: list[tuple[int, Path]] = []

    async def back_up(found: int, pending: list[int]) -> None:
        program = pg_dump_program() if isinstance(store, PgStore) else ""  # refused before anything is made
        out = backup_dir / backup_name(found, pending[-1], datetime.now(UTC), isinstance(store, PgStore))
        try:
            await asyncio.to_thread(backup_dir.mkdir, 0o700, True, True)
            if isinstance(store, PgStore):
                await pg_dump_backup(program, directory.database_url(), master, out)
            else:
                await create_backup(directory, master, store, out)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot write the backup taken before migrating to {out} ({exc.strerror or exc}); the schema"
                " was not migrated: make room there or make it writable (migrate: or give --backup-dir)"
            ) from exc
        before.append((found, out))

    try:
        applied = await store.migrate(back_up)
    except Exception as exc:
        if not before:
            raise  # nothing pending, or the backup itself failed: it says why
        raise FailedPrecondition(
            f"migrating the schema from version {before[-1][0]} failed ({exc}); nothing was applied."
            f" The backup written before it: {before[-1][1]}"
        ) from exc
    if not applied:
        return None  # another process migrated between our look and our turn
    found, backup = before[-1]
    migration = SchemaMigration(found, max(applied), tuple(applied), backup)
    auditor = Auditor(store, await directory.audit_key(master, store))
    await auditor.record(
        "schema_migrated",
        actor,
        target=f"schema {migration.to_version}",
        from_version=migration.from_version,
        to_version=migration.to_version,
        applied=list(migration.applied),
        backup=str(backup),
    )
    return migration


# ---------------------------------------------------------------- PostgreSQL: pg_dump


def pg_dump_program() -> str:
    """pg_dump on PATH, else the newest of Debian's versioned ones."""
    found = shutil.which("pg_dump")
    if found:
        return found
    versioned = sorted(glob.glob(PG_DUMP_FALLBACK), key=_major_version)
    if versioned:
        return versioned[-1]
    raise FailedPrecondition(
        "pg_dump is not installed, and the schema is migrated only after a backup: install"
        " postgresql-client (Debian: apt-get install postgresql-client), then run this again"
    )


def _major_version(program: str) -> tuple[int, ...]:
    version = Path(program).parts[-3]  # /usr/lib/postgresql/15/bin/pg_dump
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def pg_dump_target(url: str) -> tuple[str, dict[str, str]]:
    """The URL pg_dump connects to, without its password (argv is public on a
    host), and the environment that carries the password instead."""
    dsn, _driver = split_url(url)
    parts = urlsplit(dsn)
    env = dict(os.environ)
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}@{hostport}" if at else hostport
    return urlunsplit(parts._replace(netloc=netloc)), env


async def pg_dump_backup(program: str, url: str, master: MasterKey, out: Path) -> None:
    """``pg_dump --format=custom`` (``program``) of the database at ``url``, encrypted into ``out`` (0600)."""
    target, env = pg_dump_target(url)
    await asyncio.to_thread(
        _dump, [program, "--format=custom", "--no-password", f"--dbname={target}"], env, master, out
    )


def _dump(argv: list[str], env: dict[str, str], master: MasterKey, out: Path) -> None:
    with tempfile.TemporaryFile() as errors, atomic_file(out, 0o600) as handle:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, env=env
        )
        assert process.stdout is not None
        try:
            writer = backupfile.BackupWriter(handle, master)
            with process.stdout:
                while chunk := process.stdout.read(backupfile.CHUNK):
                    writer.write(chunk)
        except BaseException:
            process.kill()  # we stopped reading (a full disk): it would wait on the pipe forever
            process.wait()
            raise
        code = process.wait()
        if code != 0:
            errors.seek(0)
            said = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
            raise FailedPrecondition(
                f"pg_dump failed (exit status {code}: {said[-1] if said else 'no message'});"
                " the schema was not migrated"
            )
        writer.close()


# ---------------------------------------------------------------- commands


@click.command("migrate")
@data_dir_option
@click.option(
    "--backup-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the backup taken first goes [DATA_DIR/backups].",
)
def migrate(data_dir: Path, backup_dir: Path | None) -> None:
    """Bring the store's schema up to date after an upgrade, writing a backup
    first (SQLite: restore it with restore; PostgreSQL: a pg_dump archive, see
    decrypt-backup). serve does the same as it starts; every other command
    refuses a schema that is behind."""

    async def run_migration() -> tuple[SchemaMigration | None, int]:
        async with operator_context(data_dir, require_current=False) as op:
            target = backup_dir or op.directory.backups_path
            migration = await migrate_schema(op.directory, op.master, op.store, target, op.actor)
            return migration, known_version(op.store)

    migration, version = run(run_migration())
    if migration is None:
        click.echo(f"schema is current (version {version}); nothing to do", err=True)
        return
    click.echo(f"backup of schema {migration.from_version} written to {migration.backup}", err=True)
    applied = ", ".join(map(str, migration.applied))
    click.echo(
        f"applied schema version(s) {applied}: the schema is at version {migration.to_version}"
        f" (was {migration.from_version}); schema_migrated recorded in the audit log",
        err=True,
    )


@click.command("decrypt-backup")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The backup file (.thb).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The plaintext to write (0600; refused if it exists).",
)
@click.option(
    "--master-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"The master key (ring) file [default: --data-dir's key, else {MASTER_KEY_ENV}].",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar="TESTHIDE_DATA_DIR",
    help="Decrypt with this data dir's master key.",
)
def decrypt_backup(source: Path, out: Path, master_key_file: Path | None, data_dir: Path | None) -> None:
    """Authenticate a backup and write its plaintext: for a pre-migration backup
    of PostgreSQL (*.pgdump.thb), the pg_dump archive to give pg_restore; for
    any other, the data dir's tar (restore does that for you). Nothing is
    written unless the whole backup authenticates."""
    if out.exists():
        raise click.ClickException(f"{out} exists; give a new file with --out")
    master = _decryption_key(master_key_file, data_dir)

    def decrypt() -> backupfile.BackupHeader:
        with open(source, "rb") as src, atomic_file(out, 0o600) as dest:
            return backupfile.decrypt(src, master, dest)

    try:
        header = asyncio.run(asyncio.to_thread(decrypt))
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc
    size = out.stat().st_size
    click.echo(
        f"backup {header.backup_id} (taken {header.created_at.isoformat()}) decrypted to {out}", err=True
    )
    if source.name.endswith(".pgdump.thb"):
        click.echo(f"a pg_dump archive ({size} bytes): pg_restore --list {out} shows it", err=True)


def _decryption_key(master_key_file: Path | None, data_dir: Path | None) -> MasterKey:
    try:
        if master_key_file is not None:
            return MasterKey.from_env_value(read_key_file(master_key_file), source=master_key_file)
        if data_dir is not None:
            return DataDir(data_dir).master_key()
        if os.environ.get(MASTER_KEY_ENV):
            return MasterKey.from_env_value(os.environ[MASTER_KEY_ENV])
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    raise click.ClickException(f"give the master key with --master-key-file, --data-dir or {MASTER_KEY_ENV}")
