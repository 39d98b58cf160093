"""The control plane's database when it is not what this release expects: missing,
empty, damaged, migrated by a newer release, or behind this one. Every command
(`serve` too) refuses it with one line that names the file or the versions and
what to do, exits non-zero, prints no traceback and changes nothing. Only `serve`
and `migrate` bring a schema that is behind up to date, and each writes a backup
first: on SQLite the same encrypted backup `backup` writes (`restore` takes it
back, old schema and all), on PostgreSQL an encrypted `pg_dump` archive that
`decrypt-backup` writes out for `pg_restore`. Replicas migrating together write
one backup; without pg_dump nothing is migrated.

A data dir "behind" is one `init` made with the newest schema version held back:
the database the previous release leaves."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from testhide.controlplane.commands import migrate as migrate_command
from testhide.controlplane.datadir import DataDir, initialise
from testhide.controlplane.errors import FailedPrecondition
from testhide.controlplane.store import postgres, sqlite
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
from tests.harness import ControlPlaneProcess, free_port, operator, unavailable
from tests.integration.test_serve_failures import refusal
from tests.pg import fresh_database

KNOWN = MIGRATIONS[-1][0]
PREVIOUS = MIGRATIONS[-2][0]
PG_KNOWN = PG_MIGRATIONS[-1][0]
PG_PREVIOUS = PG_MIGRATIONS[-2][0]
RESTORE = "restore the newest backup: `testhide-controlplane restore --from BACKUP --data-dir NEWDIR`"
BEHIND = (
    "Error: the database schema is at version {found}, this testhide needs {known}: run"
    " `testhide-controlplane migrate` (it writes a backup first), or start serve"
)
STAMP = r"\d{8}T\d{6}Z"


async def init(path: Path, database_url: str | None = None) -> Path:
    await initialise(path, ["localhost", "127.0.0.1"], database_url=database_url)
    return path


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    return await init(tmp_path / "controlplane")


@pytest.fixture
async def behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite data dir whose schema lacks the newest version."""
    with monkeypatch.context() as held_back:
        held_back.setattr(sqlite, "MIGRATIONS", MIGRATIONS[:-1])
        held_back.setattr(sqlite, "KNOWN_VERSION", PREVIOUS)
        path = await init(tmp_path / "controlplane")
    assert schema_version(path / "testhide.db") == PREVIOUS
    return path


