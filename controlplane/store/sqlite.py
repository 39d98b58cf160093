"""The embedded SQLite backend. One connection on one thread: sqlite3 blocks,
so calls hop to that thread and the event loop never waits on disk."""

from __future__ import annotations

import asyncio
import hmac
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from controlplane.auth.audit import GENESIS, AuditChain, AuditEntry, AuditEvent
from controlplane.errors import FailedPrecondition, NotFound, StaleEpoch, StorageUnavailable, Unauthenticated
from controlplane.jobs.model import (
    BlobInfo,
    Job,
    JobSpec,
    JobStatus,
    LogStream,
    PoolPolicy,
    PullPolicy,
    Resources,
    TestCase,
    TestStatus,
    Transition,
)
from controlplane.store.base import (
    AgentRecord,
    ApiKeyRecord,
    EnrollmentTokenRecord,
    RefreshRecord,
    StoredLogEntry,
    UserRecord,
    WrappedDataKey,
)
from controlplane.store.migrations import MIGRATIONS
from controlplane.store.sqlite_leases import SqliteLeases

T = TypeVar("T")


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _spec_to_json(spec: JobSpec) -> str:
    data = asdict(spec)
    data["timeout"] = spec.timeout.total_seconds()
    data.update(_spec_to_json_lists(spec))
    return json.dumps(data, sort_keys=True)


def _spec_to_json_lists(spec: JobSpec) -> dict[str, object]:
    return {k: list(getattr(spec, k)) for k in ("command", "secrets", "artifact_globs", "junit_globs")}


def _spec_from_json(text: str) -> JobSpec:
    data = json.loads(text)
    data["timeout"] = timedelta(seconds=data["timeout"])
    for key in ("command", "secrets", "artifact_globs", "junit_globs"):
        data[key] = tuple(data.get(key, ()))
    data["resources"] = Resources(**data["resources"])
    return JobSpec(**data)


_BUSY, _LOCKED, _IOERR, _FULL = 5, 6, 10, 13


