"""One example document for every `--json` output of the three programs
(`testhide`, `testhide-agent`, `testhide-controlplane`): the one set the
README's "JSON output" tables are rendered from (``python -m tests.json_schema``)
and real outputs are checked against (``tests.json_schema.assert_matches_example``).

An example shows every field with a value of its type, never ``null``: the paths
that may be ``null`` are listed in ``nullable``. A path names a field from the
document's root, joined with ``.``; ``[]`` stands for the elements of an array
(``[].exit_code`` in a list of jobs, ``transitions[].at`` in one job). Objects
whose keys are data, not field names (a job's ``env`` and ``labels``), are
listed in ``maps``: only their values' type is checked. Arrays have at least
one element, so that the elements' shape is documented too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    document: Any
    nullable: frozenset[str] = frozenset()
    maps: frozenset[str] = frozenset()
    note: str = ""
    """One line for the README, if the output needs one."""
    fields: dict[str, str] = field(default_factory=dict)
    """What a field means, where its name does not say it (for the README)."""
    like: str = ""
    """For an array of another output's objects: that output (the README says so, briefly)."""


def _under(prefix: str, paths: set[str]) -> frozenset[str]:
    return frozenset(f"{prefix}{p}" if p.startswith("[]") else f"{prefix}.{p}" for p in paths)


T0 = "2030-01-02T03:04:05.000000Z"
T1 = "2030-01-02T03:04:06.250000Z"
T2 = "2030-01-02T03:04:09.500000Z"
JOB_ID = "j0190a3b4c5d6e7f8a9b0c1d2"
AGENT_ID = "a1b2c3d4e5f6a7b8"

