"""Copying a SQLite store into an empty PostgreSQL one (``migrate-store``).

The SQLite file is read through a read-only connection inside one read
transaction: every table comes from the same instant and the file is never
written (no schema migration, no checkpoint). The rows go into PostgreSQL in
one transaction, table by table with parents before children, in batches
bounded by rows and by bytes, so logs and artifact chunks stream through
without being held in memory. Values keep their meaning: ISO-text timestamps
become ``timestamptz`` (a naive one is UTC), binary data stays the same bytes
(still encrypted under the same data keys, wrapped by the same master key:
nothing is re-encrypted), and the identity columns PostgreSQL adds (``rowid``,
``auth_failures.id``) are generated in SQLite's rowid order. The transaction
locks the target's tables, refuses them unless every one is empty, and compares
each table's row count with the snapshot's before it commits; any difference
rolls everything back.

A SQLite store of an older schema version copies as it is: each later version
only added tables and columns with defaults, which the PostgreSQL schema fills
in the same way."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from testhide.controlplane.auth.audit import AuditEntry
from testhide.controlplane.errors import ControlPlaneError, DataDirError, FailedPrecondition
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.pgdriver import PgConnection
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite_auth import SqliteAuth

T = TypeVar("T")

TABLES: tuple[str, ...] = (
    "orgs",
    "pools",
    "api_keys",
    "enrollment_tokens",
    "agents",
    "users",
    "refresh_tokens",
    "mfa_factors",
    "mfa_recovery_codes",
    "jobs",
    "job_transitions",
    "log_entries",
    "log_batches",
    "test_reports",
    "test_cases",
    "blobs",
    "blob_chunks",
    "statement_keys",
    "job_statements",
    "secrets",
    "auth_failures",
    "address_failures",
    "audit_log",
    "audit_head",
)
"""Every table of the SQLite schema, parents before children (foreign keys)."""

POSTGRES_ONLY = ("replicas", "roles", "shared_files", "rate_buckets", "auth_spikes")
"""Tables only PostgreSQL has (what replicas share and know of each other): nothing to copy, but
must be empty."""

BATCH_ROWS = 1000
BATCH_BYTES = 4 * 1024 * 1024

Progress = Callable[[str, int, int], None]
"""Called as ``progress(table, rows copied so far, rows in the table)`` after each batch."""


class SqliteSnapshot:
    """A SQLite store as it was at one instant, read-only, on one thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-snapshot")
        self._conn: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None
        self._data_version = 0

    @classmethod
    async def open(cls, path: Path) -> SqliteSnapshot:
        snapshot = cls(path)
        try:
            await asyncio.get_running_loop().run_in_executor(snapshot._executor, snapshot._connect)
        except BaseException:
            await snapshot.close()
            raise
        return snapshot

    def _connect(self) -> None:
        if not self._path.is_file():
            raise DataDirError(f"{self._path} does not exist: there is no SQLite store to copy")
        uri = f"{self._path.resolve().as_uri()}?mode=ro"
        try:
            self._watch = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._data_version = self._watch.execute("PRAGMA data_version").fetchone()[0]
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
        except sqlite3.DatabaseError as exc:
            raise DataDirError(f"cannot read the SQLite store {self._path}: {exc}") from exc
        self._conn = conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def written_since_opened(self) -> bool:
        """Whether another connection (any process) committed to the file after the snapshot began."""

        def run(_: sqlite3.Connection) -> bool:
            assert self._watch is not None
            return bool(self._watch.execute("PRAGMA data_version").fetchone()[0] != self._data_version)

        return await self._run(run)

    async def schema_version(self) -> int:
        def run(c: sqlite3.Connection) -> int:
            if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone():
                return 0
            return int(c.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])

        return await self._run(run)

    async def tables(self) -> list[str]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
                " AND name != 'schema_migrations' ORDER BY name"
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def columns(self, table: str) -> list[str]:
        rows = await self._run(lambda c: c.execute(f'PRAGMA table_info("{table}")').fetchall())
        return [str(r["name"]) for r in rows]

    async def count(self, table: str) -> int:
        return int(await self._run(lambda c: c.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]))  # noqa: S608

    async def batches(
        self, table: str, columns: tuple[str, ...]
    ) -> AsyncGenerator[list[tuple[Any, ...]], None]:
        """The table's rows in rowid order, at most BATCH_ROWS or about BATCH_BYTES at a time."""
        names = ", ".join(f'"{c}"' for c in columns)
        cursor = await self._run(
            lambda c: c.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid')  # noqa: S608
        )
        try:
            while batch := await self._run(lambda _: _take(cursor)):
                yield batch
        finally:
            await self._run(lambda _: cursor.close())

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        """The audit chain and head, read as the SQLite backend reads them."""
        return await _SnapshotAudit(self).read_audit()

    async def close(self) -> None:
        def run(_: sqlite3.Connection | None) -> None:
            for conn in (self._conn, self._watch):
                if conn is not None:
                    conn.close()
            self._conn = self._watch = None

        await asyncio.get_running_loop().run_in_executor(self._executor, run, None)
        self._executor.shutdown(wait=True)


