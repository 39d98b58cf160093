"""The scope of an incident on SQLite (``store/incident.py``): one read transaction for the
jobs an agent was handed and what they produced."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

from testhide.controlplane.jobs.model import TestStatus
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
from testhide.controlplane.store.sqlite_agents import SqliteAgents
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts
from testhide.controlplane.store.sqlite_job_files import jobs_blobs
from testhide.controlplane.store.sqlite_jobs import SqliteJobData

# The jobs it holds or held, and those handed to it and taken back. The literal 'ASSIGNED' (not
# a parameter) lets SQLite use the partial index job_assignments.
_AGENT_JOBS = (
    "SELECT * FROM jobs WHERE org = ? AND id IN (SELECT id FROM jobs WHERE agent_id = ? AND org = ?"
    " UNION SELECT job_id FROM job_transitions WHERE status = 'ASSIGNED' AND reason = ?)"
    " AND (? IS NULL OR finished_at IS NULL OR finished_at >= ?) ORDER BY id DESC LIMIT ?"
)


class SqliteIncident(SqliteParts):
    async def incident_agent(self, agent_id: str, org: str | None) -> AgentRecord | None:
        rows = await self._query(
            "SELECT * FROM agents WHERE id = ? AND (? IS NULL OR org = ?)", (agent_id, org, org)
        )
        return SqliteAgents._agent(rows[0]) if rows else None

    async def agent_certificates(self, org: str, agent_id: str) -> list[AgentCertificate]:
        rows = await self._query(
            "SELECT at, action, details FROM audit_log WHERE target = ? AND org = ? AND action IN (?, ?)"
            " ORDER BY seq",
            (agent_id, org, *CERTIFICATE_EVENTS),
        )
        return [
            certificate_of(r["action"], _dt(r["at"]) or datetime.min, json.loads(r["details"])) for r in rows
        ]

    async def agent_jobs(
        self, org: str, agent_id: str, since: datetime | None, limit: int = MAX_INCIDENT_JOBS
    ) -> list[AgentJob]:
        reason = assignment_reason(agent_id)

        def run(c: sqlite3.Connection) -> list[AgentJob]:
            after = _ts(since.astimezone(UTC)) if since else None
            rows = c.execute(
                _AGENT_JOBS,
                (org, agent_id, org, reason, after, after, limit),
            ).fetchall()
            ids = json.dumps([r["id"] for r in rows])
            assigned = {
                r["job_id"]: _dt(r["at"])
                for r in c.execute(
                    "SELECT job_id, max(at) AS at FROM job_transitions WHERE status = 'ASSIGNED'"
                    " AND reason = ? AND job_id IN (SELECT value FROM json_each(?)) GROUP BY job_id",
                    (reason, ids),
                )
            }
            artifacts = jobs_blobs(c, org, ids, ("artifact",))
            tests = _tests(c, ids)
            return [
                AgentJob(
                    SqliteJobData._job(c, r),
                    assigned.get(r["id"]),
                    tuple(artifacts.get(r["id"], ())),
                    tests.get(r["id"]),
                    r["agent_id"] == agent_id,
                )
                for r in rows
            ]

        return await self._tx(run, write=False)


def _tests(c: sqlite3.Connection, ids: str) -> dict[str, TestSummary]:
    counts: dict[str, dict[str, int]] = {}
    for r in c.execute(
        "SELECT job_id, status, count(*) AS n FROM test_cases"
        " WHERE job_id IN (SELECT value FROM json_each(?)) GROUP BY job_id, status",
        (ids,),
    ):
        counts.setdefault(r["job_id"], {})[r["status"]] = r["n"]
    for r in c.execute(
        "SELECT job_id, sum(error <> '') AS n FROM test_reports"
        " WHERE job_id IN (SELECT value FROM json_each(?)) GROUP BY job_id",
        (ids,),
    ):
        counts.setdefault(r["job_id"], {})["rejected"] = r["n"]
    return {job_id: summary(n) for job_id, n in counts.items()}


def summary(counts: dict[str, int]) -> TestSummary:
    """Counts by test status (and ``rejected`` reports) as one summary."""
    return TestSummary(
        counts.get(TestStatus.PASSED.value, 0),
        counts.get(TestStatus.FAILED.value, 0),
        counts.get(TestStatus.ERROR.value, 0),
        counts.get(TestStatus.SKIPPED.value, 0),
        counts.get("rejected", 0),
    )
