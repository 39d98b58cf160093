"""The scope of an incident against a real control plane, an enrolled agent and real Docker
jobs: the operator's `testhide-controlplane incident agent` and the engineer's `testhide admin
incident agent` list every job the agent ran, the secret it received by name and never its
value, the artifacts; `--since` filters; the Admin call is confined to the caller's
organisation and needs agents:admin; every report is audited."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.auth.audit import AuditEvent
from testhide.protos.v1 import admin_pb2, admin_pb2_grpc
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, control_plane, operator, running_agent
from tests.json_schema import assert_matches_example

pytestmark = pytest.mark.docker

SECRET_VALUE = "incident-s3cr3t-3f9a1c7e"
REPORT = '<testsuite name="s"><testcase classname="c" name="ok" time="0.1"/></testsuite>'


async def incident_call(cp: RunningControlPlane, key: str, agent_id: str) -> admin_pb2.IncidentReport:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        request = admin_pb2.IncidentAgentRequest(agent_id=agent_id)
        return await admin_pb2_grpc.AdminStub(channel).IncidentAgent(
            request, metadata=await cp.bearer(key), timeout=30
        )


async def refused(cp: RunningControlPlane, key: str, agent_id: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await incident_call(cp, key, agent_id)
    return error.value


async def operator_report(cp: RunningControlPlane, *args: str) -> tuple[str, str]:
    code, out, err = await operator("incident", "agent", *args, "--data-dir", str(cp.data_dir))
    assert code == 0, err
    return out, err


async def audit_events(cp: RunningControlPlane) -> list[AuditEvent]:
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [e.event for e in entries if e.event.action == "agent_incident_reported"]


async def test_the_agents_jobs_secret_names_and_artifacts_never_a_value(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=SECRET_VALUE.encode() + b"\n")).returncode == 0
    script = (
        f"mkdir -p r out && echo '{REPORT}' > r/junit.xml && test -n \"$DEPLOY_TOKEN\""
        + " && echo hi | tee out/a.txt"
    )
    with_secret = await cli(
        "run",
        *("--secret", "DEPLOY_TOKEN", "--junit", "r/*.xml", "--artifacts", "out/*"),
        *("--image", JOB_IMAGE, "--", "sh", "-c", script),
    )
    assert with_secret.returncode == 0, with_secret.stderr
    between = datetime.now(UTC)
    plain = await cli("run", "--no-workspace", "--image", JOB_IMAGE, "--", "echo", "plain")
    assert plain.returncode == 0, plain.stderr
    [second, first] = [j["id"] for j in json.loads((await cli("jobs", "list", "--json")).stdout)]

    out, err = await operator_report(cp, docker_agent.agent_id, "--json")
    report: dict[str, Any] = json.loads(out)
    assert_matches_example("testhide-controlplane incident agent", report)
    assert SECRET_VALUE not in out + err
    assert report["agent"]["id"] == docker_agent.agent_id
    assert report["agent"]["org"] == "default"
    assert [(j["id"], j["status"], j["held"], j["secrets"]) for j in report["jobs"]] == [
        (second, "SUCCEEDED", True, []),
        (first, "SUCCEEDED", True, ["DEPLOY_TOKEN"]),
    ]
    assert [a["path"] for a in report["jobs"][1]["artifacts"]] == ["out/a.txt"]
    assert report["jobs"][1]["artifacts"][0]["sha256"]
    assert report["jobs"][1]["tests"]["passed"] == 1
    assert [(s["name"], s["job_ids"], s["changed_since"]) for s in report["secrets"]] == [
        ("DEPLOY_TOKEN", [first], False)
    ]
    assert report["secrets"][0]["last_used_by_job"] == first
    assert report["certificates"][0]["event"] == "agent_enrolled"  # from the audit log
    assert report["certificates"][0]["serial"] == report["agent"]["cert_serial"]
    # An untouched store: each job's log chain and countersigned statement check out.
    assert [(j["verifies"], j["verdict"]) for j in report["jobs"]] == [
        (True, "log chain of 1 batch(es) matches; the countersigned statement agrees")
    ] * 2
    assert report["summary"] == {
        "jobs": 2,
        "secrets_exposed": 1,
        "artifacts": 1,
        "verified": 2,
        "failed": 0,
        "unknown": 0,
    }

    table, err = await operator_report(cp, docker_agent.agent_id)
    assert SECRET_VALUE not in table + err
    assert "DEPLOY_TOKEN" in table
    assert first in table
    assert "out/a.txt" in table
    assert "2 jobs, 1 secrets exposed by name, 1 artifacts," in table.splitlines()[-1]

    since, _ = await operator_report(cp, docker_agent.agent_id, "--since", between.isoformat(), "--json")
    assert [j["id"] for j in json.loads(since)["jobs"]] == [second]
    assert json.loads(since)["secrets"] == []

    # The same report through the Admin API, as `testhide admin incident agent` prints it.
    mirrored = await cli("admin", "incident", "agent", docker_agent.agent_id, "--json")
    assert mirrored.returncode == 0, mirrored.stderr
    assert SECRET_VALUE.encode() not in mirrored.stdout + mirrored.stderr
    api_report = json.loads(mirrored.stdout)
    assert_matches_example("testhide admin incident agent", api_report)
    for part in ("jobs", "secrets", "certificates", "summary"):
        assert api_report[part] == report[part], part
    narrowed = await cli("admin", "incident", "agent", docker_agent.agent_id, "--since", between.isoformat())
    assert narrowed.returncode == 0, narrowed.stderr
    assert "1 jobs, 0 secrets exposed by name, 0 artifacts," in narrowed.stdout.decode().splitlines()[-1]
    assert first not in narrowed.stdout.decode()

    # A log batch altered in the store: that job no longer verifies, the other still does.
    with sqlite3.connect(cp.data_dir / "testhide.db") as db:
        changed = db.execute(
            "UPDATE log_batches SET chain = zeroblob(32) WHERE job_id = ? AND seq = 1", (first,)
        )
        assert changed.rowcount == 1
    out, _ = await operator_report(cp, docker_agent.agent_id, "--json")
    verdicts = {j["id"]: (j["verifies"], j["verdict"]) for j in json.loads(out)["jobs"]}
    assert verdicts[first] == (False, "stored log batch 1 does not match its chain link")
    assert verdicts[second][0] is True, verdicts[second]

    audited = await audit_events(cp)
    assert [(e.target, e.actor.split(":")[0], e.details["jobs"]) for e in audited] == [
        (docker_agent.agent_id, "operator", 2),
        (docker_agent.agent_id, "operator", 2),
        (docker_agent.agent_id, "operator", 1),
        (docker_agent.agent_id, "api_key", 2),
        (docker_agent.agent_id, "api_key", 1),
        (docker_agent.agent_id, "operator", 2),
    ]
    assert all(e.details["secrets"] in (["DEPLOY_TOKEN"], []) for e in audited)


async def test_another_organisations_agent_is_not_found_and_the_scope_is_needed(
    docker_agent: Agent, cp: RunningControlPlane
) -> None:
    store = cp.daemon._store
    assert store is not None
    now = datetime.now(UTC)
    await store.create_org("other", now)
    await store.create_pool("other", "default", now)
    outsider, _ = await cp.api_key("other", "agents:admin")
    hidden = await refused(cp, outsider, docker_agent.agent_id)
    missing = await refused(cp, outsider, "a0123456789abcdef")
    assert hidden.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert hidden.details() == f"agent {docker_agent.agent_id!r} not found"
    assert missing.details() == "agent 'a0123456789abcdef' not found"

    engineer, _ = await cp.api_key("default", "jobs:read", "jobs:write", "org:admin")
    denied = await refused(cp, engineer, docker_agent.agent_id)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == "this credential lacks the 'agents:admin' scope"
    assert await audit_events(cp) == []  # nothing was reported

    own, _ = await cp.api_key("default", "agents:admin")
    report = await incident_call(cp, own, docker_agent.agent_id)
    assert (report.agent.id, report.org, list(report.jobs)) == (docker_agent.agent_id, "default", [])
    code, _, err = await operator("incident", "agent", "nope", "--data-dir", str(cp.data_dir))
    assert code == 1
    assert "agent 'nope' not found" in err


async def test_on_postgresql_the_operator_and_the_api_report_the_same(
    pg_url: str, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with (
        control_plane(tmp_path, database_url=pg_url) as cp,
        running_agent(cp, tmp_path, DockerRuntime(docker_client)) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=SECRET_VALUE.encode())).returncode == 0
        ran = await cli(
            "run", "--no-workspace", "--secret", "DEPLOY_TOKEN", "--image", JOB_IMAGE, "--", "true"
        )
        assert ran.returncode == 0, ran.stderr
        out, err = await operator_report(cp, agent.agent_id, "--json")
        assert SECRET_VALUE not in out + err
        report = json.loads(out)
        assert [(j["status"], j["secrets"]) for j in report["jobs"]] == [("SUCCEEDED", ["DEPLOY_TOKEN"])]
        assert report["summary"]["failed"] == 0
        api = await cli("admin", "incident", "agent", agent.agent_id, "--json")
        assert api.returncode == 0, api.stderr
        assert json.loads(api.stdout)["jobs"] == report["jobs"]