def storage_error(exc: sqlite3.OperationalError) -> Exception:
    """Conditions an operator can clear, as a clear transient error; anything else as it is."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (_BUSY, _LOCKED):
        return StorageUnavailable("the control plane's database is locked by another process; "
                                  "nothing was changed, try again")
    if code == _FULL:
        return StorageUnavailable("the control plane's disk is full; nothing was changed, "
                                  "writes resume once space is freed")
    if code == _IOERR:
        return StorageUnavailable(f"the control plane's disk failed a read or write ({exc}); nothing was changed")
    return exc


class SqliteStore(SqliteLeases):
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
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_timeout_ms / 1000)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        self._conn = conn
        self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
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
        await self._tx(lambda c: c.execute("INSERT INTO orgs (name, created_at) VALUES (?, ?)", (org, _ts(now))))

    async def create_pool(self, org: str, pool: str, now: datetime) -> None:
        await self._tx(lambda c: c.execute("INSERT INTO pools (org, name, created_at) VALUES (?, ?, ?)",
                                           (org, pool, _ts(now))))

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
            if c.execute("UPDATE pools SET agent_cert_ttl_s = ? WHERE org = ? AND name = ?",
                         (seconds, org, pool)).rowcount != 1:
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    # API keys ------------------------------------------------------------------
    async def create_api_key(self, record: ApiKeyRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO api_keys (id, org, name, secret_hash, scopes, created_at, revoked_at, owner, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.org, record.name, record.secret_hash, " ".join(record.scopes),
                 _ts(record.created_at), _ts(record.revoked_at), record.owner, _ts(record.expires_at)),
            )
        )

    @staticmethod
    def _api_key(r: sqlite3.Row) -> ApiKeyRecord:
        return ApiKeyRecord(r["id"], r["org"], r["name"], r["secret_hash"], tuple(r["scopes"].split()),
                            _dt(r["created_at"]) or datetime.min, _dt(r["revoked_at"]), r["owner"],
                            _dt(r["expires_at"]), _dt(r["last_used_at"]))

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self._api_key(rows[0]) if rows else None

    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]:
        return [self._api_key(r) for r in await self._query(
            "SELECT * FROM api_keys WHERE org = ? ORDER BY created_at", (org,))]

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        await self._tx(lambda c: c.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_ts(now), key_id)))

    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None:
        """Revoke the key and every session (refresh family) it opened."""
        def run(c: sqlite3.Connection) -> ApiKeyRecord | None:
            if c.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE org = ? AND id = ?",
                         (_ts(now), org, key_id)).rowcount != 1:
                return None
            c.execute("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                      " WHERE principal_kind = 'api_key' AND principal_id = ?", (_ts(now), key_id))
            return self._api_key(c.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone())

        return await self._tx(run)

    # users ------------------------------------------------------------------------
    @staticmethod
    def _user(r: sqlite3.Row) -> UserRecord:
        return UserRecord(r["id"], r["org"], r["name"], r["password_hash"], tuple(r["scopes"].split()),
                          _dt(r["created_at"]) or datetime.min, _dt(r["revoked_at"]))

    async def create_user(self, record: UserRecord) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.org, record.name, record.password_hash, " ".join(record.scopes),
             _ts(record.created_at), None)))

    async def find_user(self, org: str, name: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND name = ?", (org, name))
        return self._user(rows[0]) if rows else None

    async def get_user(self, org: str, user_id: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND id = ?", (org, user_id))
        return self._user(rows[0]) if rows else None

    async def list_users(self, org: str) -> list[UserRecord]:
        return [self._user(r) for r in await self._query("SELECT * FROM users WHERE org = ? ORDER BY name", (org,))]

    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None:
        def run(c: sqlite3.Connection) -> UserRecord | None:
            row = c.execute("SELECT * FROM users WHERE org = ? AND name = ?", (org, name)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE users SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (_ts(now), row["id"]))
            c.execute("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                      " WHERE principal_kind = 'user' AND principal_id = ?", (_ts(now), row["id"]))
            return self._user(c.execute("SELECT * FROM users WHERE id = ?", (row["id"],)).fetchone())

        return await self._tx(run)

    async def revoke_org(self, org: str, now: datetime) -> dict[str, int] | None:
        """Revoke everything an organisation acts through, in one transaction."""
        def run(c: sqlite3.Connection) -> dict[str, int] | None:
            if c.execute("SELECT 1 FROM orgs WHERE name = ?", (org,)).fetchone() is None:
                return None
            at = _ts(now)
            counts = {table: c.execute(f"UPDATE {table} SET revoked_at = COALESCE(revoked_at, ?) WHERE org = ?",
                                       (at, org)).rowcount
                      for table in ("api_keys", "users", "refresh_tokens", "agents", "enrollment_tokens")}
            return counts

        return await self._tx(run)

    async def list_orgs(self) -> list[str]:
        return [r["name"] for r in await self._query("SELECT name FROM orgs ORDER BY name")]

    # refresh tokens ---------------------------------------------------------------------
    @staticmethod
    def _refresh(r: sqlite3.Row) -> RefreshRecord:
        return RefreshRecord(r["id"], r["family"], r["org"], r["principal_kind"], r["principal_id"],
                             tuple(r["scopes"].split()), bytes(r["secret_hash"]),
                             _dt(r["created_at"]) or datetime.min, _dt(r["family_expires_at"]) or datetime.min,
                             _dt(r["used_at"]), _dt(r["revoked_at"]))

    async def create_refresh_token(self, record: RefreshRecord) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.family, record.org, record.principal_kind, record.principal_id,
             " ".join(record.scopes), record.secret_hash, _ts(record.created_at), _ts(record.family_expires_at),
             None, None)))

    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        """Mark used; returns the record as it was and whether this call spent it."""
        def run(c: sqlite3.Connection) -> tuple[RefreshRecord, bool] | None:
            row = c.execute("SELECT * FROM refresh_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return None
            spent = c.execute("UPDATE refresh_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                              (_ts(now), token_id)).rowcount == 1
            return self._refresh(row), spent

        return await self._tx(run)

    async def revoke_refresh_family(self, family: str, now: datetime) -> int:
        return await self._tx(lambda c: c.execute(
            "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family = ?",
            (_ts(now), family)).rowcount)

    async def family_revoked(self, family: str) -> bool:
        rows = await self._query("SELECT 1 FROM refresh_tokens WHERE family = ? AND revoked_at IS NOT NULL LIMIT 1",
                                 (family,))
        return bool(rows)

    # failed authentication -----------------------------------------------------------
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int:
        """Record one failure; returns the failures of ``subject`` within ``keep``."""
        def run(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM auth_failures WHERE at < ?", (_ts(now - keep),))
            c.execute("INSERT INTO auth_failures VALUES (?, ?)", (subject, _ts(now)))
            return int(c.execute("SELECT COUNT(*) FROM auth_failures WHERE subject = ?", (subject,)).fetchone()[0])

        return await self._tx(run)

    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        rows = await self._query("SELECT COUNT(*), MAX(at) FROM auth_failures WHERE subject = ? AND at >= ?",
                                 (subject, _ts(since)))
        return int(rows[0][0]), _dt(rows[0][1])

    async def clear_auth_failures(self, subject: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM auth_failures WHERE subject = ?", (subject,)))

    # enrollment tokens and agents --------------------------------------------
    async def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO enrollment_tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.org, record.pool, record.secret_hash, _ts(record.created_at),
                 _ts(record.expires_at), None, None),
            )
        )

    async def consume_enrollment_token(self, token_id: str, secret_hash: bytes, now: datetime) -> (
        EnrollmentTokenRecord
    ):
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
            return EnrollmentTokenRecord(row["id"], row["org"], row["pool"], row["secret_hash"],
                                         _dt(row["created_at"]) or now, _dt(row["expires_at"]) or now, now)

        return await self._tx(run)

    @staticmethod
    def _token(r: sqlite3.Row) -> EnrollmentTokenRecord:
        return EnrollmentTokenRecord(r["id"], r["org"], r["pool"], r["secret_hash"],
                                     _dt(r["created_at"]) or datetime.min, _dt(r["expires_at"]) or datetime.min,
                                     _dt(r["used_at"]), _dt(r["revoked_at"]))

    async def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]:
        return [self._token(r) for r in await self._query("SELECT * FROM enrollment_tokens ORDER BY created_at")]

    async def revoke_enrollment_token(self, token_id: str, now: datetime) -> EnrollmentTokenRecord | None:
        def run(c: sqlite3.Connection) -> EnrollmentTokenRecord | None:
            c.execute("UPDATE enrollment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                      (_ts(now), token_id))
            row = c.execute("SELECT * FROM enrollment_tokens WHERE id = ?", (token_id,)).fetchone()
            return self._token(row) if row else None

        return await self._tx(run)

    async def create_agent(self, record: AgentRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO agents (id, org, pool, name, cert_serial, cert_not_after, enrolled_at, cert_issuer)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.org, record.pool, record.name, record.cert_serial,
                 _ts(record.cert_not_after), _ts(record.enrolled_at), record.cert_issuer),
            )
        )

    @staticmethod
    def _agent(r: sqlite3.Row) -> AgentRecord:
        return AgentRecord(r["id"], r["org"], r["pool"], r["name"], r["cert_serial"],
                           _dt(r["cert_not_after"]) or datetime.min, _dt(r["enrolled_at"]) or datetime.min,
                           _dt(r["last_seen_at"]), _dt(r["revoked_at"]), r["cert_issuer"])

    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None:
        rows = await self._query("SELECT * FROM agents WHERE org = ? AND id = ?", (org, agent_id))
        return self._agent(rows[0]) if rows else None

    async def list_agents(self) -> list[AgentRecord]:
        return [self._agent(r) for r in await self._query("SELECT * FROM agents ORDER BY org, pool, enrolled_at")]

    async def revoke_agent(self, agent_id: str, now: datetime) -> tuple[AgentRecord, list[str]] | None:
        def run(c: sqlite3.Connection) -> tuple[AgentRecord, list[str]] | None:
            row = c.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
            if row is None:
                return None
            if row["revoked_at"] is None:
                c.execute("UPDATE agents SET revoked_at = ? WHERE id = ?", (_ts(now), agent_id))
            jobs = [r["id"] for r in c.execute(
                "SELECT id FROM jobs WHERE org = ? AND agent_id = ? AND status IN (?, ?)",
                (row["org"], agent_id, JobStatus.ASSIGNED.value, JobStatus.RUNNING.value))]
            reason = f"agent {agent_id} was revoked"
            for job_id in jobs:
                c.execute("UPDATE jobs SET status = ?, status_reason = ?, finished_at = ? WHERE id = ?",
                          (JobStatus.ERROR.value, reason, _ts(now), job_id))
                self._add_transition(c, job_id, JobStatus.ERROR, now, reason)
            agent = self._agent(c.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone())
            return agent, jobs

        return await self._tx(run)

    async def agents_revoked_since(self, since: datetime) -> list[AgentRecord]:
        rows = await self._query("SELECT * FROM agents WHERE revoked_at IS NOT NULL AND revoked_at >= ?",
                                 (_ts(since),))
        return [self._agent(r) for r in rows]

    async def touch_agent(self, org: str, agent_id: str, now: datetime) -> None:
        await self._tx(lambda c: c.execute("UPDATE agents SET last_seen_at = ? WHERE org = ? AND id = ?",
                                           (_ts(now), org, agent_id)))

    async def record_agent_certificate(self, org: str, agent_id: str, serial: str, not_after: datetime,
                                       issuer: str) -> None:
        await self._tx(lambda c: c.execute(
            "UPDATE agents SET cert_serial = ?, cert_not_after = ?, cert_issuer = ? WHERE org = ? AND id = ?",
            (serial, _ts(not_after), issuer, org, agent_id)))

    # audit ---------------------------------------------------------------------
    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry:
        def run(c: sqlite3.Connection) -> AuditEntry:
            head = c.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            seq, prev = (head["seq"] + 1, bytes(head["hash"])) if head else (1, GENESIS)
            entry = chain.entry(seq, prev, event)
            c.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (seq, _ts(event.at), event.actor, event.org, event.action, event.target,
                       json.dumps(event.details, sort_keys=True), event.source_ip, prev, entry.hash))
            c.execute("INSERT INTO audit_head VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                      " seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
                      (seq, entry.hash, chain.head_mac(seq, entry.hash)))
            return entry

        return await self._tx(run)

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        def run(c: sqlite3.Connection) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
            entries = [
                AuditEntry(r["seq"], AuditEvent(r["action"], r["actor"], r["org"], r["target"],
                                                json.loads(r["details"]), r["source_ip"],
                                                _dt(r["at"]) or datetime.min),
                           bytes(r["prev_hash"]), bytes(r["hash"]))
                for r in c.execute("SELECT * FROM audit_log ORDER BY seq")
            ]
            head = c.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
            return entries, ((head["seq"], bytes(head["hash"]), bytes(head["mac"])) if head else None)

        return await self._tx(run, write=False)

    # jobs ----------------------------------------------------------------------
    @staticmethod
    def _job(c: sqlite3.Connection, r: sqlite3.Row, with_transitions: bool = True) -> Job:
        transitions = tuple(
            Transition(JobStatus(t["status"]), _dt(t["at"]) or datetime.min, t["reason"])
            for t in c.execute("SELECT * FROM job_transitions WHERE job_id = ? ORDER BY n", (r["id"],))
        ) if with_transitions else ()
        return Job(
            id=r["id"], org=r["org"], spec=_spec_from_json(r["spec"]), status=JobStatus(r["status"]),
            created_at=_dt(r["created_at"]) or datetime.min, exit_code=r["exit_code"],
            status_reason=r["status_reason"], started_at=_dt(r["started_at"]),
            finished_at=_dt(r["finished_at"]), agent_id=r["agent_id"], epoch=r["epoch"],
            log_size=r["log_size"], last_seq=r["last_seq"], transitions=transitions, attempt=r["attempt"],
            retry_of=r["retry_of"], retried_as=r["retried_as"], lease_expires_at=_dt(r["lease_expires_at"]),
        )

    @staticmethod
    def _add_transition(c: sqlite3.Connection, job_id: str, status: JobStatus, now: datetime, reason: str) -> None:
        c.execute(
            "INSERT INTO job_transitions SELECT ?, COALESCE(MAX(n), 0) + 1, ?, ?, ? FROM job_transitions"
            " WHERE job_id = ?",
            (job_id, status.value, _ts(now), reason, job_id),
        )

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO jobs (id, org, pool, spec, status, created_at, data_key, attempt, retry_of, retries)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.org, job.spec.pool, _spec_to_json(job.spec), job.status.value,
                 _ts(job.created_at), data_key_wrapped, job.attempt, job.retry_of, job.spec.retries),
            )
            self._add_transition(c, job.id, job.status, job.created_at, "")

        await self._tx(run)

    async def get_job(self, org: str, job_id: str) -> Job | None:
        def run(c: sqlite3.Connection) -> Job | None:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            return self._job(c, row) if row else None

        return await self._tx(run, write=False)

    async def get_job_data_key(self, org: str, job_id: str) -> bytes:
        rows = await self._query("SELECT data_key FROM jobs WHERE org = ? AND id = ?", (org, job_id))
        if not rows:
            raise NotFound(f"job {job_id} not found")
        return bytes(rows[0]["data_key"])

    async def list_jobs(self, org: str, limit: int, before_id: str | None) -> list[Job]:
        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE org = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (org, before_id or "\U0010ffff", limit),
            ).fetchall()
            return [self._job(c, r) for r in rows]

        return await self._tx(run, write=False)

    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]:
        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE org = ? AND pool = ? AND status = ? ORDER BY id LIMIT ?",
                (org, pool, JobStatus.QUEUED.value, limit),
            ).fetchall()
            return [self._job(c, r, with_transitions=False) for r in rows]  # the dispatcher's hot path

        return await self._tx(run, write=False)

    async def queued_pools(self) -> list[tuple[str, str]]:
        rows = await self._query("SELECT DISTINCT org, pool FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,))
        return [(r["org"], r["pool"]) for r in rows]

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE org = ? AND agent_id = ? AND status IN (?, ?) ORDER BY id",
                (org, agent_id, JobStatus.ASSIGNED.value, JobStatus.RUNNING.value),
            ).fetchall()
            return [self._job(c, r) for r in rows]

        return await self._tx(run, write=False)

    async def assign_job(self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
                         ) -> Job | None:
        """QUEUED -> ASSIGNED with a new fencing epoch and a lease, or None if someone else won."""

        def run(c: sqlite3.Connection) -> Job | None:
            cur = c.execute(
                "UPDATE jobs SET status = ?, agent_id = ?, epoch = epoch + 1, lease_expires_at = ?"
                " WHERE org = ? AND id = ? AND status = ?",
                (JobStatus.ASSIGNED.value, agent_id, _ts(lease_until), org, job_id, JobStatus.QUEUED.value),
            )
            if cur.rowcount != 1:
                return None
            self._add_transition(c, job_id, JobStatus.ASSIGNED, now, f"agent {agent_id}")
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._tx(run)

    async def set_job_status(
        self, org: str, job_id: str, epoch: int | None, status: JobStatus, now: datetime, reason: str = "",
        exit_code: int | None = None,
    ) -> Job:
        def run(c: sqlite3.Connection) -> Job:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if epoch is not None and row["epoch"] != epoch:
                raise StaleEpoch(f"job {job_id} is at epoch {row['epoch']}, not {epoch}")
            current = JobStatus(row["status"])
            if current == status:
                return self._job(c, row)
            if current.terminal:
                raise FailedPrecondition(f"job {job_id} has already ended ({current.value})")
            started = _ts(now) if status == JobStatus.RUNNING else row["started_at"]
            finished = _ts(now) if status.terminal else None
            lease = None if status.terminal or status == JobStatus.QUEUED else row["lease_expires_at"]
            c.execute(
                "UPDATE jobs SET status = ?, status_reason = ?, exit_code = ?, started_at = ?, finished_at = ?,"
                " lease_expires_at = ? WHERE id = ?",
                (status.value, reason, exit_code, started, finished, lease, job_id),
            )
            self._add_transition(c, job_id, status, now, reason)
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._tx(run)

    async def report_job(
        self, org: str, job_id: str, agent_id: str, epoch: int, status: JobStatus, now: datetime, reason: str = "",
        exit_code: int | None = None, last_seq: int | None = None,
    ) -> tuple[Job, bool]:
        """What the holding agent reports (RUNNING, or how the job ended), checked and
        applied in one transaction; (job, whether it changed). A report the job
        is already past is a replay and changes nothing."""
        def run(c: sqlite3.Connection) -> tuple[Job, bool]:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            if row is None or row["agent_id"] != agent_id:
                raise NotFound(f"job {job_id} is not assigned to this agent")
            if row["epoch"] != epoch:
                raise StaleEpoch(f"job {job_id} was reassigned (epoch {row['epoch']}, not {epoch})")
            if last_seq is not None and row["last_seq"] != last_seq:
                raise FailedPrecondition(
                    f"result of job {job_id} arrived before its log ({row['last_seq']}/{last_seq})")
            current = JobStatus(row["status"])
            replay = current.terminal or current == status
            if replay or (status == JobStatus.RUNNING and current != JobStatus.ASSIGNED):
                return self._job(c, row, with_transitions=False), False
            started = _ts(now) if status == JobStatus.RUNNING else row["started_at"]
            finished = _ts(now) if status.terminal else None
            lease = None if status.terminal else row["lease_expires_at"]
            c.execute("UPDATE jobs SET status = ?, status_reason = ?, exit_code = ?, started_at = ?, finished_at = ?,"
                      " lease_expires_at = ? WHERE id = ?",
                      (status.value, reason, exit_code, started, finished, lease, job_id))
            self._add_transition(c, job_id, status, now, reason)
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(c, row, with_transitions=False), True

        result: tuple[Job, bool] = await self._tx(run)
        return result

    async def append_log_batch(
        self, org: str, job_id: str, epoch: int, seq: int, entries: list[tuple[LogStream, bytes, int]]
    ) -> int:
        """Store batch ``seq`` once; returns the highest contiguous stored seq.
        ``entries`` are (stream, sealed data, plaintext length)."""

        def run(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT epoch, status, last_seq, log_size FROM jobs WHERE org = ? AND id = ?",
                            (org, job_id)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if row["epoch"] != epoch:
                raise StaleEpoch(f"job {job_id} is at epoch {row['epoch']}, not {epoch}")
            last_seq, offset = row["last_seq"], row["log_size"]
            if seq <= last_seq:
                return int(last_seq)  # a replay of a batch already stored
            if JobStatus(row["status"]) not in (JobStatus.ASSIGNED, JobStatus.RUNNING):
                raise StaleEpoch(f"job {job_id} is {row['status']}; this agent no longer holds it")
            if seq != last_seq + 1:
                raise FailedPrecondition(f"log batch {seq} of job {job_id} arrived before batch {last_seq + 1}")
            for index, (stream, sealed, length) in enumerate(entries):
                c.execute("INSERT INTO log_entries VALUES (?, ?, ?, ?, ?, ?)",
                          (job_id, seq, index, offset, int(stream), sealed))
                offset += length
            c.execute("UPDATE jobs SET last_seq = ?, log_size = ? WHERE id = ?", (seq, offset, job_id))
            return seq

        return await self._tx(run)

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]:
        rows = await self._query(
            "SELECT l.* FROM log_entries l JOIN jobs j ON j.id = l.job_id"
            " WHERE j.org = ? AND l.job_id = ? AND l.byte_offset >= ("
            "   SELECT COALESCE(MAX(byte_offset), 0) FROM log_entries WHERE job_id = ? AND byte_offset <= ?)"
            " ORDER BY l.byte_offset, l.seq, l.idx LIMIT ?",
            (org, job_id, job_id, from_offset, limit),
        )
        return [StoredLogEntry(r["byte_offset"], LogStream(r["stream"]), bytes(r["data"]), r["seq"], r["idx"])
                for r in rows]

    # pool policy -----------------------------------------------------------------
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        rows = await self._query("SELECT allowed_images, pull_policy, runtime FROM pools WHERE org = ? AND name = ?",
                                 (org, pool))
        if not rows:
            raise NotFound(f"pool {org}/{pool} not found")
        r = rows[0]
        return PoolPolicy(tuple(json.loads(r["allowed_images"])), PullPolicy(r["pull_policy"]), r["runtime"])

    async def set_pool_policy(self, org: str, pool: str, policy: PoolPolicy) -> None:
        def run(c: sqlite3.Connection) -> None:
            if c.execute("UPDATE pools SET allowed_images = ?, pull_policy = ?, runtime = ? WHERE org = ? AND name = ?",
                         (json.dumps(list(policy.allowed_images)), policy.pull_policy.value, policy.runtime,
                          org, pool)).rowcount != 1:
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    # blobs: workspaces, artifacts, reports ----------------------------------------
    async def create_blob(self, blob_id: str, org: str, kind: str, job_id: str | None, path: str,
                          data_key: bytes, now: datetime) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT INTO blobs (id, org, kind, job_id, path, data_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (blob_id, org, kind, job_id, path, data_key, _ts(now))))

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        await self._tx(lambda c: c.execute("INSERT INTO blob_chunks VALUES (?, ?, ?)", (blob_id, index, sealed)))

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        """Mark complete; a complete blob of the same job, kind and path is replaced."""
        def run(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT job_id, kind, path FROM blobs WHERE id = ?", (blob_id,)).fetchone()
            if row["job_id"] is not None:
                for old in c.execute("SELECT id FROM blobs WHERE job_id = ? AND kind = ? AND path = ? AND id != ?",
                                     (row["job_id"], row["kind"], row["path"], blob_id)).fetchall():
                    c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (old["id"],))
                    c.execute("DELETE FROM blobs WHERE id = ?", (old["id"],))
            c.execute("UPDATE blobs SET size = ?, sha256 = ?, complete = 1 WHERE id = ?", (size, sha256, blob_id))

        await self._tx(run)

    async def delete_blob(self, blob_id: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
            c.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))

        await self._tx(run)

    @staticmethod
    def _blob(r: sqlite3.Row) -> BlobInfo:
        return BlobInfo(r["id"], r["org"], r["kind"], r["job_id"], r["path"], r["size"], r["sha256"])

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query("SELECT * FROM blobs WHERE org = ? AND id = ? AND complete = 1", (org, blob_id))
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND path = ? AND complete = 1",
            (org, job_id, kind, path))
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND complete = 1 ORDER BY path",
            (org, job_id, kind))
        return [self._blob(r) for r in rows]

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        rows = await self._query("SELECT data FROM blob_chunks WHERE blob_id = ? AND idx = ?", (blob_id, index))
        return bytes(rows[0]["data"]) if rows else None

    # secrets ---------------------------------------------------------------------
    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT INTO secrets VALUES (?, ?, ?, ?, ?) ON CONFLICT (org, name) DO UPDATE SET"
            " data_key = excluded.data_key, value = excluded.value, updated_at = excluded.updated_at",
            (org, name, data_key, sealed, _ts(now))))

    async def list_secrets(self, org: str) -> list[tuple[str, datetime]]:
        rows = await self._query("SELECT name, updated_at FROM secrets WHERE org = ? ORDER BY name", (org,))
        return [(r["name"], _dt(r["updated_at"]) or datetime.min) for r in rows]

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        def run(c: sqlite3.Connection) -> datetime | None:
            row = c.execute("SELECT updated_at FROM secrets WHERE org = ? AND name = ?", (org, name)).fetchone()
            c.execute("DELETE FROM secrets WHERE org = ? AND name = ?", (org, name))
            return _dt(row["updated_at"]) if row else None

        return await self._tx(run)

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        if not names:
            return {}
        marks = ", ".join("?" * len(names))
        rows = await self._query(f"SELECT name, data_key, value FROM secrets WHERE org = ? AND name IN ({marks})",
                                 (org, *names))
        return {r["name"]: (bytes(r["data_key"]), bytes(r["value"])) for r in rows}

    # test results ----------------------------------------------------------------
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM test_cases WHERE job_id = ? AND path = ?", (job_id, path))
            c.execute("INSERT INTO test_reports VALUES (?, ?, ?) ON CONFLICT (job_id, path) DO UPDATE SET"
                      " error = excluded.error", (job_id, path, error))
            c.executemany("INSERT INTO test_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [(job_id, path, n, t.suite, t.classname, t.name, t.duration_s, t.status.value, t.message)
                           for n, t in enumerate(cases)])

        await self._tx(run)

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        def run(c: sqlite3.Connection) -> tuple[list[TestCase], list[str]]:
            if c.execute("SELECT 1 FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone() is None:
                raise NotFound(f"job {job_id} not found")
            cases = [TestCase(r["suite"], r["classname"], r["name"], r["duration_s"], TestStatus(r["status"]),
                              r["message"])
                     for r in c.execute("SELECT * FROM test_cases WHERE job_id = ? ORDER BY path, n", (job_id,))]
            rejected = [r["path"] for r in c.execute(
                "SELECT path FROM test_reports WHERE job_id = ? AND error != '' ORDER BY path", (job_id,))]
            return cases, rejected

        return await self._tx(run, write=False)

    # master-key rotation and backup ------------------------------------------------
    async def data_keys(self, table: str, after_rowid: int, limit: int) -> list[WrappedDataKey]:
        owner = _DATA_KEY_OWNER[table]
        rows = await self._query(f"SELECT rowid, {', '.join(owner)}, data_key FROM {table} WHERE rowid > ?"
                                 " ORDER BY rowid LIMIT ?", (after_rowid, limit))
        return [WrappedDataKey(table, r["rowid"], tuple(r[c] for c in owner), bytes(r["data_key"])) for r in rows]

    async def replace_data_keys(self, table: str, updates: list[tuple[int, bytes, bytes]]) -> int:
        _DATA_KEY_OWNER[table]  # only known tables reach the SQL below

        def run(c: sqlite3.Connection) -> int:
            return sum(c.execute(f"UPDATE {table} SET data_key = ? WHERE rowid = ? AND data_key = ?",
                                 (new, rowid, old)).rowcount for rowid, old, new in updates)

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