@pytest.fixture
async def pg_behind(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PostgreSQL data dir whose schema lacks the newest version."""
    with monkeypatch.context() as held_back:
        held_back.setattr(postgres, "PG_MIGRATIONS", PG_MIGRATIONS[:-1])
        path = await init(tmp_path / "controlplane", pg_url)
    assert await pg_schema_version(pg_url) == PG_PREVIOUS
    return path


def schema_version(db: Path) -> int:
    with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])


async def pg_schema_version(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT max(version) FROM schema_migrations"))
    finally:
        await conn.close()


async def refused(*args: str) -> str:
    code, _, err = await operator(*args)
    return refusal(code, err)


def serve_args(data_dir: Path) -> list[str]:
    return ["serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"]


async def audit_entries(data_dir: Path) -> list[dict[str, Any]]:
    code, out, err = await operator("audit", "export", "--data-dir", str(data_dir))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def database_files(data_dir: Path) -> list[str]:
    """testhide.db and its -wal, -shm or -journal, if any."""
    return files_in(data_dir, "testhide.db*")


def files_in(directory: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.glob(pattern))


def pg_tool(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None
    )
    if found is None:
        unavailable(f"{name} is not installed (postgresql-client)")
    return found


# ------------------------------------------------------------------ the file itself


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("garbage", "file is not a database"), ("truncated", "database disk image is malformed")],
)
async def test_a_damaged_database_is_refused_by_serve_and_by_operator_commands(
    data_dir: Path, damage: str, reason: str
) -> None:
    db = data_dir / "testhide.db"
    if damage == "garbage":
        with db.open("r+b") as file:
            file.write(b"this is not a SQLite file at all " * 100)
    else:
        os.truncate(db, db.stat().st_size // 2)
    damaged = db.read_bytes()
    expected = f"Error: the database {db} is damaged ({reason}); {RESTORE}"
    assert await refused(*serve_args(data_dir)) == expected
    assert await refused("agents", "list", "--data-dir", str(data_dir)) == expected
    assert await refused("migrate", "--data-dir", str(data_dir)) == expected
    assert db.read_bytes() == damaged


async def test_damage_found_after_opening_is_one_line_too(data_dir: Path) -> None:
    """Opening reads the header and the schema; a damaged page further in shows when it is read."""
    db = data_dir / "testhide.db"
    with closing(sqlite3.connect(db)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'agents'").fetchone()
    with db.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xee" * page_size)
    code, _, err = await operator("audit", "verify", "--data-dir", str(data_dir))  # agents not read
    assert code == 0, err
    expected = f"Error: the control plane's database is damaged (database disk image is malformed); {RESTORE}"
    assert await refused("agents", "list", "--data-dir", str(data_dir)) == expected


@pytest.mark.parametrize("state", ["missing", "empty"])
async def test_a_missing_or_empty_database_is_refused_never_made_anew(data_dir: Path, state: str) -> None:
    db = data_dir / "testhide.db"
    if state == "missing":
        db.unlink()
    else:
        db.write_bytes(b"")
    described = "is missing" if state == "missing" else "is empty (0 bytes)"
    expected = f"Error: the database {db} {described}; {RESTORE}"
    for args in (
        serve_args(data_dir),
        ["agents", "list", "--data-dir", str(data_dir)],
        ["audit", "verify", "--data-dir", str(data_dir)],
        ["migrate", "--data-dir", str(data_dir)],
    ):
        assert await refused(*args) == expected, args
    assert database_files(data_dir) == ([] if state == "missing" else ["testhide.db"])
    assert state == "missing" or db.stat().st_size == 0


async def test_a_database_migrated_by_a_newer_release_is_refused(data_dir: Path) -> None:
    db = data_dir / "testhide.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (KNOWN + 1,))
    expected = (
        f"Error: the database {db} was migrated by a newer testhide (schema {KNOWN + 1}, this one knows"
        f" {KNOWN}): run that version, or restore a backup made before the upgrade"
    )
    for args in (serve_args(data_dir), ["agents", "list", "--data-dir", str(data_dir)]):
        assert await refused(*args) == expected, args
    assert await refused("migrate", "--data-dir", str(data_dir)) == expected
    assert schema_version(db) == KNOWN + 1
    assert not (data_dir / "backups").exists()


# ------------------------------------------------------------------ a schema behind this release


async def test_a_schema_behind_is_refused_by_other_commands_and_left_as_it_is(behind: Path) -> None:
    expected = BEHIND.format(found=PREVIOUS, known=KNOWN)
    assert await refused("agents", "list", "--data-dir", str(behind)) == expected
    assert await refused("audit", "verify", "--data-dir", str(behind)) == expected
    code, out, _ = await operator("doctor", "--data-dir", str(behind), "--listen", "127.0.0.1:0")
    assert code == 1
    store = next(line for line in out.splitlines() if "  store: " in line)
    assert store.startswith("FAIL  store: "), store
    assert f"schema {PREVIOUS} is behind" in store
    assert "fix: testhide-controlplane migrate (it writes a backup first), or start serve" in store
    assert schema_version(behind / "testhide.db") == PREVIOUS
    assert not (behind / "backups").exists()


async def test_migrate_backs_up_first_and_the_backup_restores_the_old_schema(
    behind: Path, tmp_path: Path
) -> None:
    code, _, err = await operator("migrate", "--data-dir", str(behind))
    assert code == 0, err
    backups = behind / "backups"
    (backup,) = backups.iterdir()
    assert re.fullmatch(rf"pre-migrate-schema-{PREVIOUS}-to-{KNOWN}-{STAMP}\.thb", backup.name), backup.name
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert err.splitlines() == [
        f"backup of schema {PREVIOUS} written to {backup}",
        f"applied schema version(s) {KNOWN}: the schema is at version {KNOWN} (was {PREVIOUS});"
        " schema_migrated recorded in the audit log",
    ]
    assert schema_version(behind / "testhide.db") == KNOWN
    last = (await audit_entries(behind))[-1]
    assert last["action"] == "schema_migrated"
    assert last["details"] == {
        "from_version": PREVIOUS,
        "to_version": KNOWN,
        "applied": [KNOWN],
        "backup": str(backup),
    }
    code, _, err = await operator("agents", "list", "--data-dir", str(behind))
    assert code == 0, err

    code, _, err = await operator("migrate", "--data-dir", str(behind))  # once more: nothing to do
    assert (code, err.strip()) == (0, f"schema is current (version {KNOWN}); nothing to do")
    assert list(backups.iterdir()) == [backup]

    restored = tmp_path / "restored"
    code, _, err = await operator(
        "restore",
        "--from",
        str(backup),
        "--data-dir",
        str(restored),
        "--master-key-file",
        str(behind / "master.key"),
    )
    assert code == 0, err
    assert schema_version(restored / "testhide.db") == PREVIOUS  # restored as it was, not migrated
    expected = BEHIND.format(found=PREVIOUS, known=KNOWN)
    assert await refused("agents", "list", "--data-dir", str(restored)) == expected
    elsewhere = tmp_path / "elsewhere"
    code, _, err = await operator("migrate", "--data-dir", str(restored), "--backup-dir", str(elsewhere))
    assert code == 0, err
    assert [p.name.startswith("pre-migrate-") for p in elsewhere.iterdir()] == [True]
    assert not (restored / "backups").exists()
    assert schema_version(restored / "testhide.db") == KNOWN


async def test_serve_backs_up_then_migrates_a_schema_behind(behind: Path) -> None:
    served = ControlPlaneProcess(behind, free_port(), free_port())
    await served.start()
    try:
        (backup,) = (behind / "backups").iterdir()
        assert re.fullmatch(rf"pre-migrate-schema-{PREVIOUS}-to-{KNOWN}-{STAMP}\.thb", backup.name), (
            backup.name
        )
        assert schema_version(behind / "testhide.db") == KNOWN
    finally:
        assert await served.terminate() == 0
    logged = [line for line in served.log_path.read_text().splitlines() if "schema_migrated" in line]
    assert len(logged) == 1, logged
    assert str(backup) in logged[0]
    assert f"from_version={PREVIOUS}" in logged[0]
    assert (await audit_entries(behind))[-1]["action"] == "schema_migrated"

    await served.start()  # again: nothing pending, no second backup
    assert await served.terminate() == 0
    assert list((behind / "backups").iterdir()) == [backup]


async def test_serve_writes_its_pre_migration_backup_into_its_backup_dir(
    behind: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offsite = tmp_path / "offsite"
    monkeypatch.setenv("TESTHIDE_BACKUP_DIR", str(offsite))  # serve's --backup-dir, as its unit would set it
    served = ControlPlaneProcess(behind, free_port(), free_port())
    await served.start()
    assert await served.terminate() == 0
    (backup,) = offsite.iterdir()
    assert backup.name.startswith(f"pre-migrate-schema-{PREVIOUS}-to-{KNOWN}-"), backup.name
    assert not (behind / "backups").exists()


# ------------------------------------------------------------------ PostgreSQL: pg_dump first


async def test_migrate_on_postgres_writes_an_encrypted_pg_dump_first(
    pg_behind: Path, pg_url: str, tmp_path: Path
) -> None:
    pg_restore = pg_tool("pg_restore")
    code, _, err = await operator("migrate", "--data-dir", str(pg_behind))
    assert code == 0, err
    (backup,) = (pg_behind / "backups").iterdir()
    pattern = rf"pre-migrate-schema-{PG_PREVIOUS}-to-{PG_KNOWN}-{STAMP}\.pgdump\.thb"
    assert re.fullmatch(pattern, backup.name), backup.name
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert backup.read_bytes().startswith(b"THBACKUP1\n")  # encrypted, not pg_dump's own format
    assert await pg_schema_version(pg_url) == PG_KNOWN
    assert (await audit_entries(pg_behind))[-1]["details"]["backup"] == str(backup)

    dump = tmp_path / "before.pgdump"
    code, _, err = await operator(
        "decrypt-backup", "--from", str(backup), "--out", str(dump), "--data-dir", str(pg_behind)
    )
    assert code == 0, err
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    listed = await asyncio.to_thread(
        subprocess.run, [pg_restore, "--list", str(dump)], capture_output=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert b"schema_migrations" in listed.stdout

    async with fresh_database() as other:  # the archive holds the database as it was before
        target, env = migrate_command.pg_dump_target(other)
        restored = await asyncio.to_thread(
            subprocess.run,
            [pg_restore, "--no-owner", "--exit-on-error", f"--dbname={target}", str(dump)],
            env=env,
            capture_output=True,
            check=False,
        )
        assert restored.returncode == 0, restored.stderr
        assert await pg_schema_version(other) == PG_PREVIOUS

    line = await refused(
        "restore",
        "--from",
        str(backup),
        "--data-dir",
        str(tmp_path / "nope"),
        "--master-key-file",
        str(pg_behind / "master.key"),
    )
    assert "a pre-migration backup of PostgreSQL (*.pgdump.thb) is a pg_dump archive" in line
    assert not (tmp_path / "nope").exists()


async def test_postgres_replicas_migrating_together_write_one_backup(pg_behind: Path, tmp_path: Path) -> None:
    directory = DataDir(pg_behind)
    master = directory.master_key()
    stores = [await directory.open_store(migrate=False, require_current=False) for _ in range(2)]
    try:
        migrations = await asyncio.gather(
            *(
                migrate_command.migrate_schema(
                    directory, master, store, tmp_path / f"backups-{n}", f"replica-{n}"
                )
                for n, store in enumerate(stores)
            )
        )
    finally:
        for store in stores:
            await store.close()
    assert sorted(m is None for m in migrations) == [False, True], migrations
    written = files_in(tmp_path, "backups-*/*")
    assert len(written) == 1, written
    assert next(m for m in migrations if m is not None).backup == tmp_path / written[0]
    store = await directory.open_store()  # current now: opens without migrating
    await store.close()


async def test_without_pg_dump_postgres_is_not_migrated(
    pg_behind: Path, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    monkeypatch.setattr(migrate_command, "PG_DUMP_FALLBACK", str(tmp_path / "no-tools" / "*" / "pg_dump"))
    directory = DataDir(pg_behind)
    store = await directory.open_store(migrate=False, require_current=False)
    try:
        with pytest.raises(FailedPrecondition, match=r"pg_dump is not installed.*install postgresql-client"):
            await migrate_command.migrate_schema(
                directory, directory.master_key(), store, tmp_path / "b", "t"
            )
    finally:
        await store.close()
    assert await pg_schema_version(pg_url) == PG_PREVIOUS
    assert not (tmp_path / "b").exists()


async def test_a_postgres_schema_behind_is_refused_by_other_commands(pg_behind: Path, pg_url: str) -> None:
    expected = BEHIND.format(found=PG_PREVIOUS, known=PG_KNOWN)
    assert await refused("agents", "list", "--data-dir", str(pg_behind)) == expected
    assert await pg_schema_version(pg_url) == PG_PREVIOUS
