"""protobuf <-> domain conversion, in one place."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.model import (
    Job,
    JobSpec,
    JobStatus,
    LogChunk,
    LogStream,
    Resources,
    TestCase,
    TestStatus,
)
from testhide.protos.v1 import jobs_pb2

_STATUS_TO_PB = {status: jobs_pb2.JobStatus.Value(f"JOB_STATUS_{status.value}") for status in JobStatus}
_STREAM_TO_PB = {stream: jobs_pb2.LogStream.Value(f"LOG_STREAM_{stream.name}") for stream in LogStream}
DEFAULT_RESOURCES = Resources()


def status_to_pb(status: JobStatus) -> jobs_pb2.JobStatus.ValueType:
    return _STATUS_TO_PB[status]


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def spec_from_pb(spec: jobs_pb2.JobSpec) -> JobSpec:
    r = spec.resources
    timeout = spec.timeout.ToTimedelta() if spec.HasField("timeout") else timedelta(hours=1)
    try:
        return JobSpec(
            image=spec.image,
            command=tuple(spec.command),
            env=dict(spec.env),
            pool=spec.pool or "default",
            timeout=timeout,
            resources=Resources(
                cpus=r.cpus or DEFAULT_RESOURCES.cpus,
                memory_bytes=r.memory_bytes or DEFAULT_RESOURCES.memory_bytes,
                pids=r.pids or DEFAULT_RESOURCES.pids,
            ),
            workdir=spec.workdir or "/workspace",
            labels=dict(spec.labels),
            secrets=tuple(spec.secrets),
            runtime=spec.runtime,
            artifact_globs=tuple(spec.artifact_globs),
            junit_globs=tuple(spec.junit_globs),
            workspace_id=spec.workspace_id,
            retries=spec.retries,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"invalid job spec: {exc}") from exc


def spec_to_pb(spec: JobSpec) -> jobs_pb2.JobSpec:
    pb = jobs_pb2.JobSpec(
        image=spec.image,
        command=list(spec.command),
        env=spec.env,
        pool=spec.pool,
        workdir=spec.workdir,
        labels=spec.labels,
        secrets=list(spec.secrets),
        runtime=spec.runtime,
        artifact_globs=list(spec.artifact_globs),
        junit_globs=list(spec.junit_globs),
        workspace_id=spec.workspace_id,
        retries=spec.retries,
        resources=jobs_pb2.Resources(
            cpus=spec.resources.cpus, memory_bytes=spec.resources.memory_bytes, pids=spec.resources.pids
        ),
    )
    pb.timeout.FromTimedelta(spec.timeout)
    return pb


def job_to_pb(job: Job) -> jobs_pb2.Job:
    pb = jobs_pb2.Job(
        id=job.id,
        org=job.org,
        spec=spec_to_pb(job.spec),
        status=status_to_pb(job.status),
        status_reason=job.status_reason,
        created_at=_ts(job.created_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        agent_id=job.agent_id,
        log_size=job.log_size,
        transitions=[
            jobs_pb2.StatusTransition(status=status_to_pb(t.status), at=_ts(t.at), reason=t.reason)
            for t in job.transitions
        ],
        attempt=job.attempt,
        retry_of=job.retry_of,
        retried_as=job.retried_as,
    )
    if job.exit_code is not None:
        pb.exit_code = job.exit_code
    return pb


def chunk_to_pb(chunk: LogChunk) -> jobs_pb2.LogChunk:
    return jobs_pb2.LogChunk(offset=chunk.offset, stream=_STREAM_TO_PB[chunk.stream], data=chunk.data)


def stream_from_pb(value: int) -> LogStream:
    try:
        return LogStream(value)
    except ValueError as exc:
        raise InvalidArgument(f"unknown log stream {value}") from exc


_TEST_STATUS = {status: jobs_pb2.TestStatus.Value(f"TEST_STATUS_{status.value}") for status in TestStatus}


def test_results_to_pb(cases: list[TestCase], rejected: list[str]) -> jobs_pb2.TestResults:
    count = {status: sum(1 for c in cases if c.status == status) for status in TestStatus}
    return jobs_pb2.TestResults(
        total=len(cases),
        passed=count[TestStatus.PASSED],
        failed=count[TestStatus.FAILED],
        errors=count[TestStatus.ERROR],
        skipped=count[TestStatus.SKIPPED],
        rejected_reports=rejected,
        cases=[
            jobs_pb2.TestCase(
                suite=c.suite,
                classname=c.classname,
                name=c.name,
                duration_s=c.duration_s,
                status=_TEST_STATUS[c.status],
                message=c.message,
            )
            for c in cases
        ],
    )


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts
