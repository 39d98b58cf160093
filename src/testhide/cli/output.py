"""What `testhide` prints: tables and summaries for people, and JSON with
one convention for every `--json`:

- one JSON document on stdout; every field always present, in a fixed order;
- field names in snake_case, as in the contract (`exit_code`, `rejected_reports`);
- enum values by their short upper-case name, without the type's prefix
  (`SUCCEEDED`, not `JOB_STATUS_SUCCEEDED`; `PASSED`, not `TEST_STATUS_PASSED`);
- times in RFC 3339, UTC, with microseconds and `Z` (`2030-01-02T03:04:05.000000Z`),
  so that they also sort as text;
- durations in seconds as numbers, in fields ending `_s`; sizes in bytes as integers;
- `null` for a value that does not exist (the exit code of a running job, a time
  not reached yet, the agent of a queued job); text that may be empty is `""`.
"""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from typing import Any

from testhide.cli.model import (
    AgentInfo,
    ApiKeyInfo,
    Artifact,
    ArtifactKind,
    EnrollmentTokenInfo,
    Isolation,
    Job,
    JobAgent,
    JobSpec,
    PoolInfo,
    Secret,
    TestResults,
    TestStatus,
    UserInfo,
)


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_json(job: Job) -> dict[str, Any]:
    """A job, whole: the top-level image/command/pool/agent_id stay for list views and scripts."""
    from testhide.cli.output_fetch import fetch_json  # which uses `timestamp` of this module

    return {
        "id": job.id,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "status_reason": job.status_reason,
        "image": job.image,
        "command": list(job.command),
        "pool": job.pool,
        "agent_id": job.agent_id,
        "attempt": job.attempt,
        "retries": job.retries,
        "retry_of": job.retry_of,
        "retried_as": job.retried_as,
        "created_at": timestamp(job.created_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "log_size": job.log_size,
        "spec": _spec_json(job.spec),
        "agent": _agent_json(job.agent),
        "isolation": isolation_json(job.isolation),
        "fetch": fetch_json(job.fetch),
        "service_isolation": [
            {"name": s.name, "isolation": isolation_json(s.isolation)} for s in job.service_isolation
        ],
        "transitions": [
            {"status": t.status.value, "at": timestamp(t.at), "reason": t.reason} for t in job.transitions
        ],
    }


def _spec_json(spec: JobSpec) -> dict[str, Any]:
    from testhide.cli.output_fetch import spec_fetch_json

    return {
        "image": spec.image,
        "command": list(spec.command),
        "env": dict(spec.env),
        "pool": spec.pool,
        "workdir": spec.workdir,
        "timeout_s": spec.timeout_s,
        "labels": dict(spec.labels),
        "secrets": list(spec.secrets),
        "runtime": spec.runtime,
        "cpus": spec.cpus,
        "memory_bytes": spec.memory_bytes,
        "pids": spec.pids,
        "artifact_globs": list(spec.artifact_globs),
        "junit_globs": list(spec.junit_globs),
        "workspace_id": spec.workspace_id,
        **spec_fetch_json(spec),
    }


def _agent_json(agent: JobAgent | None) -> dict[str, Any] | None:
    if agent is None:
        return None
    return {
        "id": agent.id,
        "name": agent.name,
        "host": agent.host,
        "version": agent.version,
        "pool": agent.pool,
    }


def isolation_json(i: Isolation | None) -> dict[str, Any] | None:
    """Any container's facts: the job's, its fetch step's (`output_fetch.py`), a service's."""
    if i is None:
        return None
    return {
        "runtime": i.runtime,
        "network_mode": i.network_mode,
        "interfaces": list(i.interfaces),
        "user": i.user,
        "cap_add": list(i.cap_add),
        "cap_drop": list(i.cap_drop),
        "no_new_privileges": i.no_new_privileges,
        "seccomp": i.seccomp,
        "read_only_root": i.read_only_root,
        "pids_limit": i.pids_limit,
        "memory_bytes": i.memory_bytes,
        "cpus": i.cpus,
        "image_id": i.image_id,
        "image_digest": i.image_digest,
        "mounts": list(i.mounts),
    }


def results_json(results: TestResults) -> dict[str, Any]:
    return {
        "total": results.total,
        "passed": results.passed,
        "failed": results.failed,
        "errors": results.errors,
        "skipped": results.skipped,
        "cases": [
            {
                "suite": case.suite,
                "classname": case.classname,
                "name": case.name,
                "duration_s": case.duration_s,
                "status": case.status.value,
                "message": case.message,
            }
            for case in results.cases
        ],
        "rejected_reports": list(results.rejected_reports),
    }


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


def jobs_table(jobs: list[Job]) -> list[str]:
    lines = [f"{'ID':<30} {'STATUS':<10} {'EXIT':>4}  {'CREATED':<20} {'IMAGE':<24} COMMAND"]
    for job in jobs:
        exit_code = "" if job.exit_code is None else str(job.exit_code)
        created = (timestamp(job.created_at) or "")[:19]
        command = " ".join(" ".join(job.command).split())[:60]
        status, image = job.status.value, job.image[:24]
        lines.append(f"{job.id:<30} {status:<10} {exit_code:>4}  {created:<20} {image:<24} {command}")
    return lines


def job_details(job: Job) -> list[str]:
    """`jobs show`: the job, its spec, its agent, its attempts, how it was isolated,
    and how it got where it is; what runs beside its command (`cli/output_fetch.py`)."""
    from testhide.cli.output_fetch import fetch_rows, fetch_step_lines, service_lines

    spec = job.spec
    env = " ".join(f"{k}={v}" for k, v in spec.env.items())
    rows = [
        ("id", job.id),
        ("status", job.status.value),
        ("exit code", job.exit_code),
        ("reason", job.status_reason),
        ("image", spec.image or job.image),
        ("command", shlex.join(spec.command or job.command)),
        ("pool", spec.pool or job.pool),
        ("workdir", spec.workdir),
        ("env", env),
        ("labels", " ".join(f"{k}={v}" for k, v in spec.labels.items())),
        ("secrets", " ".join(spec.secrets)),
        ("runtime", spec.runtime or "(pool default)"),
        ("limits", f"{spec.cpus:g} CPUs, {spec.memory_bytes} bytes memory, {spec.pids} pids"),
        ("timeout", f"{spec.timeout_s:g}s"),
        ("artifacts", " ".join(spec.artifact_globs)),
        ("junit", " ".join(spec.junit_globs)),
        ("workspace", spec.workspace_id),
        *fetch_rows(spec),
    ]
    lines = [_row(name, value) for name, value in rows] + service_lines(spec)
    rows = [
        ("agent", _agent_line(job)),
        ("attempt", _attempt_line(job)),
        ("created", timestamp(job.created_at)),
        ("started", timestamp(job.started_at)),
        ("finished", timestamp(job.finished_at)),
    ]
    lines += [_row(name, value) for name, value in rows] + fetch_step_lines(job)
    lines += ["isolation:"] + [f"  {line}" for line in _isolation_lines(job.isolation)]
    # The containers beside the job's own, each as its agent read it back.
    if job.fetch is not None and job.fetch.isolation is not None:
        lines += ["fetch step isolation:"] + [f"  {line}" for line in _isolation_lines(job.fetch.isolation)]
    for service in job.service_isolation:
        lines += [f"service {service.name} isolation:"]
        lines += [f"  {line}" for line in _isolation_lines(service.isolation)]
    lines.append("transitions:")
    lines.extend(f"  {timestamp(t.at)}  {t.status.value:<10} {t.reason}".rstrip() for t in job.transitions)
    if job.status_reason:
        lines.append(f"now {job.status.value}: {job.status_reason}")
    return lines


def _row(name: str, value: object) -> str:
    return f"{name + ':':<11} {value if value not in (None, '') else '-'}"


def _agent_line(job: Job) -> str:
    agent = job.agent
    if agent is None:
        return job.agent_id or ""
    version = agent.version or "?"
    return f"{agent.name} on {agent.host or '?'} (testhide {version}, id {agent.id}, pool {agent.pool})"


def _attempt_line(job: Job) -> str:
    line = f"{job.attempt} of {job.retries + 1}"
    if job.retry_of:
        line += f", retries {job.retry_of}"
    if job.retried_as:
        line += f", retried as {job.retried_as}"
    return line


def _isolation_lines(i: Isolation | None) -> list[str]:
    if i is None:
        return ["- (the container has not been created yet)"]
    interfaces = ", ".join(i.interfaces) or "(not observed)"
    return [
        f"runtime {i.runtime}, network {i.network_mode} (interfaces: {interfaces})",
        f"user: {i.user or '(image default)'}",
        f"capabilities: drop {', '.join(i.cap_drop) or '-'}; add {', '.join(i.cap_add) or '-'}",
        f"no new privileges: {_yes(i.no_new_privileges)}, seccomp: {i.seccomp or '-'}, "
        f"read-only root: {_yes(i.read_only_root)}",
        f"limits: {i.cpus:g} CPUs, {i.memory_bytes} bytes memory, {i.pids_limit} pids",
        f"image: {i.image_id}" + (f" ({i.image_digest})" if i.image_digest else ""),
        f"mounts: {', '.join(i.mounts) or '-'}",
    ]


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def results_summary(results: TestResults) -> list[str]:
    lines = [
        f"tests: {results.total} total, {results.passed} passed, {results.failed} failed, "
        f"{results.errors} errors, {results.skipped} skipped"
    ]
    for case in results.cases:
        if case.status in (TestStatus.FAILED, TestStatus.ERROR):
            where = ".".join(p for p in (case.classname, case.name) if p)
            first_line = case.message.splitlines()[0] if case.message else ""
            lines.append(f"  {case.status.value} {where}: {first_line}")
    lines.extend(f"  report refused: {path}" for path in results.rejected_reports)
    return lines


def secret_json(secret: Secret) -> dict[str, Any]:
    return {
        "name": secret.name,
        "updated_at": timestamp(secret.updated_at),
        "last_used_at": timestamp(secret.last_used_at),
        "last_used_by_job": secret.last_used_by_job,
    }


def secrets_table(secrets: list[Secret]) -> list[str]:
    lines = [f"{'NAME':<40} {'UPDATED':<27} {'LAST USED':<27} BY JOB"]
    for s in secrets:
        updated, used = timestamp(s.updated_at) or "-", timestamp(s.last_used_at) or "-"
        lines.append(f"{s.name:<40} {updated:<27} {used:<27} {s.last_used_by_job or '-'}")
    return lines


def artifact_json(artifact: Artifact) -> dict[str, Any]:
    return {
        "path": artifact.path,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "kind": artifact.kind.value,
    }


def artifact_line(artifact: Artifact) -> str:
    kind = "  (service log)" if artifact.kind == ArtifactKind.SERVICE_LOG else ""
    return f"{artifact.path}  {artifact.size} bytes  sha256:{artifact.sha256}{kind}"


def api_key_json(key: ApiKeyInfo) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "scopes": list(key.scopes),
        "state": key.state,
        "created_at": timestamp(key.created_at),
        "expires_at": timestamp(key.expires_at),
        "revoked_at": timestamp(key.revoked_at),
    }


