"""Organisations, pools, enrollment tokens and agents in the PostgreSQL store.
Mixed into PgStore, which provides the transaction runner; PgJobData the job
transitions an agent's revocation writes.

Several control planes write at once under READ COMMITTED, so what SQLite's
single writer made atomic takes a row lock here: an enrollment token is locked
before it is checked and spent (two replicas redeeming it at the same moment:
the second waits, then finds it used), an organisation before it is revoked
(an API key or user being added to it meanwhile is revoked with it, or waits)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from testhide.controlplane.auth.audit import AuditChain
from testhide.controlplane.ca.store import AgentHello, CertificateRenewal
from testhide.controlplane.errors import NotFound, Unauthenticated
from testhide.controlplane.jobs.model import JobAgent, JobStatus, PoolPolicy, PullPolicy
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord, PoolRecord
from testhide.controlplane.store.pg_auth import append_audit_entries
from testhide.controlplane.store.pg_common import PgConnection, PgParts, Row

_FIND_ENROLLMENT = "SELECT * FROM enrollment_tokens WHERE id = $1"
_FIND_ENROLLMENT_LOCKED = _FIND_ENROLLMENT + " FOR UPDATE"


class PgAgents(PgParts):
    _add_transition: Callable[[PgConnection, str, JobStatus, datetime, str], Awaitable[None]]

    # organisations and pools -------------------------------------------------
    async def create_org(self, org: str, now: datetime) -> None:
        await self._tx(lambda c: c.execute("INSERT INTO orgs (name, created_at) VALUES ($1, $2)", org, now))

    async def create_pool(self, org: str, pool: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO pools (org, name, created_at) VALUES ($1, $2, $3)", org, pool, now
            )
        )

    async def pool_exists(self, org: str, pool: str) -> bool:
        return bool(await self._fetch("SELECT 1 FROM pools WHERE org = $1 AND name = $2", org, pool))

    async def pool_cert_ttl(self, org: str, pool: str) -> timedelta | None:
        rows = await self._fetch("SELECT agent_cert_ttl_s FROM pools WHERE org = $1 AND name = $2", org, pool)
        if not rows or rows[0]["agent_cert_ttl_s"] is None:
            return None
        return timedelta(seconds=rows[0]["agent_cert_ttl_s"])

    async def set_pool_cert_ttl(self, org: str, pool: str, ttl: timedelta | None) -> None:
        seconds = int(ttl.total_seconds()) if ttl else None

        async def run(c: PgConnection) -> None:
            if (
                await c.execute(
                    "UPDATE pools SET agent_cert_ttl_s = $1 WHERE org = $2 AND name = $3", seconds, org, pool
                )
                != 1
            ):
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    async def list_pools(self, org: str | None = None) -> list[PoolRecord]:
        rows = await self._fetch(
            "SELECT p.*,"
            " (SELECT count(*) FROM agents a WHERE a.org = p.org AND a.pool = p.name"
            "  AND a.revoked_at IS NULL) AS agents_enrolled,"
            " (SELECT count(*) FROM jobs j WHERE j.org = p.org AND j.pool = p.name"
            "  AND j.status = $1) AS jobs_queued,"
            " (SELECT count(*) FROM jobs j WHERE j.org = p.org AND j.pool = p.name"
            "  AND j.status IN ($2, $3)) AS jobs_running"
            " FROM pools p WHERE $4::text IS NULL OR p.org = $4 ORDER BY p.org, p.name",
            JobStatus.QUEUED.value,
            JobStatus.ASSIGNED.value,
            JobStatus.RUNNING.value,
            org,
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
                r["created_at"],
                r["agents_enrolled"],
                r["jobs_queued"],
                r["jobs_running"],
            )
            for r in rows
        ]

    async def set_pool_paused(self, org: str, pool: str, paused: bool, now: datetime) -> None:
        async def run(c: PgConnection) -> None:
            changed = await c.execute(
                "UPDATE pools SET paused = $1,"
                " resumed_at = CASE WHEN $1 = 1 THEN resumed_at ELSE $2 END WHERE org = $3 AND name = $4",
                int(paused),
                now,
                org,
                pool,
            )
            if changed != 1:
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    async def pools_resumed_since(self, since: datetime) -> list[tuple[str, str]]:
        rows = await self._fetch("SELECT org, name FROM pools WHERE paused = 0 AND resumed_at >= $1", since)
        return [(r["org"], r["name"]) for r in rows]

    async def revoke_org(self, org: str, now: datetime) -> dict[str, int] | None:
        """Revoke everything an organisation acts through, in one transaction. The
        organisation's row is locked first: a key or user being added to it (its
        foreign key share-locks that row) commits before, and is revoked, or waits."""

        async def run(c: PgConnection) -> dict[str, int] | None:
            if await c.fetchrow("SELECT 1 FROM orgs WHERE name = $1 FOR UPDATE", org) is None:
                return None
            counts = {}
            for table in ("api_keys", "users", "refresh_tokens", "agents", "enrollment_tokens"):
                counts[table] = await c.execute(
                    # The table names are the constants above; the values travel as parameters.
                    f"UPDATE {table} SET revoked_at = COALESCE(revoked_at, $1) WHERE org = $2",  # noqa: S608
                    now,
                    org,
                )
            await c.execute("UPDATE orgs SET revoked_at = COALESCE(revoked_at, $1) WHERE name = $2", now, org)
            return counts

        return await self._tx(run)

    async def list_orgs(self) -> list[str]:
        return [r["name"] for r in await self._fetch("SELECT name FROM orgs ORDER BY name")]

    # enrollment tokens and agents --------------------------------------------
    async def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO enrollment_tokens (id, org, pool, secret_hash, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                record.id,
                record.org,
                record.pool,
                record.secret_hash,
                record.created_at,
                record.expires_at,
            )
        )

    @staticmethod
    async def _usable_token(
        c: PgConnection, token_id: str, secret_hash: bytes, now: datetime, lock: bool
    ) -> EnrollmentTokenRecord:
        """The token if it can enroll an agent at ``now``; any reason for refusal is
        the same error, so a caller learns nothing about which tokens exist. With
        ``lock`` the row is locked before it is checked: a second redemption waits
        for the first and then finds it used."""
        sql = _FIND_ENROLLMENT_LOCKED if lock else _FIND_ENROLLMENT
        row = await c.fetchrow(sql, token_id)
        if (
            row is None
            or not hmac.compare_digest(bytes(row["secret_hash"]), secret_hash)
            or row["used_at"] is not None
            or row["revoked_at"] is not None
            or row["expires_at"] <= now
        ):
            raise Unauthenticated("the enrollment token is invalid, expired, revoked or already used")
        return PgAgents._token(row)

    async def consume_enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        """Mark the token used, atomically. A wrong secret changes nothing."""

        async def run(c: PgConnection) -> EnrollmentTokenRecord:
            record = await self._usable_token(c, token_id, secret_hash, now, lock=True)
            await c.execute("UPDATE enrollment_tokens SET used_at = $1 WHERE id = $2", now, token_id)
            return replace(record, used_at=now)

        return await self._tx(run)

    async def enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        return await self._read(lambda c: self._usable_token(c, token_id, secret_hash, now, lock=False))

    async def enroll_agent(
        self, token_id: str, secret_hash: bytes, now: datetime, agent: AgentRecord
    ) -> EnrollmentTokenRecord:
        """The token spent and the agent added, or neither (a failed insert rolls the spending back)."""

        async def run(c: PgConnection) -> EnrollmentTokenRecord:
            record = await self._usable_token(c, token_id, secret_hash, now, lock=True)
            if (record.org, record.pool) != (agent.org, agent.pool):
                raise Unauthenticated("the enrollment token is invalid, expired, revoked or already used")
            await c.execute("UPDATE enrollment_tokens SET used_at = $1 WHERE id = $2", now, token_id)
            await self._insert_agent(c, agent)
            return replace(record, used_at=now)

        return await self._tx(run)

    @staticmethod
    def _token(r: Row) -> EnrollmentTokenRecord:
        return EnrollmentTokenRecord(
            r["id"],
            r["org"],
            r["pool"],
            bytes(r["secret_hash"]),
            r["created_at"],
            r["expires_at"],
            r["used_at"],
            r["revoked_at"],
        )

    async def list_enrollment_tokens(self, org: str | None = None) -> list[EnrollmentTokenRecord]:
        rows = await self._fetch(
            "SELECT * FROM enrollment_tokens WHERE $1::text IS NULL OR org = $1 ORDER BY created_at, id", org
        )
        return [self._token(r) for r in rows]

    async def revoke_enrollment_token(self, token_id: str, now: datetime) -> EnrollmentTokenRecord | None:
        async def run(c: PgConnection) -> EnrollmentTokenRecord | None:
            await c.execute(
                "UPDATE enrollment_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                now,
                token_id,
            )
            row = await c.fetchrow("SELECT * FROM enrollment_tokens WHERE id = $1", token_id)
            return self._token(row) if row else None

        return await self._tx(run)

    async def create_agent(self, record: AgentRecord) -> None:
        await self._tx(lambda c: self._insert_agent(c, record))

    @staticmethod
    async def _insert_agent(c: PgConnection, record: AgentRecord) -> None:
        await c.execute(
            "INSERT INTO agents"
            " (id, org, pool, name, cert_serial, cert_not_after, enrolled_at, cert_issuer)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            record.id,
            record.org,
            record.pool,
            record.name,
            record.cert_serial,
            record.cert_not_after,
            record.enrolled_at,
            record.cert_issuer,
        )

    @staticmethod
    def _agent(r: Row, running_jobs: int = 0) -> AgentRecord:
        return AgentRecord(
            r["id"],
            r["org"],
            r["pool"],
            r["name"],
            r["cert_serial"],
            r["cert_not_after"],
            r["enrolled_at"],
            r["last_seen_at"],
            r["revoked_at"],
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
        rows = await self._fetch("SELECT * FROM agents WHERE org = $1 AND id = $2", org, agent_id)
        return self._agent(rows[0]) if rows else None

    async def list_agents(self, org: str | None = None) -> list[AgentRecord]:
        rows = await self._fetch(
            "SELECT a.*, (SELECT count(*) FROM jobs j WHERE j.org = a.org AND j.agent_id = a.id"
            " AND j.status IN ($1, $2)) AS running_jobs"
            " FROM agents a WHERE $3::text IS NULL OR a.org = $3 ORDER BY a.org, a.pool, a.enrolled_at, a.id",
            JobStatus.ASSIGNED.value,
            JobStatus.RUNNING.value,
            org,
        )
        return [self._agent(r, r["running_jobs"]) for r in rows]

    async def revoke_agent(self, agent_id: str, now: datetime) -> tuple[AgentRecord, list[str]] | None:
        """The agent's unfinished jobs end as ERROR in one conditional update: a
        job another replica releases meanwhile is that replica's (and not here)."""

        async def run(c: PgConnection) -> tuple[AgentRecord, list[str]] | None:
            row = await c.fetchrow(
                "UPDATE agents SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING *",
                now,
                agent_id,
            )
            if row is None:
                return None
            reason = f"agent {agent_id} was revoked"
            ended = await c.fetch(
                "UPDATE jobs SET status = $1, status_reason = $2, finished_at = $3"
                " WHERE org = $4 AND agent_id = $5 AND status IN ($6, $7) RETURNING id",
                JobStatus.ERROR.value,
                reason,
                now,
                row["org"],
                agent_id,
                JobStatus.ASSIGNED.value,
                JobStatus.RUNNING.value,
            )
            jobs = sorted(str(r["id"]) for r in ended)
            for job_id in jobs:
                await self._add_transition(c, job_id, JobStatus.ERROR, now, reason)
            return self._agent(row), jobs

        return await self._tx(run)

    async def agents_revoked_since(self, since: datetime) -> list[AgentRecord]:
        rows = await self._fetch(
            "SELECT * FROM agents WHERE revoked_at IS NOT NULL AND revoked_at >= $1", since
        )
        return [self._agent(r) for r in rows]

    async def touch_agent(
        self, org: str, agent_id: str, now: datetime, hello: AgentHello | None = None
    ) -> None:
        """Last contact; with ``hello``, also what the agent announced. Which replica
        holds the stream is the cluster's mark (``set_agent_replica``). Every
        heartbeat: one autocommit statement, no BEGIN and COMMIT around it."""
        if hello is None:
            sql = "UPDATE agents SET last_seen_at = $1 WHERE org = $2 AND id = $3"
            args: tuple[object, ...] = (now, org, agent_id)
        else:
            sql = (
                "UPDATE agents SET last_seen_at = $1, version = $4, labels = $5, runtimes = $6,"
                " max_jobs = $7, host = $8 WHERE org = $2 AND id = $3"
            )
            args = (
                now,
                org,
                agent_id,
                hello.version,
                json.dumps(hello.labels, sort_keys=True),
                " ".join(hello.runtimes),
                hello.max_jobs,
                hello.host,
            )
        await self._read(lambda c: c.execute(sql, *args))

    async def job_agents(self, org: str, agent_ids: set[str]) -> dict[str, JobAgent]:
        if not agent_ids:
            return {}
        rows = await self._fetch(
            "SELECT id, name, host, version, pool FROM agents WHERE org = $1 AND id = ANY($2::text[])",
            org,
            sorted(agent_ids),
        )
        return {r["id"]: JobAgent(r["id"], r["name"], r["host"], r["version"], r["pool"]) for r in rows}

    async def agent_disconnected(self, org: str, agent_id: str, now: datetime) -> None:
        await self._read(
            lambda c: c.execute(
                "UPDATE agents SET last_seen_at = $1 WHERE org = $2 AND id = $3", now, org, agent_id
            )
        )

    async def record_agent_renewals(
        self, renewals: Sequence[CertificateRenewal], chain: AuditChain
    ) -> list[bool]:
        """One statement for every agent's row; a revocation committed meanwhile wins
        (READ COMMITTED re-checks ``revoked_at`` once the row lock is had)."""

        async def run(c: PgConnection) -> list[bool]:
            rows = await c.fetch(
                "UPDATE agents AS a SET cert_serial = u.serial, cert_not_after = u.not_after,"
                " cert_issuer = u.issuer"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])"
                " AS u(org, id, serial, not_after, issuer)"
                " WHERE a.org = u.org AND a.id = u.id AND a.revoked_at IS NULL"
                " RETURNING a.org, a.id, a.cert_serial",
                [r.org for r in renewals],
                [r.agent_id for r in renewals],
                [r.serial for r in renewals],
                [r.not_after for r in renewals],
                [r.issuer for r in renewals],
            )
            done = {(row["org"], row["id"], row["cert_serial"]) for row in rows}
            recorded = [(r.org, r.agent_id, r.serial) in done for r in renewals]
            await append_audit_entries(
                c, [r.event for r, ok in zip(renewals, recorded, strict=True) if ok], chain
            )
            return recorded

        return await self._tx(run)
