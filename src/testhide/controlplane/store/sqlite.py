"""The embedded SQLite backend. One connection on one thread: sqlite3 blocks,
so calls hop to that thread and the event loop never waits on disk.

``SqliteStore`` opens, migrates and closes the database and runs transactions;
the queries live in its parts, one module per area: ``sqlite_jobs`` (jobs, logs,
results, blobs, secrets, pool policies), ``sqlite_leases``, ``sqlite_agents``
(organisations, pools, enrollment tokens, agents) and ``sqlite_auth`` (API keys,
users, sessions, failed logins, audit). Key rotation and backup stay here: they
work on the database as a whole."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from testhide.controlplane.errors import StorageUnavailable
from testhide.controlplane.store.base import WrappedDataKey
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.sqlite_agents import SqliteAgents
from testhide.controlplane.store.sqlite_auth import SqliteAuth
from testhide.controlplane.store.sqlite_jobs import SqliteJobData
from testhide.controlplane.store.sqlite_leases import SqliteLeases

T = TypeVar("T")


_BUSY, _LOCKED, _IOERR, _FULL = 5, 6, 10, 13


def storage_error(exc: sqlite3.OperationalError) -> Exception:
    """Conditions an operator can clear, as a clear transient error; anything else as it is."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (_BUSY, _LOCKED):
        return StorageUnavailable(
            "the control plane's database is locked by another process; nothing was changed, try again"
        )
    if code == _FULL:
        return StorageUnavailable(
            "the control plane's disk is full; nothing was changed, writes resume once space is freed"
        )
    if code == _IOERR:
        return StorageUnavailable(
            f"the control plane's disk failed a read or write ({exc}); nothing was changed"
        )
    return exc


class SqliteStore(SqliteJobData, SqliteLeases, SqliteAgents, SqliteAuth):
    def __init__(self, path: Path, busy_timeout: timedelta = timedelta(seconds=10)) -> None:
        self._path = path
        self._busy_timeout_ms = int(busy_timeout.total_seconds() * 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, busy_timeout: timedelta = timedelta(seconds=10)) -> SqliteStore:
        """``busy_timeout``: how long a write waits for a lock another process holds."""
        store = cls(path, busy_timeout)
        await store._run(store._connect)
        return store

    def _connect(self, _: sqlite3.Connection | None = None) -> None:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout_ms / 1000
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        self._conn = conn
        self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, script in MIGRATIONS:
            if version in applied:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise storage_error(exc) from exc

    async def _tx(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """``fn`` in one transaction. Reads take a snapshot only (WAL), so they
        go on while another process holds the write lock or the disk is full."""

        def run() -> T:
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (disk full): SQLite leaves the transaction open.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self._run(run)

    async def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        def run() -> list[sqlite3.Row]:
            assert self._conn is not None
            return self._conn.execute(sql, args).fetchall()

        return await self._run(run)

    async def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(run)
        self._executor.shutdown(wait=True)

    # master-key rotation and backup ------------------------------------------------
    async def data_keys(self, table: str, after_rowid: int, limit: int) -> list[WrappedDataKey]:
        owner = _DATA_KEY_OWNER[table]
        rows = await self._query(
            # Table and columns are keys and values of the constant _DATA_KEY_OWNER (KeyError otherwise).
            f"SELECT rowid, {', '.join(owner)}, data_key FROM {table}"  # noqa: S608
            " WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after_rowid, limit),
        )
        return [
            WrappedDataKey(table, r["rowid"], tuple(r[c] for c in owner), bytes(r["data_key"])) for r in rows
        ]

    async def replace_data_keys(self, table: str, updates: list[tuple[int, bytes, bytes]]) -> int:
        _DATA_KEY_OWNER[table]  # only known tables reach the SQL below

        def run(c: sqlite3.Connection) -> int:
            return sum(
                c.execute(
                    f"UPDATE {table} SET data_key = ? WHERE rowid = ? AND data_key = ?",  # noqa: S608
                    (new, rowid, old),
                ).rowcount
                for rowid, old, new in updates
            )

        return await self._tx(run)

    async def snapshot(self, dest: Path) -> None:
        def run() -> None:
            assert self._conn is not None
            target = sqlite3.connect(dest)
            try:
                self._conn.backup(target)
            finally:
                target.close()

        await self._run(run)

    async def integrity_problems(self) -> list[str]:
        rows = await self._query("PRAGMA integrity_check")
        return [str(r[0]) for r in rows if r[0] != "ok"]


_DATA_KEY_OWNER = {"jobs": ("id",), "blobs": ("id",), "secrets": ("org", "name")}