def api_keys_table(keys: list[ApiKeyInfo]) -> list[str]:
    lines = [f"{'ID':<16}  {'NAME':<24} {'STATE':<8} {'EXPIRES':<27} SCOPES"]
    for k in keys:
        expires = timestamp(k.expires_at) or "never"
        lines.append(f"{k.id:<16}  {k.name:<24} {k.state:<8} {expires:<27} {' '.join(k.scopes)}")
    return lines


def user_json(user: UserInfo) -> dict[str, Any]:
    return {
        "name": user.name,
        "scopes": list(user.scopes),
        "state": user.state,
        "mfa": user.mfa,
        "created_at": timestamp(user.created_at),
        "revoked_at": timestamp(user.revoked_at),
    }


def users_table(users: list[UserInfo]) -> list[str]:
    lines = [f"{'NAME':<32} {'STATE':<8} {'MFA':<4} SCOPES"]
    for u in users:
        lines.append(f"{u.name:<32} {u.state:<8} {'yes' if u.mfa else 'no':<4} {' '.join(u.scopes)}")
    return lines


def enrollment_token_json(token: EnrollmentTokenInfo) -> dict[str, Any]:
    return {
        "id": token.id,
        "pool": token.pool,
        "state": token.state,
        "created_at": timestamp(token.created_at),
        "expires_at": timestamp(token.expires_at),
        "used_at": timestamp(token.used_at),
        "revoked_at": timestamp(token.revoked_at),
    }


