"""``incident agent``: everything a suspect agent touched, from the stored evidence
(`operations/incident.py`), for the first hour of an incident."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from testhide.common.incident_text import incident_lines
from testhide.common.since import Since
from testhide.controlplane.commands.agents import operator_actor, rfc3339, stream_holders
from testhide.controlplane.commands.common import data_dir_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.operations.incident import IncidentReport, JobScope, SecretExposure, agent_incident
from testhide.controlplane.operator import operator_context


@click.group()
def incident() -> None:
    """The scope of an incident, from the stored evidence."""


@incident.command("agent")
@data_dir_option
@click.argument("agent_id")
@click.option(
    "--since", type=Since(), default=None, help="Only jobs not finished before: 2h, 3d or an RFC 3339 time."
)
@click.option("--json", "as_json", is_flag=True)
def incident_agent(data_dir: Path, agent_id: str, since: datetime | None, as_json: bool) -> None:
    """Everything AGENT_ID (of any organisation) touched: each job it was handed with its
    org, pool, image and times; the secrets those jobs received, by name (never a value);
    the artifacts and test results they produced; and whether each job still verifies.
    Audited with you as the actor."""

    async def run() -> dict[str, Any]:
        async with operator_context(data_dir) as op:
            report = await agent_incident(
                operator_actor(op),
                LogBook(op.store, op.master),
                None,
                agent_id,
                since,
                await stream_holders(op),
            )
            return incident_json(report)

    document = _run(run())
    click.echo(json.dumps(document, indent=2) if as_json else "\n".join(incident_lines(document)))


def incident_json(report: IncidentReport) -> dict[str, Any]:
    a = report.agent.record
    return {
        "agent": {
            "id": a.id,
            "name": a.name,
            "org": a.org,
            "pool": a.pool,
            "host": a.host,
            "version": a.version or None,
            "state": report.agent.state,
            "enrolled_at": rfc3339(a.enrolled_at),
            "last_seen_at": rfc3339(a.last_seen_at),
            "revoked_at": rfc3339(a.revoked_at),
            "cert_expires_at": rfc3339(a.cert_not_after),
            "cert_serial": a.cert_serial,
        },
        "certificates": [
            {
                "serial": c.serial,
                "event": c.event,
                "issued_at": rfc3339(c.issued_at),
                "expires_at": rfc3339(c.not_after),
            }
            for c in report.certificates
        ],
        "since_at": rfc3339(report.since),
        "truncated": report.truncated,
        "jobs": [_job_json(a.org, j) for j in report.jobs],
        "secrets": [_secret_json(s) for s in report.secrets],
        "summary": {
            "jobs": len(report.jobs),
            "secrets_exposed": len(report.secrets),
            "artifacts": report.artifacts,
            "verified": report.verdicts(True),
            "failed": report.verdicts(False),
            "unknown": report.verdicts(None),
        },
    }


def _job_json(org: str, scope: JobScope) -> dict[str, Any]:
    record, job = scope.record, scope.record.job
    tests = record.tests
    return {
        "id": job.id,
        "org": org,
        "pool": job.spec.pool,
        "image": job.spec.image,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "status_reason": job.status_reason,
        "attempt": job.attempt,
        "created_at": rfc3339(job.created_at),
        "assigned_at": rfc3339(record.assigned_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "held": record.held,
        "secrets": list(job.spec.secrets),
        "fetch_secrets": list(job.spec.fetch_secrets),
        "workspace_id": job.spec.workspace_id or None,
        "artifacts": [{"path": b.path, "size": b.size, "sha256": b.sha256} for b in record.artifacts],
        "tests": None
        if tests is None
        else {
            "passed": tests.passed,
            "failed": tests.failed,
            "errors": tests.errors,
            "skipped": tests.skipped,
            "unreadable_reports": tests.unreadable_reports,
        },
        "verifies": scope.verdict.verifies,
        "verdict": scope.verdict.reason,
    }


def _secret_json(exposure: SecretExposure) -> dict[str, Any]:
    info = exposure.info
    return {
        "name": exposure.name,
        "job_ids": list(exposure.job_ids),
        "last_handed_at": rfc3339(exposure.last_handed_at),
        "deleted": info is None,
        "updated_at": rfc3339(info.updated_at) if info else None,
        "changed_since": exposure.changed_since,
        "last_used_at": rfc3339(info.last_used_at) if info else None,
        "last_used_by_job": (info.last_used_by_job or None) if info else None,
    }
