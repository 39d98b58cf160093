"""The scope of an incident on PostgreSQL (``store/incident.py``): the same reads as SQLite's
(``sqlite_incident``), in one snapshot."""

from __future__ import annotations

import json
from datetime import datetime

from testhide.controlplane.store.base import AgentRecord
from testhide.controlplane.store.incident import (
    CERTIFICATE_EVENTS,
    MAX_INCIDENT_JOBS,
    AgentCertificate,
    AgentJob,
    TestSummary,
    assignment_reason,
    certificate_of,
)
from testhide.controlplane.store.pg_agents import PgAgents
from testhide.controlplane.store.pg_common import PgConnection, PgParts
from testhide.controlplane.store.pg_job_files import jobs_blobs
from testhide.controlplane.store.pg_jobs import PgJobData
from testhide.controlplane.store.sqlite_incident import summary

# As SQLite's (sqlite_incident): the literal 'ASSIGNED' matches the partial index job_assignments.
_AGENT_JOBS = (
    "SELECT * FROM jobs WHERE org = $1 AND id IN (SELECT id FROM jobs WHERE agent_id = $2 AND org = $1"
    " UNION SELECT job_id FROM job_transitions WHERE status = 'ASSIGNED' AND reason = $3)"
    " AND ($4::timestamptz IS NULL OR finished_at IS NULL OR finished_at >= $4) ORDER BY id DESC LIMIT $5"
)


class PgIncident(PgParts):
    async def incident_agent(self, agent_id: str, org: str | None) -> AgentRecord | None:
        rows = await self._fetch(
            "SELECT * FROM agents WHERE id = $1 AND ($2::text IS NULL OR org = $2)", agent_id, org
        )
        return PgAgents._agent(rows[0]) if rows else None

    async def agent_certificates(self, org: str, agent_id: str) -> list[AgentCertificate]:
        rows = await self._fetch(
            "SELECT at, action, details FROM audit_log WHERE target = $1 AND org = $2"
            " AND action = ANY($3::text[]) ORDER BY seq",
            agent_id,
            org,
            list(CERTIFICATE_EVENTS),
        )
        return [certificate_of(r["action"], r["at"], json.loads(r["details"])) for r in rows]

    async def agent_jobs(
        self, org: str, agent_id: str, since: datetime | None, limit: int = MAX_INCIDENT_JOBS
    ) -> list[AgentJob]:
        reason = assignment_reason(agent_id)

        async def run(c: PgConnection) -> list[AgentJob]:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = await c.fetch(
                _AGENT_JOBS,
                org,
                agent_id,
                reason,
                since,
                limit,
            )
            ids = [r["id"] for r in rows]
            assigned = {
                r["job_id"]: r["at"]
                for r in await c.fetch(
                    "SELECT job_id, max(at) AS at FROM job_transitions WHERE status = 'ASSIGNED'"
                    " AND reason = $1 AND job_id = ANY($2::text[]) GROUP BY job_id",
                    reason,
                    ids,
                )
            }
            artifacts = await jobs_blobs(c, org, ids, ("artifact",))
            tests = await _tests(c, ids)
            jobs = await PgJobData._jobs(c, rows)
            return [
                AgentJob(
                    job,
                    assigned.get(job.id),
                    tuple(artifacts.get(job.id, ())),
                    tests.get(job.id),
                    job.agent_id == agent_id,
                )
                for job in jobs
            ]

        return await self._tx(run)


async def _tests(c: PgConnection, ids: list[str]) -> dict[str, TestSummary]:
    counts: dict[str, dict[str, int]] = {}
    for r in await c.fetch(
        "SELECT job_id, status, count(*) AS n FROM test_cases WHERE job_id = ANY($1::text[])"
        " GROUP BY job_id, status",
        ids,
    ):
        counts.setdefault(r["job_id"], {})[r["status"]] = r["n"]
    for r in await c.fetch(
        "SELECT job_id, count(*) FILTER (WHERE error <> '') AS n FROM test_reports"
        " WHERE job_id = ANY($1::text[]) GROUP BY job_id",
        ids,
    ):
        counts.setdefault(r["job_id"], {})["rejected"] = r["n"]
    return {job_id: summary(n) for job_id, n in counts.items()}