def enrollment_tokens_table(tokens: list[EnrollmentTokenInfo]) -> list[str]:
    lines = [f"{'ID':<16}  {'POOL':<24} {'STATE':<8} EXPIRES"]
    for t in tokens:
        lines.append(f"{t.id:<16}  {t.pool:<24} {t.state:<8} {timestamp(t.expires_at) or '-'}")
    return lines


def enrolled_agent_json(agent: AgentInfo) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "pool": agent.pool,
        "host": agent.host,
        "version": agent.version,
        "labels": agent.labels,
        "runtimes": list(agent.runtimes),
        "max_jobs": agent.max_jobs or None,
        "running_jobs": agent.running_jobs,
        "state": agent.state,
        "enrolled_at": timestamp(agent.enrolled_at),
        "last_seen_at": timestamp(agent.last_seen_at),
        "cert_expires_at": timestamp(agent.cert_not_after),
        "revoked_at": timestamp(agent.revoked_at),
    }


def enrolled_agents_table(agents: list[AgentInfo]) -> list[str]:
    lines = [f"{'ID':<18} {'NAME':<20} {'POOL':<16} {'STATE':<12} {'JOBS':>4}  {'LAST_SEEN_AT':<27} VERSION"]
    for a in agents:
        jobs = f"{a.running_jobs}/{a.max_jobs}" if a.max_jobs else str(a.running_jobs)
        seen = timestamp(a.last_seen_at) or "never"
        lines.append(
            f"{a.id:<18} {a.name:<20} {a.pool:<16} {a.state:<12} {jobs:>4}  {seen:<27} {a.version or '-'}"
        )
    return lines


