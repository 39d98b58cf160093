"""The scope of an incident (``operations/incident.py``) as the Admin service's ``IncidentReport``."""

from __future__ import annotations

from testhide.controlplane.operations.incident import IncidentReport, JobScope, SecretExposure
from testhide.controlplane.rpc.convert import status_to_pb, timestamp
from testhide.controlplane.store.incident import AgentCertificate
from testhide.protos.v1 import admin_pb2


def incident_to_pb(report: IncidentReport, agent: admin_pb2.Agent) -> admin_pb2.IncidentReport:
    pb = admin_pb2.IncidentReport(
        agent=agent,
        org=report.agent.record.org,
        cert_serial=report.agent.record.cert_serial,
        certificates=[_certificate_to_pb(c) for c in report.certificates],
        jobs=[_job_to_pb(j) for j in report.jobs],
        secrets=[_secret_to_pb(s) for s in report.secrets],
        truncated=report.truncated,
    )
    if report.since is not None:
        pb.since.CopyFrom(timestamp(report.since))
    return pb


def _certificate_to_pb(certificate: AgentCertificate) -> admin_pb2.IncidentCertificate:
    pb = admin_pb2.IncidentCertificate(
        serial=certificate.serial, issued_at=timestamp(certificate.issued_at), event=certificate.event
    )
    if certificate.not_after is not None:
        pb.not_after.CopyFrom(timestamp(certificate.not_after))
    return pb


def _job_to_pb(scope: JobScope) -> admin_pb2.IncidentJob:
    record, job = scope.record, scope.record.job
    pb = admin_pb2.IncidentJob(
        id=job.id,
        pool=job.spec.pool,
        image=job.spec.image,
        status=status_to_pb(job.status),
        status_reason=job.status_reason,
        attempt=job.attempt,
        created_at=timestamp(job.created_at),
        held=record.held,
        secrets=list(job.spec.secrets),
        fetch_secrets=list(job.spec.fetch_secrets),
        workspace_id=job.spec.workspace_id,
        artifacts=[
            admin_pb2.IncidentArtifact(path=a.path, size=a.size, sha256=a.sha256) for a in record.artifacts
        ],
        verdict=scope.verdict.reason,
    )
    if job.exit_code is not None:
        pb.exit_code = job.exit_code
    for name, value in (
        ("assigned_at", record.assigned_at),
        ("started_at", job.started_at),
        ("finished_at", job.finished_at),
    ):
        if value is not None:
            getattr(pb, name).CopyFrom(timestamp(value))
    if record.tests is not None:
        t = record.tests
        pb.tests.CopyFrom(
            admin_pb2.IncidentTests(
                passed=t.passed,
                failed=t.failed,
                errors=t.errors,
                skipped=t.skipped,
                unreadable_reports=t.unreadable_reports,
            )
        )
    if scope.verdict.verifies is not None:
        pb.verifies = scope.verdict.verifies
    return pb


def _secret_to_pb(exposure: SecretExposure) -> admin_pb2.IncidentSecret:
    pb = admin_pb2.IncidentSecret(
        name=exposure.name, job_ids=list(exposure.job_ids), changed_since=exposure.changed_since
    )
    if exposure.last_handed_at is not None:
        pb.last_handed_at.CopyFrom(timestamp(exposure.last_handed_at))
    if exposure.info is not None:
        pb.updated_at.CopyFrom(timestamp(exposure.info.updated_at))
        pb.last_used_by_job = exposure.info.last_used_by_job
        if exposure.info.last_used_at is not None:
            pb.last_used_at.CopyFrom(timestamp(exposure.info.last_used_at))
    return pb
