"""The embedded SQLite backend. One connection on one thread: sqlite3 blocks,
so calls hop to that thread and the event loop never waits on disk.

``SqliteStore`` opens, migrates and closes the database and runs transactions;
the queries live in its parts, one module per area: ``sqlite_jobs`` (jobs, logs,
results, blobs, secrets, pool policies), ``sqlite_leases``, ``sqlite_agents``
(organisations, pools, enrollment tokens, agents) and ``sqlite_auth`` (API keys,
users, sessions, failed logins, audit). Key rotation and backup stay here: they
work on the database as a whole.

Opening a data dir's database never creates it (a new, empty one would lose
every job, agent and key without a word), and only ``serve`` and ``migrate``
change its schema; see ``SqliteStore.open``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from testhide.controlplane.errors import (
    DatabaseDamaged,
    DataDirError,
    StorageUnavailable,
    behind_schema,
    newer_schema,
)
from testhide.controlplane.store.base import WrappedDataKey
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.sqlite_agents import SqliteAgents
from testhide.controlplane.store.sqlite_auth import SqliteAuth
from testhide.controlplane.store.sqlite_incident import SqliteIncident
from testhide.controlplane.store.sqlite_job_files import SqliteJobFiles
from testhide.controlplane.store.sqlite_job_logs import SqliteJobLogs
from testhide.controlplane.store.sqlite_jobs import SqliteJobData
from testhide.controlplane.store.sqlite_leases import SqliteLeases
from testhide.controlplane.store.sqlite_mfa import SqliteMfa
from testhide.controlplane.store.sqlite_statements import SqliteStatements

T = TypeVar("T")


_BUSY, _LOCKED, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 10, 11, 13, 14, 26
KNOWN_VERSION = max(version for version, _ in MIGRATIONS)
RESTORE_HINT = "restore the newest backup: `testhide-controlplane restore --from BACKUP --data-dir NEWDIR`"

BeforeMigrating = Callable[[int, list[int]], Awaitable[None]]
"""Called with the schema version found and the versions about to be applied (the
pre-migration backup), only when some are missing."""


def _code(exc: sqlite3.DatabaseError) -> int:
    """SQLite's primary result code of ``exc`` (0 when it carries none)."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def storage_error(exc: sqlite3.DatabaseError) -> Exception:
    """Conditions an operator can clear, as a clear transient error; anything
    else as it is (a damaged file found after opening too: serve logs it with its
    traceback, and the operator's commands say it in one line, ``commands/common``)."""
    code = _code(exc)
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


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's "file is not a database" or "database disk image is malformed"."""
    return _code(exc) in (_CORRUPT, _NOTADB)


class SqliteStore(
    SqliteJobData,
    SqliteJobLogs,
    SqliteJobFiles,
    SqliteLeases,
    SqliteAgents,
    SqliteAuth,
    SqliteMfa,
    SqliteStatements,
    SqliteIncident,
):
    def __init__(self, path: Path, busy_timeout: timedelta = timedelta(seconds=10)) -> None:
        self._path = path
        self._busy_timeout_ms = int(busy_timeout.total_seconds() * 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        busy_timeout: timedelta = timedelta(seconds=10),
        *,
        migrate: bool = True,
        create: bool = True,
        require_current: bool = True,
    ) -> SqliteStore:
        """``busy_timeout``: how long a write waits for a lock another process holds.

        ``create``: a missing or empty file becomes a new database (``init``);
        otherwise it is refused, as is a file without a testhide schema, and
        ``path`` is never created (a data dir's store: a new database there
        would lose every job, agent and key). ``migrate``: bring the schema
        up to date (``serve``, ``migrate``); otherwise a schema that is behind
        is refused, unless ``require_current`` is false (``restore``, which
        leaves that to ``serve``). A schema newer than this program's is
        always refused. A file that is not a database, or is damaged, raises
        ``DatabaseDamaged``."""
        store = cls(path, busy_timeout)
        try:
            await store._run(store._connect, create)
            applied = await store._run(store._applied_versions)
            if applied is None:
                if not create:
                    raise DataDirError(f"the database {path} holds no testhide schema; {RESTORE_HINT}")
                applied = set()
            if applied and max(applied) > KNOWN_VERSION:
                raise newer_schema(f"the database {path}", max(applied), KNOWN_VERSION)
            if migrate:
                await store.migrate()
            elif require_current and _pending(applied):
                raise behind_schema(max(applied, default=0), KNOWN_VERSION)
        except BaseException:
            await store.close()
            raise
        return store

    def _connect(self, create: bool) -> None:
        if not create:
            self._refuse_missing()
        # A URI, so that mode=rw never creates the file (sqlite3.connect would).
        uri = f"{self._path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_timeout_ms / 1000,
            )
            self._conn = conn
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from exc

    def _refuse_missing(self) -> None:
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            raise DataDirError(f"the database {self._path} is missing; {RESTORE_HINT}") from None
        except OSError as exc:
            raise DataDirError(f"cannot open the database {self._path} ({exc.strerror or exc})") from exc
        if size == 0:
            raise DataDirError(f"the database {self._path} is empty (0 bytes); {RESTORE_HINT}")

    def _open_error(self, exc: sqlite3.DatabaseError) -> Exception:
        """What opening ``exc`` means for the operator, naming the file."""
        code = _code(exc)
        if is_damage(exc):
            return DatabaseDamaged(f"the database {self._path} is damaged ({exc}); {RESTORE_HINT}")
        if code in (_BUSY, _LOCKED, _FULL, _IOERR):
            return storage_error(exc)
        hint = ": is it this user's, and its directory writable?" if code == _CANTOPEN else ""
        return DataDirError(f"cannot open the database {self._path} ({exc}){hint}")

    def _applied_versions(self) -> set[int] | None:
        """The schema versions recorded; None for a database without a testhide schema."""
        conn = self._conn
        assert conn is not None
        try:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone():
                return None
            return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from exc

    async def migrate(self, before_applying: BeforeMigrating | None = None) -> list[int]:
        """Applies the missing schema versions in one transaction; returns them.
        ``before_applying`` runs first, only when some are missing."""
        applied = await self._run(self._applied_versions) or set()
        pending = _pending(applied)
        if not pending:
            return []
        if before_applying is not None:
            await before_applying(max(applied, default=0), pending)
        return await self._run(self._apply_missing)

    def _apply_missing(self) -> list[int]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
            )
            # Read again under the write lock: another process may have migrated meanwhile.
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            done = []
            for version, script in MIGRATIONS:
                if version in applied:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (version,))
                done.append(version)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return done

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.DatabaseError as exc:
            mapped = storage_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

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


def _pending(applied: set[int]) -> list[int]:
    return [version for version, _ in MIGRATIONS if version not in applied]


_DATA_KEY_OWNER = {
    "jobs": ("id",),
    "blobs": ("id",),
    "secrets": ("org", "name"),
    "mfa_factors": ("id",),
    "statement_keys": ("id",),
}
