"""Organisations, pools, enrollment tokens and agents in the SQLite store.
Mixed into SqliteStore, which provides the transaction runner; SqliteJobData
the job transitions an agent's revocation writes."""

from __future__ import annotations

import hmac
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta

from testhide.controlplane.errors import NotFound, Unauthenticated
from testhide.controlplane.jobs.model import JobStatus
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts


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
