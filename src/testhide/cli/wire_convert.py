"""The CLI's conversions between the generated messages and its own model
(`cli/model.py`): with `cli/wire.py`, which calls with them, and the admin
conversions (`wire_admin_*.py`), the only modules of the command that see
generated code."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.timestamp_pb2 import Timestamp

from testhide.cli.bundle import JobEvidence, JobRecord, LogBatch
from testhide.cli.config import Login
from testhide.cli.model import (
    ApiKeyLogin,
    Artifact,
    ArtifactKind,
    EgressRequest,
    FetchStep,
    Isolation,
    Job,
    JobAgent,
    JobQuery,
    JobRequest,
    JobSpec,
    JobStatus,
    LogChunk,
    LogStream,
    PasswordLogin,
    Secret,
    Service,
    ServiceIsolation,
    TestCase,
    TestResults,
    TestStatus,
    Transition,
)
from testhide.common.isolation import fields_of
from testhide.protos.v1 import auth_pb2, jobs_pb2

V = TypeVar("V")


def _name(value: V, names: Callable[[V], str], prefix: str) -> str:
    try:
        return names(value).removeprefix(prefix)
    except ValueError:  # a newer server's value
        return "UNSPECIFIED"


def job_status_from_pb(value: jobs_pb2.JobStatus.ValueType) -> JobStatus:
    return JobStatus(_name(value, jobs_pb2.JobStatus.Name, "JOB_STATUS_"))


def time_of(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def job_from_pb(job: jobs_pb2.Job) -> Job:
    return Job(
        id=job.id,
        status=job_status_from_pb(job.status),
        exit_code=job.exit_code if job.HasField("exit_code") else None,
        status_reason=job.status_reason,
        image=job.spec.image,
        command=tuple(job.spec.command),
        pool=job.spec.pool,
        agent_id=job.agent_id or None,
        created_at=time_of(job, "created_at"),
        started_at=time_of(job, "started_at"),
        finished_at=time_of(job, "finished_at"),
        log_size=job.log_size,
        transitions=tuple(
            Transition(job_status_from_pb(t.status), t.at.ToDatetime(tzinfo=UTC), t.reason)
            for t in job.transitions
        ),
        attempt=job.attempt,
        retries=job.spec.retries,
        retry_of=job.retry_of or None,
        retried_as=job.retried_as or None,
        spec=job_spec_from_pb(job.spec),
        agent=agent_from_pb(job.agent) if job.HasField("agent") else None,
        isolation=isolation_from_pb(job.isolation) if job.HasField("isolation") else None,
        fetch=fetch_from_pb(job.fetch) if job.HasField("fetch") else None,
        service_isolation=tuple(
            ServiceIsolation(s.name, isolation_from_pb(s.isolation)) for s in job.service_isolation
        ),
    )


def spec_to_pb(request: JobRequest) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(
        image=request.image,
        command=list(request.command),
        pool=request.pool,
        workdir=request.workdir,
        env=request.env,
        labels=request.labels,
        resources=jobs_pb2.Resources(cpus=request.cpus, memory_bytes=request.memory_bytes, pids=request.pids),
        secrets=list(request.secrets),
        runtime=request.runtime,
        artifact_globs=list(request.artifact_globs),
        junit_globs=list(request.junit_globs),
        retries=request.retries,
        workspace_id=request.workspace_id,
        fetch=request.fetch,
        fetch_secrets=list(request.fetch_secrets),
        cache=request.cache,
        services=[service_to_pb(s) for s in request.services],
    )
    spec.timeout.FromTimedelta(request.timeout)
    return spec


def chunk_from_pb(chunk: jobs_pb2.LogChunk) -> LogChunk:
    return LogChunk(
        chunk.offset, LogStream(_name(chunk.stream, jobs_pb2.LogStream.Name, "LOG_STREAM_")), chunk.data
    )


def results_from_pb(results: jobs_pb2.TestResults) -> TestResults:
    return TestResults(
        total=results.total,
        passed=results.passed,
        failed=results.failed,
        errors=results.errors,
        skipped=results.skipped,
        cases=tuple(
            TestCase(
                suite=c.suite,
                classname=c.classname,
                name=c.name,
                duration_s=c.duration_s,
                status=TestStatus(_name(c.status, jobs_pb2.TestStatus.Name, "TEST_STATUS_")),
                message=c.message,
            )
            for c in results.cases
        ),
        rejected_reports=tuple(results.rejected_reports),
    )


def secret_from_pb(secret: jobs_pb2.Secret) -> Secret:
    return Secret(
        secret.name,
        time_of(secret, "updated_at"),
        last_used_at=time_of(secret, "last_used_at"),
        last_used_by_job=secret.last_used_by_job or None,
    )


def list_request_pb(query: JobQuery, page_size: int, page_token: str) -> jobs_pb2.ListJobsRequest:
    request = jobs_pb2.ListJobsRequest(
        page_size=page_size,
        page_token=page_token,
        statuses=[jobs_pb2.JobStatus.Value(f"JOB_STATUS_{s.value}") for s in query.statuses],
        labels=query.labels,
        pool=query.pool,
    )
    if query.since is not None:
        request.since.FromDatetime(query.since)
    return request


def login_request(credential: ApiKeyLogin | PasswordLogin) -> auth_pb2.LoginRequest:
    if isinstance(credential, ApiKeyLogin):
        return auth_pb2.LoginRequest(api_key=credential.api_key)
    return auth_pb2.LoginRequest(
        password=auth_pb2.PasswordLogin(
            org=credential.org, user=credential.user, password=credential.password
        ),
        totp_code=credential.totp_code,
        recovery_code=credential.recovery_code,
    )


def password_pb(credential: PasswordLogin) -> auth_pb2.PasswordLogin:
    return auth_pb2.PasswordLogin(org=credential.org, user=credential.user, password=credential.password)


def stored_login(pair: auth_pb2.TokenPair, login: Login) -> Login:
    return replace(
        login,
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        access_expires_at=time.time() + pair.access_expires_in_s,
        refresh_expires_at=time.time() + pair.refresh_expires_in_s,
    )


def job_spec_from_pb(spec: jobs_pb2.JobSpec) -> JobSpec:
    return JobSpec(
        image=spec.image,
        command=tuple(spec.command),
        env=dict(sorted(spec.env.items())),
        pool=spec.pool,
        workdir=spec.workdir,
        timeout_s=spec.timeout.ToTimedelta().total_seconds(),
        labels=dict(sorted(spec.labels.items())),
        secrets=tuple(spec.secrets),
        runtime=spec.runtime,
        cpus=spec.resources.cpus,
        memory_bytes=spec.resources.memory_bytes,
        pids=spec.resources.pids,
        artifact_globs=tuple(spec.artifact_globs),
        junit_globs=tuple(spec.junit_globs),
        workspace_id=spec.workspace_id,
        fetch=spec.fetch,
        fetch_secrets=tuple(spec.fetch_secrets),
        cache=spec.cache,
        services=tuple(service_from_pb(s) for s in spec.services),
    )


def service_to_pb(service: Service) -> jobs_pb2.ServiceSpec:
    return jobs_pb2.ServiceSpec(
        name=service.name,
        image=service.image,
        command=list(service.command),
        env=service.env,
        tmpfs=list(service.tmpfs),
    )


def service_from_pb(service: jobs_pb2.ServiceSpec) -> Service:
    return Service(
        name=service.name,
        image=service.image,
        command=tuple(service.command),
        env=dict(sorted(service.env.items())),
        tmpfs=tuple(service.tmpfs),
    )


def fetch_from_pb(fetch: jobs_pb2.FetchStep) -> FetchStep:
    return FetchStep(
        cache=fetch.cache,
        exit_code=fetch.exit_code,
        duration_s=fetch.duration.ToTimedelta().total_seconds(),
        requests=tuple(
            EgressRequest(
                at=r.at.ToDatetime(tzinfo=UTC),
                method=r.method,
                host=r.host,
                port=r.port,
                allowed=r.allowed,
                http_status=r.http_status,
                bytes_sent=r.bytes_sent,
                bytes_received=r.bytes_received,
            )
            for r in fetch.requests
        ),
        isolation=isolation_from_pb(fetch.isolation) if fetch.HasField("isolation") else None,
        running=fetch.running,
    )


# Where the agent uploads a service's output (agent.proto, ARTIFACT_KIND_SERVICE_LOG); the
# listing of a job's artifacts carries no kind, so the path says it.
SERVICE_LOG_DIR = "services/"
SERVICE_LOG_SUFFIX = ".log"


def service_log_path(service: str) -> str:
    return f"{SERVICE_LOG_DIR}{service}{SERVICE_LOG_SUFFIX}"


def artifact_from_pb(artifact: jobs_pb2.Artifact) -> Artifact:
    path = artifact.path
    name = path.removeprefix(SERVICE_LOG_DIR).removesuffix(SERVICE_LOG_SUFFIX)
    is_log = path == service_log_path(name) and "/" not in name and bool(name)
    kind = ArtifactKind.SERVICE_LOG if is_log else ArtifactKind.FILE
    return Artifact(path, artifact.size, artifact.sha256, kind)


def agent_from_pb(agent: jobs_pb2.JobAgent) -> JobAgent:
    return JobAgent(agent.id, agent.name, agent.host, agent.version, agent.pool)


def isolation_from_pb(i: jobs_pb2.Isolation) -> Isolation:
    return fields_of(i)


# `testhide verify` (cli/bundle.py) ------------------------------------------------------------


def job_record_from_pb(job: jobs_pb2.Job) -> JobRecord:
    return JobRecord(
        job_from_pb(job),
        job.org,
        MessageToDict(job.spec, preserving_proto_field_name=True),
        MessageToDict(job, preserving_proto_field_name=True),
    )


def job_record_from_wire(wire: dict[str, Any]) -> JobRecord:
    """A bundle's job record (ValueError if it is not a Job in protobuf's JSON mapping)."""
    try:
        job = ParseDict(wire, jobs_pb2.Job())
    except ParseError as exc:
        raise ValueError(f"the job record is not a testhide.v1.Job: {exc}") from exc
    return job_record_from_pb(job)


def evidence_from_pb(evidence: jobs_pb2.Evidence) -> JobEvidence:
    return JobEvidence(
        evidence.payload_type,
        evidence.payload,
        tuple((s.keyid, s.sig) for s in evidence.signatures),
        evidence.agent_certificate,
        tuple(evidence.agent_ca_certificates),
        tuple(evidence.signing_certificates),
        evidence.mismatch,
        evidence.in_toto_envelope,
    )


def log_batch_from_pb(batch: jobs_pb2.LogBatchRecord) -> LogBatch:
    return batch.seq, batch.chain, [(int(e.stream), e.data) for e in batch.entries]