JOB: dict[str, Any] = {
    "id": JOB_ID,
    "status": "FAILED",
    "exit_code": 1,
    "status_reason": "exit code 1",
    "image": "testhide/python:1",
    "command": ["python3", "-m", "pytest"],
    "pool": "default",
    "agent_id": AGENT_ID,
    "attempt": 1,
    "retries": 0,
    "retry_of": "j0190a3b4c5d6e7f8a9b0c1d1",
    "retried_as": "j0190a3b4c5d6e7f8a9b0c1d3",
    "created_at": T0,
    "started_at": T1,
    "finished_at": T2,
    "log_size": 2048,
    "spec": {
        "image": "testhide/python:1",
        "command": ["python3", "-m", "pytest"],
        "env": {"CI": "true"},
        "pool": "default",
        "workdir": "/workspace",
        "timeout_s": 3600,
        "labels": {"arch": "amd64"},
        "secrets": ["DEPLOY_TOKEN"],
        "runtime": "runc",
        "cpus": 2.0,
        "memory_bytes": 2147483648,
        "pids": 2048,
        "artifact_globs": ["dist/**"],
        "junit_globs": ["reports/*.xml"],
        "workspace_id": "b0123456789abcdef01234567",
        "fetch": "pip download -d /cache -r requirements.txt",
        "fetch_secrets": ["PIP_INDEX_TOKEN"],
        "cache": "pip-v1",
        "services": [
            {
                "name": "db",
                "image": "postgres:16",
                "command": ["postgres", "-c", "fsync=off"],
                "env": {"POSTGRES_PASSWORD": "test"},
                "tmpfs": ["/var/lib/postgresql/data"],
            }
        ],
    },
    "agent": {
        "id": AGENT_ID,
        "name": "build-1",
        "host": "build-1.example",
        "version": "1.4.0",
        "pool": "default",
    },
    "isolation": {
        "runtime": "runc",
        "network_mode": "none",
        "interfaces": ["lo"],
        "user": "65534:65534",
        "cap_add": ["NET_BIND_SERVICE"],
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "seccomp": "default",
        "read_only_root": True,
        "pids_limit": 2048,
        "memory_bytes": 2147483648,
        "cpus": 2.0,
        "image_id": "sha256:5f4e3d2c1b0a",
        "image_digest": "testhide/python@sha256:0a1b2c3d4e5f",
        "mounts": ["/workspace (rw)", "/tmp (tmpfs)"],
    },
    "fetch": {
        "cache": "miss",
        "running": False,
        "exit_code": 0,
        "duration_s": 12.5,
        "requests": [
            {
                "at": T1,
                "method": "CONNECT",
                "host": "pypi.org",
                "port": 443,
                "allowed": True,
                "http_status": 200,
                "sent_bytes": 2048,
                "received_bytes": 1048576,
            }
        ],
        "isolation": {
            "runtime": "runc",
            "network_mode": f"testhide-egress-{JOB_ID}",
            "interfaces": ["eth0", "lo"],
            "user": "65534:65534",
            "cap_add": ["NET_BIND_SERVICE"],
            "cap_drop": ["ALL"],
            "no_new_privileges": True,
            "seccomp": "testhide",
            "read_only_root": True,
            "pids_limit": 2048,
            "memory_bytes": 2147483648,
            "cpus": 2.0,
            "image_id": "sha256:5f4e3d2c1b0a",
            "image_digest": "testhide/python@sha256:0a1b2c3d4e5f",
            "mounts": ["/cache (rw)", "/tmp (tmpfs)", "/workspace (ro)"],
        },
    },
    "service_isolation": [
        {
            "name": "db",
            "isolation": {
                "runtime": "runc",
                "network_mode": "container:7c1d9e0a2b3f",
                "interfaces": ["lo"],
                "user": "65534:65534",
                "cap_add": ["NET_BIND_SERVICE"],
                "cap_drop": ["ALL"],
                "no_new_privileges": True,
                "seccomp": "testhide",
                "read_only_root": True,
                "pids_limit": 2048,
                "memory_bytes": 2147483648,
                "cpus": 2.0,
                "image_id": "sha256:9a8b7c6d5e4f",
                "image_digest": "postgres@sha256:1a2b3c4d5e6f",
                "mounts": ["/tmp (tmpfs)", "/var/lib/postgresql/data (tmpfs)"],
            },
        }
    ],
    "transitions": [{"status": "QUEUED", "at": T0, "reason": "waiting for an agent"}],
}
_JOB_NULLABLE = {
    "exit_code",
    "agent_id",
    "retry_of",
    "retried_as",
    "started_at",
    "finished_at",
    "agent",
    "isolation",
    "spec.workspace_id",
    "spec.runtime",
    "isolation.image_digest",
    "spec.fetch",
    "spec.cache",
    "fetch",
    "fetch.requests[].http_status",
    "fetch.isolation",
    "fetch.isolation.image_digest",
    "service_isolation[].isolation.image_digest",
}
_JOB_MAPS = {"spec.env", "spec.labels", "spec.services[].env"}
_JOB_FIELDS = {
    "status_reason": 'why the job is in its status ("" when nothing to say)',
    "attempt": "1, or 2… for a retry of a LOST job (`retry_of` names the job it retries)",
    "log_size": "bytes of log stored",
    "spec": "what was asked for; `timeout_s` in seconds",
    "agent": "the agent that took the job, as known when it was read",
    "isolation": "what Docker applied to the job's container, read back from the live container",
    "fetch": 'what the fetch step did: `cache` "hit" (restored, the step skipped), "miss" or "none"; '
    "`running` true: its container started (its `isolation` is known and checked), its end not reported "
    "(yet); each request its egress proxy saw (`allowed` false: refused); `isolation`: what Docker "
    "applied to its container (on the job's own internal network; null on a cache hit)",
    "service_isolation": "what Docker applied to each service's container, read back once it started",
}

POOL: dict[str, Any] = {
    "name": "default",
    "paused": False,
    "allowed_images": ["testhide/*"],
    "pull_policy": "if-not-present",
    "runtime": "runsc",
    "agent_cert_ttl_s": 604800,
    "agents_enrolled": 3,
    "agents_connected": 2,
    "jobs_queued": 4,
    "jobs_running": 2,
    "created_at": T0,
    "egress_allow": ["pypi.org", "files.pythonhosted.org:443"],
}
_POOL_NULLABLE = {"[].runtime", "[].agent_cert_ttl_s"}

SECRET: dict[str, Any] = {
    "name": "DEPLOY_TOKEN",
    "updated_at": T0,
    "last_used_at": T2,
    "last_used_by_job": JOB_ID,
}
_SECRET_NULLABLE = {"[].last_used_at", "[].last_used_by_job"}

AGENT_CACHE: dict[str, Any] = {
    "org": "default",
    "pool": "default",
    "key": "deps-v1",
    "volume": "testhide-cache-886a62f6f38c88531f450c3f-b7e47763",
    "size_bytes": 307200,
    "last_used_at": T1,
    "created_at": T0,
}

