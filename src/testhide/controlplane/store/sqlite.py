"""The embedded SQLite backend. One connection on one thread: sqlite3 blocks,
so calls hop to that thread and the event loop never waits on disk."""

from __future__ import annotations

import asyncio
import hmac
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from testhide.controlplane.auth.audit import GENESIS, AuditChain, AuditEntry, AuditEvent
from testhide.controlplane.errors import NotFound, StorageUnavailable, Unauthenticated
from testhide.controlplane.jobs.model import (
    JobStatus,
)
from testhide.controlplane.store.base import (
    AgentRecord,
    ApiKeyRecord,
    EnrollmentTokenRecord,
    RefreshRecord,
    UserRecord,
    WrappedDataKey,
)
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.sqlite_common import _dt, _ts
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


class SqliteStore(SqliteJobData, SqliteLeases):
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

    # organisations and pools -------------------------------------------------
    async def create_org(self, org: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute("INSERT INTO orgs (name, created_at) VALUES (?, ?)", (org, _ts(now)))
        )

    async def create_pool(self, org: str, pool: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO pools (org, name, created_at) VALUES (?, ?, ?)", (org, pool, _ts(now))
            )
        )

    async def pool_exists(self, org: str, pool: str) -> bool:
        return bool(await self._query("SELECT 1 FROM pools WHERE org = ? AND name = ?", (org, pool)))

    async def pool_cert_ttl(self, org: str, pool: str) -> timedelta | None:
        rows = await self._query("SELECT agent_cert_ttl_s FROM pools WHERE org = ? AND name = ?", (org, pool))
        if not rows or rows[0][0] is None:
            return None
        return timedelta(seconds=rows[0][0])

    async def set_pool_cert_ttl(self, org: str, pool: str, ttl: timedelta | None) -> None:
        seconds = int(ttl.total_seconds()) if ttl else None

        def run(c: sqlite3.Connection) -> None:
            if (
                c.execute(
                    "UPDATE pools SET agent_cert_ttl_s = ? WHERE org = ? AND name = ?", (seconds, org, pool)
                ).rowcount
                != 1
            ):
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    # API keys ------------------------------------------------------------------
    async def create_api_key(self, record: ApiKeyRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO api_keys"
                " (id, org, name, secret_hash, scopes, created_at, revoked_at, owner, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.name,
                    record.secret_hash,
                    " ".join(record.scopes),
                    _ts(record.created_at),
                    _ts(record.revoked_at),
                    record.owner,
                    _ts(record.expires_at),
                ),
            )
        )

    @staticmethod
    def _api_key(r: sqlite3.Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            r["id"],
            r["org"],
            r["name"],
            r["secret_hash"],
            tuple(r["scopes"].split()),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["revoked_at"]),
            r["owner"],
            _dt(r["expires_at"]),
            _dt(r["last_used_at"]),
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self._api_key(rows[0]) if rows else None

    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]:
        return [
            self._api_key(r)
            for r in await self._query("SELECT * FROM api_keys WHERE org = ? ORDER BY created_at", (org,))
        ]

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_ts(now), key_id))
        )

    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None:
        """Revoke the key and every session (refresh family) it opened."""

        def run(c: sqlite3.Connection) -> ApiKeyRecord | None:
            if (
                c.execute(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE org = ? AND id = ?",
                    (_ts(now), org, key_id),
                ).rowcount
                != 1
            ):
                return None
            c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE principal_kind = 'api_key' AND principal_id = ?",
                (_ts(now), key_id),
            )
            return self._api_key(c.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone())

        return await self._tx(run)

    # users ------------------------------------------------------------------------
    @staticmethod
    def _user(r: sqlite3.Row) -> UserRecord:
        return UserRecord(
            r["id"],
            r["org"],
            r["name"],
            r["password_hash"],
            tuple(r["scopes"].split()),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["revoked_at"]),
        )

    async def create_user(self, record: UserRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.name,
                    record.password_hash,
                    " ".join(record.scopes),
                    _ts(record.created_at),
                    None,
                ),
            )
        )

    async def find_user(self, org: str, name: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND name = ?", (org, name))
        return self._user(rows[0]) if rows else None

    async def get_user(self, org: str, user_id: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND id = ?", (org, user_id))
        return self._user(rows[0]) if rows else None

    async def list_users(self, org: str) -> list[UserRecord]:
        return [
            self._user(r)
            for r in await self._query("SELECT * FROM users WHERE org = ? ORDER BY name", (org,))
        ]

    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None:
        def run(c: sqlite3.Connection) -> UserRecord | None:
            row = c.execute("SELECT * FROM users WHERE org = ? AND name = ?", (org, name)).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE users SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (_ts(now), row["id"])
            )
            c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE principal_kind = 'user' AND principal_id = ?",
                (_ts(now), row["id"]),
            )
            return self._user(c.execute("SELECT * FROM users WHERE id = ?", (row["id"],)).fetchone())

        return await self._tx(run)

    async def revoke_org(self, org: str, now: datetime) -> dict[str, int] | None:
        """Revoke everything an organisation acts through, in one transaction."""

        def run(c: sqlite3.Connection) -> dict[str, int] | None:
            if c.execute("SELECT 1 FROM orgs WHERE name = ?", (org,)).fetchone() is None:
                return None
            at = _ts(now)
            counts = {
                table: c.execute(
                    # The table names are the constants below; the values travel as parameters.
                    f"UPDATE {table} SET revoked_at = COALESCE(revoked_at, ?) WHERE org = ?",  # noqa: S608
                    (at, org),
                ).rowcount
                for table in ("api_keys", "users", "refresh_tokens", "agents", "enrollment_tokens")
            }
            return counts

        return await self._tx(run)

    async def list_orgs(self) -> list[str]:
        return [r["name"] for r in await self._query("SELECT name FROM orgs ORDER BY name")]

    # refresh tokens ---------------------------------------------------------------------
    @staticmethod
    def _refresh(r: sqlite3.Row) -> RefreshRecord:
        return RefreshRecord(
            r["id"],
            r["family"],
            r["org"],
            r["principal_kind"],
            r["principal_id"],
            tuple(r["scopes"].split()),
            bytes(r["secret_hash"]),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["family_expires_at"]) or datetime.min,
            _dt(r["used_at"]),
            _dt(r["revoked_at"]),
        )

    async def create_refresh_token(self, record: RefreshRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.family,
                    record.org,
                    record.principal_kind,
                    record.principal_id,
                    " ".join(record.scopes),
                    record.secret_hash,
                    _ts(record.created_at),
                    _ts(record.family_expires_at),
                    None,
                    None,
                ),
            )
        )

    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        """Mark used; returns the record as it was and whether this call spent it."""

        def run(c: sqlite3.Connection) -> tuple[RefreshRecord, bool] | None:
            row = c.execute("SELECT * FROM refresh_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return None
            spent = (
                c.execute(
                    "UPDATE refresh_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                    (_ts(now), token_id),
                ).rowcount
                == 1
            )
            return self._refresh(row), spent

        return await self._tx(run)

    async def revoke_refresh_family(self, family: str, now: datetime) -> int:
        return await self._tx(
            lambda c: (
                c.execute(
                    "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family = ?",
                    (_ts(now), family),
                ).rowcount
            )
        )

    async def family_revoked(self, family: str) -> bool:
        rows = await self._query(
            "SELECT 1 FROM refresh_tokens WHERE family = ? AND revoked_at IS NOT NULL LIMIT 1", (family,)
        )
        return bool(rows)

    # failed authentication -----------------------------------------------------------
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int:
        """Record one failure; returns the failures of ``subject`` within ``keep``."""

        def run(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM auth_failures WHERE at < ?", (_ts(now - keep),))
            c.execute("INSERT INTO auth_failures VALUES (?, ?)", (subject, _ts(now)))
            return int(
                c.execute("SELECT COUNT(*) FROM auth_failures WHERE subject = ?", (subject,)).fetchone()[0]
            )

        return await self._tx(run)

    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        rows = await self._query(
            "SELECT COUNT(*), MAX(at) FROM auth_failures WHERE subject = ? AND at >= ?", (subject, _ts(since))
        )
        return int(rows[0][0]), _dt(rows[0][1])

    async def clear_auth_failures(self, subject: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM auth_failures WHERE subject = ?", (subject,)))

    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int:
        """One failed login from ``address``; returns its failures since it was last
        quiet for a whole ``window``. Addresses quiet that long are pruned."""

        def run(c: sqlite3.Connection) -> int:
            cutoff = _ts(now - window)
            c.execute("DELETE FROM address_failures WHERE last_at < ?", (cutoff,))
            c.execute(
                "INSERT INTO address_failures (address, failures, first_at, last_at) VALUES (?, 1, ?, ?)"
                " ON CONFLICT (address) DO UPDATE SET failures = failures + 1, last_at = excluded.last_at",
                (address, _ts(now), _ts(now)),
            )
            row = c.execute("SELECT failures FROM address_failures WHERE address = ?", (address,)).fetchone()
            return int(row[0])

        return await self._tx(run)

    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]:
        """Failures of ``address`` and its last one, if that was at or after ``since``."""
        rows = await self._query(
            "SELECT failures, last_at FROM address_failures WHERE address = ? AND last_at >= ?",
            (address, _ts(since)),
        )
        if not rows:
            return 0, None
        return int(rows[0][0]), _dt(rows[0][1])

    # enrollment tokens and agents --------------------------------------------
    async def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO enrollment_tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.pool,
                    record.secret_hash,
                    _ts(record.created_at),
                    _ts(record.expires_at),
                    None,
                    None,
                ),
            )
        )

    async def consume_enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        """Mark the token used, atomically; any reason for refusal is the same
        error so a caller learns nothing about which tokens exist."""

        def run(c: sqlite3.Connection) -> EnrollmentTokenRecord:
            row = c.execute("SELECT * FROM enrollment_tokens WHERE id = ?", (token_id,)).fetchone()
            if (
                row is None
                or not hmac.compare_digest(row["secret_hash"], secret_hash)
                or row["used_at"] is not None
                or row["revoked_at"] is not None
                or (_dt(row["expires_at"]) or now) <= now
            ):
                raise Unauthenticated("the enrollment token is invalid, expired, revoked or already used")
            c.execute("UPDATE enrollment_tokens SET used_at = ? WHERE id = ?", (_ts(now), token_id))
            return EnrollmentTokenRecord(
                row["id"],
                row["org"],
                row["pool"],
                row["secret_hash"],
                _dt(row["created_at"]) or now,
                _dt(row["expires_at"]) or now,
                now,
            )

        return await self._tx(run)

    @staticmethod
    def _token(r: sqlite3.Row) -> EnrollmentTokenRecord:
        return EnrollmentTokenRecord(
            r["id"],
            r["org"],
            r["pool"],
            r["secret_hash"],
            _dt(r["created_at"]) or datetime.min,
            _dt(r["expires_at"]) or datetime.min,
            _dt(r["used_at"]),
            _dt(r["revoked_at"]),
        )

    async def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]:
        return [
            self._token(r) for r in await self._query("SELECT * FROM enrollment_tokens ORDER BY created_at")
        ]

    async def revoke_enrollment_token(self, token_id: str, now: datetime) -> EnrollmentTokenRecord | None:
        def run(c: sqlite3.Connection) -> EnrollmentTokenRecord | None:
            c.execute(
                "UPDATE enrollment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (_ts(now), token_id),
            )
            row = c.execute("SELECT * FROM enrollment_tokens WHERE id = ?", (token_id,)).fetchone()
            return self._token(row) if row else None

        return await self._tx(run)

    async def create_agent(self, record: AgentRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO agents"
                " (id, org, pool, name, cert_serial, cert_not_after, enrolled_at, cert_issuer)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.pool,
                    record.name,
                    record.cert_serial,
                    _ts(record.cert_not_after),
                    _ts(record.enrolled_at),
                    record.cert_issuer,
                ),
            )
        )

    @staticmethod
    def _agent(r: sqlite3.Row) -> AgentRecord:
        return AgentRecord(
            r["id"],
            r["org"],
            r["pool"],
            r["name"],
            r["cert_serial"],
            _dt(r["cert_not_after"]) or datetime.min,
            _dt(r["enrolled_at"]) or datetime.min,
            _dt(r["last_seen_at"]),
            _dt(r["revoked_at"]),
            r["cert_issuer"],
            r["version"],
        )

    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None:
        rows = await self._query("SELECT * FROM agents WHERE org = ? AND id = ?", (org, agent_id))
        return self._agent(rows[0]) if rows else None

    async def list_agents(self) -> list[AgentRecord]:
        return [
            self._agent(r) for r in await self._query("SELECT * FROM agents ORDER BY org, pool, enrolled_at")
        ]

    async def revoke_agent(self, agent_id: str, now: datetime) -> tuple[AgentRecord, list[str]] | None:
        def run(c: sqlite3.Connection) -> tuple[AgentRecord, list[str]] | None:
            row = c.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
            if row is None:
                return None
            if row["revoked_at"] is None:
                c.execute("UPDATE agents SET revoked_at = ? WHERE id = ?", (_ts(now), agent_id))
            jobs = [
                r["id"]
                for r in c.execute(
                    "SELECT id FROM jobs WHERE org = ? AND agent_id = ? AND status IN (?, ?)",
                    (row["org"], agent_id, JobStatus.ASSIGNED.value, JobStatus.RUNNING.value),
                )
            ]
            reason = f"agent {agent_id} was revoked"
            for job_id in jobs:
                c.execute(
                    "UPDATE jobs SET status = ?, status_reason = ?, finished_at = ? WHERE id = ?",
                    (JobStatus.ERROR.value, reason, _ts(now), job_id),
                )
                self._add_transition(c, job_id, JobStatus.ERROR, now, reason)
            agent = self._agent(c.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone())
            return agent, jobs

        return await self._tx(run)

    async def agents_revoked_since(self, since: datetime) -> list[AgentRecord]:
        rows = await self._query(
            "SELECT * FROM agents WHERE revoked_at IS NOT NULL AND revoked_at >= ?", (_ts(since),)
        )
        return [self._agent(r) for r in rows]

    async def touch_agent(self, org: str, agent_id: str, now: datetime, version: str | None = None) -> None:
        """Last contact; with ``version``, also the version the agent announced in its hello."""
        args: tuple[str | None, ...]
        if version is None:
            sql = "UPDATE agents SET last_seen_at = ? WHERE org = ? AND id = ?"
            args = (_ts(now), org, agent_id)
        else:
            sql = "UPDATE agents SET last_seen_at = ?, version = ? WHERE org = ? AND id = ?"
            args = (_ts(now), version, org, agent_id)
        await self._tx(lambda c: c.execute(sql, args))

    async def record_agent_certificate(
        self, org: str, agent_id: str, serial: str, not_after: datetime, issuer: str
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE agents SET cert_serial = ?, cert_not_after = ?, cert_issuer = ?"
                " WHERE org = ? AND id = ?",
                (serial, _ts(not_after), issuer, org, agent_id),
            )
        )

    # audit ---------------------------------------------------------------------
    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry:
        def run(c: sqlite3.Connection) -> AuditEntry:
            head = c.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            seq, prev = (head["seq"] + 1, bytes(head["hash"])) if head else (1, GENESIS)
            entry = chain.entry(seq, prev, event)
            c.execute(
                "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    _ts(event.at),
                    event.actor,
                    event.org,
                    event.action,
                    event.target,
                    json.dumps(event.details, sort_keys=True),
                    event.source_ip,
                    prev,
                    entry.hash,
                ),
            )
            c.execute(
                "INSERT INTO audit_head VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
                (seq, entry.hash, chain.head_mac(seq, entry.hash)),
            )
            return entry

        return await self._tx(run)

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        def run(c: sqlite3.Connection) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
            entries = [
                AuditEntry(
                    r["seq"],
                    AuditEvent(
                        r["action"],
                        r["actor"],
                        r["org"],
                        r["target"],
                        json.loads(r["details"]),
                        r["source_ip"],
                        _dt(r["at"]) or datetime.min,
                    ),
                    bytes(r["prev_hash"]),
                    bytes(r["hash"]),
                )
                for r in c.execute("SELECT * FROM audit_log ORDER BY seq")
            ]
            head = c.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
            return entries, ((head["seq"], bytes(head["hash"]), bytes(head["mac"])) if head else None)

        return await self._tx(run, write=False)

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