def pool_json(pool: PoolInfo) -> dict[str, Any]:
    return {
        "name": pool.name,
        "paused": pool.paused,
        "allowed_images": list(pool.allowed_images),
        "pull_policy": pool.pull_policy,
        "runtime": pool.runtime,
        "agent_cert_ttl_s": pool.agent_cert_ttl_s,
        "agents_enrolled": pool.agents_enrolled,
        "agents_connected": pool.agents_connected,
        "jobs_queued": pool.jobs_queued,
        "jobs_running": pool.jobs_running,
        "created_at": timestamp(pool.created_at),
        "egress_allow": list(pool.egress_allow),
    }


def pools_table(pools: list[PoolInfo]) -> list[str]:
    lines = [
        f"{'NAME':<24} {'PAUSED':<6} {'AGENTS':>9} {'QUEUED':>6} {'RUNNING':>7}  {'RUNTIME':<7} "
        f"{'IMAGES':<24} EGRESS"
    ]
    for p in pools:
        agents = f"{p.agents_connected}/{p.agents_enrolled}"
        images, paused = ",".join(p.allowed_images) or "any", "yes" if p.paused else "no"
        lines.append(
            f"{p.name:<24} {paused:<6} {agents:>9} {p.jobs_queued:>6} {p.jobs_running:>7}  "
            f"{p.runtime or 'job':<7} {images:<24} {' '.join(p.egress_allow) or 'none'}"
        )
    return lines


def pool_summary(pool: PoolInfo) -> str:
    """One line for a notice: the pool after a change."""
    return (
        f"pool {pool.name}{' (paused)' if pool.paused else ''}:"
        f" images {', '.join(pool.allowed_images) or 'any'}, pull {pool.pull_policy},"
        f" runtime {pool.runtime or 'chosen by each job'},"
        f" egress {', '.join(pool.egress_allow) or 'none (fetch steps refused)'}"
        + (f", agent certificates live {pool.agent_cert_ttl_s:g}s" if pool.agent_cert_ttl_s else "")
    )