DOCTOR: dict[str, Any] = {
    "ok": False,
    "checks": [
        {
            "status": "FAIL",
            "check": "docker",
            "finding": "cannot reach Docker at unix:///var/run/docker.sock",
            "fix": "start dockerd, or set DOCKER_HOST",
        }
    ],
}

AGENT_ADMIN: dict[str, Any] = {
    "id": AGENT_ID,
    "name": "build-1",
    "pool": "default",
    "host": "build-1.example",
    "version": "1.4.0",
    "labels": {"arch": "amd64"},
    "runtimes": ["runc", "runsc"],
    "max_jobs": 2,
    "running_jobs": 1,
    "state": "connected",
    "enrolled_at": T0,
    "last_seen_at": T2,
    "cert_expires_at": "2030-01-09T03:04:05.000000Z",
    "revoked_at": T2,
}

INCIDENT: dict[str, Any] = {
    "agent": {
        "id": AGENT_ID,
        "name": "build-1",
        "org": "default",
        "pool": "default",
        "host": "build-1.example",
        "version": "1.4.0",
        "state": "revoked",
        "enrolled_at": T0,
        "last_seen_at": T2,
        "revoked_at": T2,
        "cert_expires_at": "2030-01-09T03:04:05.000000Z",
        "cert_serial": "5f1c0a",
    },
    "certificates": [
        {"serial": "5f1c0a", "event": "agent_enrolled", "issued_at": T0, "expires_at": T2},
    ],
    "since_at": T0,
    "truncated": False,
    "jobs": [
        {
            "id": JOB_ID,
            "org": "default",
            "pool": "default",
            "image": "testhide/python:1",
            "status": "FAILED",
            "exit_code": 1,
            "status_reason": "exit code 1",
            "attempt": 1,
            "created_at": T0,
            "assigned_at": T1,
            "started_at": T1,
            "finished_at": T2,
            "held": True,
            "secrets": ["DEPLOY_TOKEN"],
            "fetch_secrets": ["PIP_INDEX_TOKEN"],
            "workspace_id": "b0123456789abcdef01234567",
            "artifacts": [{"path": "dist/app.whl", "size": 20480, "sha256": "9f86d081884c7d65"}],
            "tests": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0, "unreadable_reports": 0},
            "verifies": True,
            "verdict": "log chain of 3 batch(es) matches; the countersigned statement agrees",
        }
    ],
    "secrets": [
        {
            "name": "DEPLOY_TOKEN",
            "job_ids": [JOB_ID],
            "last_handed_at": T1,
            "deleted": False,
            "updated_at": T0,
            "changed_since": False,
            "last_used_at": T1,
            "last_used_by_job": JOB_ID,
        }
    ],
    "summary": {"jobs": 1, "secrets_exposed": 1, "artifacts": 1, "verified": 1, "failed": 0, "unknown": 0},
}
_INCIDENT_NULLABLE = {
    "agent.version",
    "agent.last_seen_at",
    "agent.revoked_at",
    "certificates[].expires_at",
    "since_at",
    "jobs[].exit_code",
    "jobs[].assigned_at",
    "jobs[].started_at",
    "jobs[].finished_at",
    "jobs[].workspace_id",
    "jobs[].tests",
    "jobs[].verifies",
    "secrets[].last_handed_at",
    "secrets[].updated_at",
    "secrets[].last_used_at",
    "secrets[].last_used_by_job",
}
_INCIDENT_FIELDS = {
    "held": "whether the agent is the job's last holder (false: taken back from it and requeued)",
    "assigned_at": "when the job (its secrets, its workspace) was last handed to the agent",
    "secrets": "names only, never values: the job's own, and its fetch step's in fetch_secrets",
    "verifies": "whether the job's stored evidence still checks out; null: unknown, verdict says why",
    "changed_since": "the secret was set again after the agent last received it",
    "truncated": "more jobs than one report holds: the oldest are left out (narrow with --since)",
}

