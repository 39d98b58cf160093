"""The PostgreSQL backend, for several control planes on one database.

``PgStore`` opens a connection pool (``pgdriver``), migrates the schema
(``pg_migrations``) once across replicas starting together, and runs
transactions; the queries live in its parts, one module per area, as in the
SQLite backend: ``pg_jobs`` (jobs, logs, results, blobs, secrets, pool
policies), ``pg_leases``, ``pg_agents`` (organisations, pools, enrollment
tokens, agents), ``pg_auth`` (API keys, users, sessions, failed logins,
audit), ``pg_cluster`` (what replicas know of each other and the data dir's
shared files) and ``pg_limits`` (rate limits and failed-login spikes shared
by the replicas). Logs, workspaces and artifacts are rows of encrypted
chunks, so the replicas share nothing but the database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from testhide.controlplane.errors import FailedPrecondition, behind_schema, newer_schema
from testhide.controlplane.store.base import WrappedDataKey
from testhide.controlplane.store.pg_agents import PgAgents
from testhide.controlplane.store.pg_auth import PgAuth
from testhide.controlplane.store.pg_cluster import PgCluster
from testhide.controlplane.store.pg_incident import PgIncident
from testhide.controlplane.store.pg_job_files import PgJobFiles
from testhide.controlplane.store.pg_job_logs import PgJobLogs
from testhide.controlplane.store.pg_jobs import PgJobData
from testhide.controlplane.store.pg_leases import PgLeases
from testhide.controlplane.store.pg_limits import PgLimits
from testhide.controlplane.store.pg_mfa import PgMfa
from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
from testhide.controlplane.store.pg_statements import PgStatements
from testhide.controlplane.store.pgdriver import (
    PgConnection,
    PgDriver,
    Row,
    connect,
    in_transaction,
    unavailable,
    with_connection,
)

T = TypeVar("T")

BeforeMigrating = Callable[[int, list[int]], Awaitable[None]]
"""Called with the schema version found and the versions about to be applied (the
pre-migration backup), only when some are missing."""


class PgStore(
    PgJobData,
    PgJobLogs,
    PgJobFiles,
    PgLeases,
    PgAgents,
    PgAuth,
    PgMfa,
    PgStatements,
    PgCluster,
    PgLimits,
    PgIncident,
):
    def __init__(self, driver: PgDriver) -> None:
        self._driver = driver

    @property
    def driver(self) -> str:
        return self._driver.name

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = 10, migrate: bool = True, require_current: bool = True
    ) -> PgStore:
        """Connects (``url``: ``postgresql://…``, ``?driver=psycopg`` to use psycopg 3)
        and brings the schema up to date unless ``migrate`` is false; then a schema
        that is behind is refused unless ``require_current`` is false too."""
        driver = await connect(url, min_size=1, max_size=pool_size)
        store = cls(driver)
        try:
            if migrate:
                await store.migrate()
            else:
                await store.check_schema(require_current)
        except BaseException:
            await driver.close()
            raise
        return store

    async def migrate(self, before_applying: BeforeMigrating | None = None) -> list[int]:
        """Applies the missing schema versions in one transaction; returns them.
        ``before_applying`` runs first, only when some are missing (the
        pre-migration backup). The table lock serialises replicas that start
        together (no advisory lock: connection poolers in transaction mode break
        those); it is one that pg_dump's reads pass, so the first replica backs up
        and migrates while the others wait, then find nothing to do."""

        async def run(c: PgConnection) -> list[int]:
            await c.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            await c.execute("LOCK TABLE schema_migrations IN SHARE ROW EXCLUSIVE MODE")
            applied = {r["version"] for r in await c.fetch("SELECT version FROM schema_migrations")}
            _refuse_newer(applied)
            pending = [v for v, _ in PG_MIGRATIONS if v not in applied]
            if pending and before_applying is not None:
                await before_applying(max(applied, default=0), pending)
            done = []
            for version, script in PG_MIGRATIONS:
                if version in applied:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    await c.execute(statement)
                await c.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                done.append(version)
            return done

        try:
            return await self._tx(run)
        except Exception as exc:
            # Two replicas creating schema_migrations at the same instant: one loses on pg_type's
            # unique index; by now the table exists and the lock orders the rest.
            if getattr(exc, "sqlstate", "") == "23505":
                return await self._tx(run)
            raise

    async def check_schema(self, require_current: bool = True) -> None:
        """Refuses a database this version does not know (newer, or never
        initialised), and one that is behind unless ``require_current`` is false."""
        exists = await self._read(lambda c: c.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"))
        if not exists:
            raise FailedPrecondition("the database has no testhide schema; run `testhide-controlplane init`")
        rows = await self._fetch("SELECT version FROM schema_migrations")
        applied = {r["version"] for r in rows}
        _refuse_newer(applied)
        if require_current and any(v not in applied for v, _ in PG_MIGRATIONS):
            raise behind_schema(max(applied, default=0), max(v for v, _ in PG_MIGRATIONS))

    async def _tx(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
        return await in_transaction(self._driver, fn)

    async def _read(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
        return await with_connection(self._driver, fn)

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._read(lambda c: c.fetch(sql, *args))

    async def close(self) -> None:
        try:
            await self._driver.close()
        except Exception as exc:
            if unavailable(exc) is None:
                raise

    # master-key rotation and backup ------------------------------------------------
    async def data_keys(self, table: str, after_rowid: int, limit: int) -> list[WrappedDataKey]:
        owner = _DATA_KEY_OWNER[table]
        rows = await self._fetch(
            # Table and columns are keys and values of the constant _DATA_KEY_OWNER (KeyError otherwise).
            f"SELECT rowid, {', '.join(owner)}, data_key FROM {table}"  # noqa: S608
            " WHERE rowid > $1 ORDER BY rowid LIMIT $2",
            after_rowid,
            limit,
        )
        return [
            WrappedDataKey(table, r["rowid"], tuple(r[c] for c in owner), bytes(r["data_key"])) for r in rows
        ]

    async def replace_data_keys(self, table: str, updates: list[tuple[int, bytes, bytes]]) -> int:
        _DATA_KEY_OWNER[table]  # only known tables reach the SQL below

        async def run(c: PgConnection) -> int:
            changed = 0
            for rowid, old, new in updates:
                changed += await c.execute(
                    f"UPDATE {table} SET data_key = $1 WHERE rowid = $2 AND data_key = $3",  # noqa: S608
                    new,
                    rowid,
                    old,
                )
            return changed

        return await self._tx(run)

    async def snapshot(self, dest: Path) -> None:
        raise FailedPrecondition(
            "the store is PostgreSQL: back its database up with pg_dump (README: replicated deployment);"
            " `backup` covers SQLite data dirs"
        )

    async def integrity_problems(self) -> list[str]:
        """Nothing to add: PostgreSQL checksums its own pages (where the cluster
        enables them) and enforces the foreign keys on every write; a SQLite file
        has neither, which is why its backend runs ``PRAGMA integrity_check``."""
        return []


def _refuse_newer(applied: set[int]) -> None:
    known = max(v for v, _ in PG_MIGRATIONS)
    if applied and max(applied) > known:
        raise newer_schema("the database", max(applied), known)


_DATA_KEY_OWNER = {
    "jobs": ("id",),
    "blobs": ("id",),
    "secrets": ("org", "name"),
    "mfa_factors": ("id",),
    "statement_keys": ("id",),
}
