"""Organisations, pools, enrollment tokens and agents in the SQLite store.
Mixed into SqliteStore, which provides the transaction runner; SqliteJobData
the job transitions an agent's revocation writes."""

from __future__ import annotations

import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from testhide.controlplane.auth.audit import AuditChain
from testhide.controlplane.ca.store import AgentHello, CertificateRenewal
from testhide.controlplane.errors import NotFound, Unauthenticated
from testhide.controlplane.jobs.model import JobAgent, JobStatus, PoolPolicy, PullPolicy
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord, PoolRecord
from testhide.controlplane.store.sqlite_auth import append_audit_entries
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts


def _stream_holder() -> str:
    """agents.replica of the streams this process holds: one serve is SQLite's only replica."""
    return f"pid:{os.getpid()}"


class SqliteAgents(SqliteParts):
    _add_transition: Callable[[sqlite3.Connection, str, JobStatus, datetime, str], None]

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

    async def list_pools(self, org: str | None = None) -> list[PoolRecord]:
        rows = await self._query(
            "SELECT p.*,"
            " (SELECT count(*) FROM agents a WHERE a.org = p.org AND a.pool = p.name"
            "  AND a.revoked_at IS NULL) AS agents_enrolled,"
            " (SELECT count(*) FROM jobs j WHERE j.org = p.org AND j.pool = p.name"
            "  AND j.status = ?) AS jobs_queued,"
            " (SELECT count(*) FROM jobs j WHERE j.org = p.org AND j.pool = p.name"
            "  AND j.status IN (?, ?)) AS jobs_running"
            " FROM pools p WHERE ? IS NULL OR p.org = ? ORDER BY p.org, p.name",
            (JobStatus.QUEUED.value, JobStatus.ASSIGNED.value, JobStatus.RUNNING.value, org, org),
        )
        return [
            PoolRecord(
                r["org"],
                r["name"],
                PoolPolicy(
                    tuple(json.loads(r["allowed_images"])),
                    PullPolicy(r["pull_policy"]),
                    r["runtime"],
                    bool(r["paused"]),
                    tuple(json.loads(r["egress_allow"])),
                ),
                None if r["agent_cert_ttl_s"] is None else timedelta(seconds=r["agent_cert_ttl_s"]),
                _dt(r["created_at"]) or datetime.min,
                r["agents_enrolled"],
                r["jobs_queued"],
                r["jobs_running"],
            )
            for r in rows
        ]

    async def set_pool_paused(self, org: str, pool: str, paused: bool, now: datetime) -> None:
        def run(c: sqlite3.Connection) -> None:
            changed = c.execute(
                "UPDATE pools SET paused = ?,"
                " resumed_at = CASE WHEN ? THEN resumed_at ELSE ? END WHERE org = ? AND name = ?",
                (int(paused), int(paused), _ts(now), org, pool),
            ).rowcount
            if changed != 1:
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    async def pools_resumed_since(self, since: datetime) -> list[tuple[str, str]]:
        rows = await self._query(
            "SELECT org, name FROM pools WHERE paused = 0 AND resumed_at >= ?", (_ts(since),)
        )
        return [(r["org"], r["name"]) for r in rows]

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
            c.execute("UPDATE orgs SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ?", (at, org))
            return counts

        return await self._tx(run)

    async def list_orgs(self) -> list[str]:
        return [r["name"] for r in await self._query("SELECT name FROM orgs ORDER BY name")]

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

    @staticmethod
    def _usable_token(
        c: sqlite3.Connection, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        """The token if it can enroll an agent at ``now``; any reason for refusal
        is the same error, so a caller learns nothing about which tokens exist."""
        row = c.execute("SELECT * FROM enrollment_tokens WHERE id = ?", (token_id,)).fetchone()
        if (
            row is None
            or not hmac.compare_digest(row["secret_hash"], secret_hash)
            or row["used_at"] is not None
            or row["revoked_at"] is not None
            or (_dt(row["expires_at"]) or now) <= now
        ):
            raise Unauthenticated("the enrollment token is invalid, expired, revoked or already used")
        return SqliteAgents._token(row)

    async def consume_enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        """Mark the token used, atomically."""

        def run(c: sqlite3.Connection) -> EnrollmentTokenRecord:
            record = self._usable_token(c, token_id, secret_hash, now)
            c.execute("UPDATE enrollment_tokens SET used_at = ? WHERE id = ?", (_ts(now), token_id))
            return replace(record, used_at=now)

        return await self._tx(run)

    async def enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        return await self._tx(lambda c: self._usable_token(c, token_id, secret_hash, now), write=False)

    async def enroll_agent(
        self, token_id: str, secret_hash: bytes, now: datetime, agent: AgentRecord
    ) -> EnrollmentTokenRecord:
        """The token spent and the agent added, or neither (a failed insert rolls the spending back)."""

        def run(c: sqlite3.Connection) -> EnrollmentTokenRecord:
            record = self._usable_token(c, token_id, secret_hash, now)
            if (record.org, record.pool) != (agent.org, agent.pool):
                raise Unauthenticated("the enrollment token is invalid, expired, revoked or already used")
            c.execute("UPDATE enrollment_tokens SET used_at = ? WHERE id = ?", (_ts(now), token_id))
            self._insert_agent(c, agent)
            return replace(record, used_at=now)

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

    async def list_enrollment_tokens(self, org: str | None = None) -> list[EnrollmentTokenRecord]:
        rows = await self._query(
            "SELECT * FROM enrollment_tokens WHERE ? IS NULL OR org = ? ORDER BY created_at", (org, org)
        )
        return [self._token(r) for r in rows]

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
        await self._tx(lambda c: self._insert_agent(c, record))

    @staticmethod
    def _insert_agent(c: sqlite3.Connection, record: AgentRecord) -> None:
        c.execute(
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

    @staticmethod
    def _agent(r: sqlite3.Row, running_jobs: int = 0) -> AgentRecord:
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
            json.loads(r["labels"]),
            tuple(r["runtimes"].split()),
            r["max_jobs"],
            r["replica"],
            running_jobs,
            host=r["host"],
        )

    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None:
        rows = await self._query("SELECT * FROM agents WHERE org = ? AND id = ?", (org, agent_id))
        return self._agent(rows[0]) if rows else None

    async def list_agents(self, org: str | None = None) -> list[AgentRecord]:
        rows = await self._query(
            "SELECT a.*, (SELECT count(*) FROM jobs j WHERE j.org = a.org AND j.agent_id = a.id"
            " AND j.status IN (?, ?)) AS running_jobs FROM agents a WHERE ? IS NULL OR a.org = ?"
            " ORDER BY a.org, a.pool, a.enrolled_at",
            (JobStatus.ASSIGNED.value, JobStatus.RUNNING.value, org, org),
        )
        return [self._agent(r, r["running_jobs"]) for r in rows]

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

    async def touch_agent(
        self, org: str, agent_id: str, now: datetime, hello: AgentHello | None = None
    ) -> None:
        """Last contact, and this serve holds the agent's stream (every heartbeat says
        so again: a reconnect racing the old stream's end heals within one)."""
        if hello is None:
            sql = "UPDATE agents SET last_seen_at = ?, replica = ? WHERE org = ? AND id = ?"
            args: tuple[object, ...] = (_ts(now), _stream_holder(), org, agent_id)
        else:
            sql = (
                "UPDATE agents SET last_seen_at = ?, replica = ?, version = ?, labels = ?, runtimes = ?,"
                " max_jobs = ?, host = ? WHERE org = ? AND id = ?"
            )
            args = (
                _ts(now),
                _stream_holder(),
                hello.version,
                json.dumps(hello.labels, sort_keys=True),
                " ".join(hello.runtimes),
                hello.max_jobs,
                hello.host,
                org,
                agent_id,
            )
        await self._tx(lambda c: c.execute(sql, args))

    async def job_agents(self, org: str, agent_ids: set[str]) -> dict[str, JobAgent]:
        if not agent_ids:
            return {}
        marks = ", ".join("?" * len(agent_ids))
        rows = await self._query(
            f"SELECT id, name, host, version, pool FROM agents WHERE org = ? AND id IN ({marks})",  # noqa: S608
            (org, *sorted(agent_ids)),
        )
        return {r["id"]: JobAgent(r["id"], r["name"], r["host"], r["version"], r["pool"]) for r in rows}

    async def agent_disconnected(self, org: str, agent_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE agents SET last_seen_at = ?, replica = '' WHERE org = ? AND id = ? AND replica = ?",
                (_ts(now), org, agent_id, _stream_holder()),
            )
        )

    async def record_agent_renewals(
        self, renewals: Sequence[CertificateRenewal], chain: AuditChain
    ) -> list[bool]:
        def run(c: sqlite3.Connection) -> list[bool]:
            recorded = [
                c.execute(
                    "UPDATE agents SET cert_serial = ?, cert_not_after = ?, cert_issuer = ?"
                    " WHERE org = ? AND id = ? AND revoked_at IS NULL",
                    (r.serial, _ts(r.not_after), r.issuer, r.org, r.agent_id),
                ).rowcount
                == 1
                for r in renewals
            ]
            append_audit_entries(
                c, [r.event for r, done in zip(renewals, recorded, strict=True) if done], chain
            )
            return recorded

        return await self._tx(run)