EXAMPLES: dict[str, Example] = {
    # testhide: the engineer's command
    "testhide jobs show": Example(JOB, frozenset(_JOB_NULLABLE), frozenset(_JOB_MAPS), fields=_JOB_FIELDS),
    "testhide jobs list": Example(
        [JOB],
        _under("[]", _JOB_NULLABLE),
        _under("[]", _JOB_MAPS),
        note="newest first; with `--all`, the jobs of every page",
        like="testhide jobs show",
    ),
    "testhide tests": Example(
        {
            "total": 3,
            "passed": 1,
            "failed": 1,
            "errors": 0,
            "skipped": 1,
            "cases": [
                {
                    "suite": "s",
                    "classname": "tests.test_app",
                    "name": "test_login",
                    "duration_s": 0.25,
                    "status": "FAILED",
                    "message": "AssertionError: boom",
                }
            ],
            "rejected_reports": ["reports/broken.xml"],
        },
        fields={"rejected_reports": "reports that could not be parsed, by path"},
    ),
    "testhide secrets list": Example([SECRET], frozenset(_SECRET_NULLABLE)),
    "testhide artifacts --list": Example(
        [
            {
                "path": "dist/app.tar.gz",
                "size": 1048576,
                "sha256": "9f86d081884c7d659a2feaa0c55ad015",
                "kind": "FILE",
            }
        ],
        note="also printed after a download with `--json`",
        fields={"kind": '"FILE", or "SERVICE_LOG" for a service\'s output (services/NAME.log)'},
    ),
    "testhide pools list": Example([POOL], frozenset(_POOL_NULLABLE)),
    "testhide verify": Example(
        {
            "job_id": JOB_ID,
            "agent": {"id": AGENT_ID, "name": "build-1"},
            "signed_at": T2,
            "countersigning_key": "7fb0370e0f9cf355bf8192eb1a31273fa3375b5b968d3ae32eedaf41f1fd89ec",
            "log_batches": 3,
            "artifacts": [{"path": "dist/app.tar.gz", "sha256": "9f86d081884c7d659a2feaa0c55ad015"}],
            "junit_reports_not_checked": [{"name": "reports/unit.xml", "sha256": "e3b0c44298fc1c149afbf4c8"}],
        },
        note="only when the job verifies (else nothing on stdout, the reason on stderr, exit 1)",
        fields={
            "signed_at": "the end of the job as the agent signed it",
            "countersigning_key": "the control plane's statement-signing key (sha256 of its certificate)",
            "junit_reports_not_checked": "signed, but the control plane serves no report's bytes to check",
        },
    ),
    "testhide whoami": Example(
        {
            "profile": "default",
            "server": "ci.example:7443",
            "servers": ["ci.example:7443", "ci2.example:7443"],
            "server_version": "1.4.0",
            "org": "default",
            "principal_kind": "user",
            "principal_id": "ada",
            "scopes": ["jobs:write"],
            "amr": ["pwd", "otp"],
            "access_expires_at": T2,
            "session_expires_at": "2030-01-03T03:04:05.000000Z",
        },
        frozenset({"access_expires_at", "session_expires_at"}),
        fields={
            "principal_kind": '"user" or "api_key"',
            "amr": "how the session was authenticated (RFC 8176)",
        },
    ),
    "testhide profiles": Example(
        [
            {
                "name": "default",
                "active": True,
                "servers": ["ci.example:7443"],
                "session_expires_at": T2,
                "error": "the stored session cannot be read",
            }
        ],
        frozenset({"[].session_expires_at", "[].error"}),
    ),
    "testhide mfa enroll": Example(
        {
            "otpauth_uri": "otpauth://totp/testhide:default%2Fada?secret=JBSWY3DPEHPK3PXP&issuer=testhide",
            "secret": "JBSWY3DPEHPK3PXP",
            "recovery_codes": ["k3vq-7hxm-2p9d"],
        }
    ),
    # testhide admin: the organisation's administration over the API
    "testhide admin enroll-token list": Example(
        [
            {
                "id": "t1a2b3c4",
                "pool": "default",
                "state": "valid",
                "created_at": T0,
                "expires_at": T2,
                "used_at": T1,
                "revoked_at": T2,
            }
        ],
        frozenset({"[].used_at", "[].revoked_at"}),
    ),
    "testhide admin agents list": Example(
        [AGENT_ADMIN],
        frozenset({"[].last_seen_at", "[].revoked_at", "[].max_jobs"}),
        frozenset({"[].labels"}),
    ),
    "testhide admin api-keys list": Example(
        [
            {
                "id": "k1a2b3c4",
                "name": "ci",
                "scopes": ["jobs:write"],
                "state": "active",
                "created_at": T0,
                "expires_at": T2,
                "revoked_at": T2,
            }
        ],
        frozenset({"[].expires_at", "[].revoked_at"}),
    ),
    "testhide admin users list": Example(
        [
            {
                "name": "ada",
                "scopes": ["jobs:write"],
                "mfa": True,
                "state": "active",
                "created_at": T0,
                "revoked_at": T2,
            }
        ],
        frozenset({"[].revoked_at"}),
    ),
    "testhide admin secrets list": Example(
        [SECRET], frozenset(_SECRET_NULLABLE), like="testhide secrets list"
    ),
    "testhide admin pools list": Example([POOL], frozenset(_POOL_NULLABLE), like="testhide pools list"),
    "testhide admin incident agent": Example(
        INCIDENT,
        frozenset(_INCIDENT_NULLABLE),
        note="the same document as `testhide-controlplane incident agent --json`, for your organisation",
        fields=_INCIDENT_FIELDS,
    ),
    # testhide-agent
    "testhide-agent doctor": Example(DOCTOR, fields={"status": '"OK", "WARN" or "FAIL"'}),
    "testhide-agent caches list": Example([AGENT_CACHE], note="most recently used first"),
    "testhide-agent caches clear": Example(
        {"removed_count": 1, "removed_bytes": 307200, "removed": [AGENT_CACHE], "skipped": [AGENT_CACHE]},
        fields={"skipped": "caches a container is using: not removed"},
    ),
    # testhide-controlplane: the operator's command on the data dir
    "testhide-controlplane doctor": Example(DOCTOR, fields={"status": '"OK", "WARN" or "FAIL"'}),
    "testhide-controlplane pools list": Example([{"org": "default", **POOL}], frozenset(_POOL_NULLABLE)),
    "testhide-controlplane orgs list": Example(
        [
            {
                "name": "default",
                "state": "active",
                "created_at": T0,
                "revoked_at": T2,
                "admin_key_max_lifetime_s": 7776000,
            }
        ],
        frozenset({"[].revoked_at", "[].admin_key_max_lifetime_s"}),
        fields={
            "admin_key_max_lifetime_s": "the longest an API key with an admin scope may live; null: no limit"
        },
    ),
    "testhide-controlplane agents list": Example(
        [{**AGENT_ADMIN, "org": "default", "connected": True, "cert_serial": "5f1c0a"}],
        frozenset({"[].last_seen_at", "[].revoked_at", "[].max_jobs"}),
        frozenset({"[].labels"}),
    ),
    "testhide-controlplane incident agent": Example(
        INCIDENT,
        frozenset(_INCIDENT_NULLABLE),
        note="everything one agent touched, from the stored evidence (README, Incident response)",
        fields=_INCIDENT_FIELDS,
    ),
    "testhide-controlplane enroll-token list": Example(
        [
            {
                "id": "t1a2b3c4",
                "org": "default",
                "pool": "default",
                "state": "valid",
                "created_at": T0,
                "expires_at": T2,
                "used_at": T1,
                "revoked_at": T2,
            }
        ],
        frozenset({"[].used_at", "[].revoked_at"}),
    ),
    "testhide-controlplane users list": Example(
        [
            {
                "name": "ada",
                "org": "default",
                "scopes": ["jobs:write"],
                "mfa": True,
                "state": "active",
                "created_at": T0,
                "revoked_at": T2,
            }
        ],
        frozenset({"[].revoked_at"}),
    ),
    "testhide-controlplane api-keys list": Example(
        [
            {
                "id": "k1a2b3c4",
                "prefix": "thk_k1a2b3c4",
                "org": "default",
                "name": "ci",
                "scopes": ["jobs:write"],
                "state": "active",
                "created_at": T0,
                "expires_at": T2,
                "revoked_at": T2,
                "last_used_at": T1,
            }
        ],
        frozenset({"[].expires_at", "[].revoked_at", "[].last_used_at"}),
    ),
    "testhide-controlplane migrate-store": Example(
        {
            "data_dir": "/var/lib/testhide",
            "target": {"host": "db.example", "port": 5432, "database": "testhide"},
            "tables": {"jobs": 120},
            "audit_entries": 57,
            "duration_s": 4.2,
            "rows": 5310,
        },
        maps=frozenset({"tables"}),
        fields={"tables": "rows copied, by table"},
    ),
    "testhide-controlplane statement-keys list": Example(
        [
            {
                "id": "3f2a9c0e5b7d41e8a6c2f90d1b4e7a3c5d8f0b2e4a6c8e0f1a3b5c7d9e1f2a4b",
                "state": "active",
                "created_at": T0,
                "stops_signing_at": T2,
                "retired_at": T2,
                "certificate_expires_at": T2,
            }
        ],
        frozenset({"[].retired_at"}),
    ),
}