def _take(cursor: sqlite3.Cursor) -> list[tuple[Any, ...]]:
    batch: list[tuple[Any, ...]] = []
    size = 0
    while len(batch) < BATCH_ROWS and size < BATCH_BYTES:
        row = cursor.fetchone()
        if row is None:
            break
        batch.append(tuple(row))
        size += sum(len(v) for v in row if isinstance(v, bytes | str))
    return batch


class _SnapshotAudit(SqliteAuth):
    """The SQLite backend's own audit reader, run inside the snapshot."""

    def __init__(self, snapshot: SqliteSnapshot) -> None:
        self._snapshot = snapshot

    async def _tx(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        if write:
            raise AssertionError("the snapshot is read-only")
        return await self._snapshot._run(fn)


# the target ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TablePlan:
    """How one table's rows go in: the columns both sides have, and how each value converts."""

    table: str
    columns: tuple[str, ...]
    converters: tuple[Callable[[Any], Any], ...]

    @property
    def insert_sql(self) -> str:
        names = ", ".join(f'"{c}"' for c in self.columns)
        values = ", ".join(f"${i}" for i in range(1, len(self.columns) + 1))
        return f'INSERT INTO "{self.table}" ({names}) VALUES ({values})'  # noqa: S608

    def convert(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            return tuple(f(v) for f, v in zip(self.converters, row, strict=True))
        except (TypeError, ValueError) as exc:
            raise FailedPrecondition(
                f"a row of {self.table} cannot be copied ({exc}); nothing was changed"
            ) from exc


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _integer(value: Any) -> int | None:
    return None if value is None else int(value)


def _real(value: Any) -> float | None:
    return None if value is None else float(value)


def _as_is(value: Any) -> Any:
    return value


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "timestamp with time zone": _timestamp,
    "bigint": _integer,
    "integer": _integer,
    "double precision": _real,
}


async def plan(snapshot: SqliteSnapshot, store: PgStore) -> list[TablePlan]:
    """What to copy; refuses a SQLite store with tables or columns PostgreSQL has no place for."""
    version, known = await snapshot.schema_version(), max(v for v, _ in MIGRATIONS)
    if version > known:
        raise FailedPrecondition(
            f"the SQLite store has schema version {version}, this testhide knows {known}: migrate it with"
            " the testhide that wrote it"
        )
    source_tables = await snapshot.tables()
    unknown = sorted(set(source_tables) - set(TABLES))
    if unknown:
        raise FailedPrecondition(
            f"the SQLite store has tables this testhide does not know: {', '.join(unknown)}"
        )
    target = await _target_columns(store)
    plans = []
    for table in (t for t in TABLES if t in source_tables):
        if table not in target:
            raise FailedPrecondition(f"the PostgreSQL schema has no table {table}; nothing was changed")
        columns = tuple(await snapshot.columns(table))
        missing = [c for c in columns if c not in target[table]]
        if missing:
            raise FailedPrecondition(
                f"the PostgreSQL schema has no column for {table}.{', '.join(missing)}; nothing was changed"
            )
        converters = tuple(_CONVERTERS.get(target[table][c], _as_is) for c in columns)
        plans.append(TablePlan(table, columns, converters))
    return plans


async def _target_columns(store: PgStore) -> dict[str, dict[str, str]]:
    """Each table's columns and their types; identity columns left out (PostgreSQL generates them)."""
    rows = await store._fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'NO'"
    )
    found: dict[str, dict[str, str]] = {}
    for r in rows:
        found.setdefault(str(r["table_name"]), {})[str(r["column_name"])] = str(r["data_type"])
    return found


