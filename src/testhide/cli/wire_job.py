"""The parts of a job message that `jobs show` adds to the list view's:
its whole spec, its agent, and the isolation its agent read back (used by
`cli/wire.py`; with it the CLI's only modules that see generated messages)."""

from __future__ import annotations

from testhide.cli.model import Isolation, JobAgent, JobSpec
from testhide.common.isolation import fields_of
from testhide.protos.v1 import jobs_pb2


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
    )


def agent_from_pb(agent: jobs_pb2.JobAgent) -> JobAgent:
    return JobAgent(agent.id, agent.name, agent.host, agent.version, agent.pool)


def isolation_from_pb(i: jobs_pb2.Isolation) -> Isolation:
    return fields_of(i)
