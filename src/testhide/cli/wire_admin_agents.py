"""The Admin service's ``agents:admin`` messages, and `Jobs.ListPools`'s pools, in the CLI's
model (used by `cli/wire.py`): enrollment tokens, agents and pools as `testhide admin` and
`testhide pools list` show them; and the scope of an incident (`testhide admin incident agent`)."""

from __future__ import annotations

from typing import Any

from testhide.cli.model import AgentInfo, EnrollmentTokenInfo, PoolInfo
from testhide.cli.wire_convert import job_status_from_pb, time_of
from testhide.protos.v1 import admin_pb2, jobs_pb2


def token_from_pb(token: admin_pb2.EnrollmentToken) -> EnrollmentTokenInfo:
    return EnrollmentTokenInfo(
        id=token.id,
        pool=token.pool,
        created_at=time_of(token, "created_at"),
        expires_at=time_of(token, "expires_at"),
        used_at=time_of(token, "used_at"),
        revoked_at=time_of(token, "revoked_at"),
        state=token.state,
    )


def enrolled_agent_from_pb(agent: admin_pb2.Agent) -> AgentInfo:
    return AgentInfo(
        id=agent.id,
        name=agent.name,
        pool=agent.pool,
        host=agent.host,
        version=agent.version,
        labels=dict(agent.labels),
        runtimes=tuple(agent.runtimes),
        max_jobs=agent.max_jobs,
        running_jobs=agent.running_jobs,
        state=agent.state,
        enrolled_at=time_of(agent, "enrolled_at"),
        last_seen_at=time_of(agent, "last_seen_at"),
        cert_not_after=time_of(agent, "cert_not_after"),
        revoked_at=time_of(agent, "revoked_at"),
    )


def pool_from_pb(pool: jobs_pb2.Pool) -> PoolInfo:
    return PoolInfo(
        name=pool.name,
        paused=pool.paused,
        allowed_images=tuple(pool.allowed_images),
        pull_policy=pool.pull_policy,
        runtime=pool.runtime,
        agent_cert_ttl_s=pool.agent_cert_ttl.ToTimedelta().total_seconds()
        if pool.HasField("agent_cert_ttl")
        else None,
        agents_enrolled=pool.agents_enrolled,
        agents_connected=pool.agents_connected,
        jobs_queued=pool.jobs_queued,
        jobs_running=pool.jobs_running,
        created_at=time_of(pool, "created_at"),
        egress_allow=tuple(pool.egress_allow),
    )


def _at(message: Any, name: str) -> str | None:
    """A time as every --json shows it: RFC 3339, UTC, microseconds, Z."""
    value = time_of(message, name)
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def incident_from_pb(report: admin_pb2.IncidentReport) -> dict[str, Any]:
    """`IncidentAgent`'s report as `testhide admin incident agent --json` prints it: the
    document `testhide-controlplane incident agent --json` prints too."""
    a = report.agent
    jobs = [_incident_job(report.org, j) for j in report.jobs]
    verdicts = [j["verifies"] for j in jobs]
    return {
        "agent": {
            "id": a.id,
            "name": a.name,
            "org": report.org,
            "pool": a.pool,
            "host": a.host,
            "version": a.version or None,
            "state": a.state,
            "enrolled_at": _at(a, "enrolled_at"),
            "last_seen_at": _at(a, "last_seen_at"),
            "revoked_at": _at(a, "revoked_at"),
            "cert_expires_at": _at(a, "cert_not_after"),
            "cert_serial": report.cert_serial,
        },
        "certificates": [
            {
                "serial": c.serial,
                "event": c.event,
                "issued_at": _at(c, "issued_at"),
                "expires_at": _at(c, "not_after"),
            }
            for c in report.certificates
        ],
        "since_at": _at(report, "since"),
        "truncated": report.truncated,
        "jobs": jobs,
        "secrets": [_incident_secret(s) for s in report.secrets],
        "summary": {
            "jobs": len(jobs),
            "secrets_exposed": len(report.secrets),
            "artifacts": sum(len(j["artifacts"]) for j in jobs),
            "verified": verdicts.count(True),
            "failed": verdicts.count(False),
            "unknown": verdicts.count(None),
        },
    }


def _incident_job(org: str, j: admin_pb2.IncidentJob) -> dict[str, Any]:
    t = j.tests
    return {
        "id": j.id,
        "org": org,
        "pool": j.pool,
        "image": j.image,
        "status": job_status_from_pb(j.status).value,
        "exit_code": j.exit_code if j.HasField("exit_code") else None,
        "status_reason": j.status_reason,
        "attempt": j.attempt,
        "created_at": _at(j, "created_at"),
        "assigned_at": _at(j, "assigned_at"),
        "started_at": _at(j, "started_at"),
        "finished_at": _at(j, "finished_at"),
        "held": j.held,
        "secrets": list(j.secrets),
        "fetch_secrets": list(j.fetch_secrets),
        "workspace_id": j.workspace_id or None,
        "artifacts": [{"path": x.path, "size": x.size, "sha256": x.sha256} for x in j.artifacts],
        "tests": {
            "passed": t.passed,
            "failed": t.failed,
            "errors": t.errors,
            "skipped": t.skipped,
            "unreadable_reports": t.unreadable_reports,
        }
        if j.HasField("tests")
        else None,
        "verifies": j.verifies if j.HasField("verifies") else None,
        "verdict": j.verdict,
    }


def _incident_secret(s: admin_pb2.IncidentSecret) -> dict[str, Any]:
    deleted = not s.HasField("updated_at")
    return {
        "name": s.name,
        "job_ids": list(s.job_ids),
        "last_handed_at": _at(s, "last_handed_at"),
        "deleted": deleted,
        "updated_at": _at(s, "updated_at"),
        "changed_since": s.changed_since,
        "last_used_at": _at(s, "last_used_at"),
        "last_used_by_job": None if deleted else (s.last_used_by_job or None),
    }