async def copy_store(
    snapshot: SqliteSnapshot, store: PgStore, progress: Progress = lambda *_: None
) -> dict[str, int]:
    """Copy every table in one transaction; the row count of each, as copied and checked."""
    plans = await plan(snapshot, store)
    expected = {p.table: await snapshot.count(p.table) for p in plans}

    async def run(c: PgConnection) -> dict[str, int]:
        await _lock_and_refuse_unless_empty(c)
        counts = dict.fromkeys(TABLES, 0)
        for p in plans:
            async with aclosing(snapshot.batches(p.table, p.columns)) as batches:
                async for batch in batches:
                    await c.executemany(p.insert_sql, [p.convert(row) for row in batch])
                    counts[p.table] += len(batch)
                    progress(p.table, counts[p.table], expected[p.table])
            stored = int(await c.fetchval(f'SELECT count(*) FROM "{p.table}"'))  # noqa: S608
            if not stored == counts[p.table] == expected[p.table]:
                raise FailedPrecondition(
                    f"{p.table}: {expected[p.table]} rows in SQLite, {counts[p.table]} read,"
                    f" {stored} in PostgreSQL; rolled back, nothing was changed"
                )
        return counts

    try:
        return await store._tx(run)
    except ControlPlaneError:
        raise
    except Exception as exc:
        if getattr(exc, "sqlstate", None) is None:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FailedPrecondition(
            f"PostgreSQL refused the copy ({detail}); rolled back, nothing was changed"
        ) from exc


async def _existing(c: PgConnection, tables: tuple[str, ...]) -> list[str]:
    rows = await c.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
        list(tables),
    )
    names = {str(r["table_name"]) for r in rows}
    return [t for t in tables if t in names]


async def _lock_and_refuse_unless_empty(c: PgConnection) -> None:
    """Locked until commit, so that no control plane writes while the copy is made."""
    tables = await _existing(c, TABLES + POSTGRES_ONLY)
    await c.execute(f"LOCK TABLE {', '.join(tables)} IN SHARE ROW EXCLUSIVE MODE")
    holding = [t for t in tables if await c.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{t}")')]  # noqa: S608
    if holding:
        orgs = [str(r["name"]) for r in await c.fetch("SELECT name FROM orgs ORDER BY name LIMIT 5")]
        which = f"organisations {', '.join(orgs)}" if orgs else f"rows in {', '.join(holding)}"
        raise FailedPrecondition(
            f"the target database already holds testhide data ({which}); migrate-store copies into an"
            " empty database only. Nothing was changed."
        )


async def stored_counts(store: PgStore) -> dict[str, int]:
    """Each copied table's row count as the database has it now."""

    async def run(c: PgConnection) -> dict[str, int]:
        return {t: int(await c.fetchval(f'SELECT count(*) FROM "{t}"')) for t in TABLES}  # noqa: S608

    return await store._read(run)


async def empty_target(store: PgStore) -> None:
    """Undo a committed copy that failed verification: the database is left as found (empty)."""

    async def run(c: PgConnection) -> None:
        tables = await _existing(c, TABLES)
        await c.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")

    await store._tx(run)
