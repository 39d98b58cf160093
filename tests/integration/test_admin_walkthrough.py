"""The README's walkthrough ("Using it"), from an administrator's machine through `testhide admin`
alone: no shell on the control-plane host, no data dir, only the admin API key `init` prints (all
scopes) and the CA certificate. A pool and its policy, a token, an agent that enrolls with it and
runs a job; a service account's key and an engineer's user, who logs in and runs a job; pausing and
resuming the pool; revoking the agent. The engineer's admin request is refused in one line."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from docker import DockerClient

from testhide.agent.config import AgentConfig
from testhide.agent.daemon import Agent
from testhide.agent.errors import CredentialsError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.auth.principal import SCOPES
from tests.harness import JOB_IMAGE, Cli, CliResult, RunningControlPlane, eventually
from tests.json_schema import assert_matches_example

pytestmark = pytest.mark.docker

PAUSED = "waiting: pool 'ci' is paused by an administrator; nothing new is dispatched until it is resumed"


async def logged_in(cp: RunningControlPlane, home: Path, key: str) -> Cli:
    """The CLI on "another machine": its own config dir, the CA certificate copied over."""
    ca_file = home / "ca.pem"
    await asyncio.to_thread(home.mkdir)
    await asyncio.to_thread(shutil.copy, cp.data_dir / "ca.pem", ca_file)
    cli = Cli(home / "config")
    login = await cli("login", "--server", cp.api_target, "--api-key", key, "--ca-file", str(ca_file))
    assert login.returncode == 0, login.stderr
    return cli


async def ok(cli: Cli, *args: str, stdin: bytes | None = None) -> CliResult:
    result = await cli(*args, stdin=stdin)
    assert result.returncode == 0, (args, result.stderr)
    return result


async def shown(cli: Cli, *args: str) -> Any:
    return json.loads((await ok(cli, *args, "--json")).stdout)


async def test_an_administrator_runs_a_pool_of_agents_from_another_machine(
    cp: RunningControlPlane, tmp_path: Path, docker_client: DockerClient
) -> None:
    admin = await logged_in(cp, tmp_path / "admin-laptop", (await cp.api_key("default", *SCOPES))[0])
    await ok(admin, "admin", "pools", "create", "ci", "--agent-cert-ttl", "1h")
    await ok(admin, "admin", "pools", "set", "ci", "--pull-policy", "never")
    bot_key = await ok(
        admin,
        "admin",
        "api-keys",
        "create",
        "ci-bot",
        "--scope",
        "jobs:read",
        "--scope",
        "jobs:write",
        "--expires-in",
        "90d",
    )
    [bot] = [k for k in await shown(admin, "admin", "api-keys", "list") if k["name"] == "ci-bot"]
    assert (bot["scopes"], bot["state"]) == (["jobs:read", "jobs:write"], "active")
    password = "correct horse battery staple 7"
    await ok(
        admin,
        "admin",
        "users",
        "create",
        "alice",
        "--scope",
        "jobs:read",
        "--scope",
        "jobs:write",
        "--password-stdin",
        stdin=password.encode() + b"\n",
    )
    created = await ok(admin, "admin", "enroll-token", "create", "--pool", "ci")
    token = created.stdout.decode().strip()
    assert "one use" in created.stderr.decode()
    tokens = await shown(admin, "admin", "enroll-token", "list")
    assert_matches_example("testhide admin enroll-token list", tokens)
    [listed_token] = tokens
    assert (listed_token["pool"], listed_token["state"]) == ("ci", "valid")

    credentials = await enroll(cp.api_target, token, tmp_path / "build-host", "walk-1")
    config = AgentConfig(data_dir=tmp_path / "build-host", stop_grace=timedelta(seconds=1))
    agent_process = Agent(config, DockerRuntime(docker_client))
    running = asyncio.create_task(agent_process.run())
    try:
        ran = await ok(
            admin, "run", "--pool", "ci", "--image", JOB_IMAGE, "--no-workspace", "--", "echo", "hi"
        )
        assert ran.stdout == b"hi\n"

        agents = await shown(admin, "admin", "agents", "list")
        assert_matches_example("testhide admin agents list", agents)
        [agent] = agents
        assert (agent["id"], agent["name"], agent["pool"], agent["state"]) == (
            credentials.agent_id,
            "walk-1",
            "ci",
            "connected",
        )

        await ok(admin, "admin", "pools", "pause", "ci")
        job_id = (
            (
                await ok(
                    admin, "run", "-d", "--pool", "ci", "--image", JOB_IMAGE, "--no-workspace", "--", "true"
                )
            )
            .stdout.decode()
            .strip()
        )
        waiting = await shown(admin, "jobs", "show", job_id)
        assert (waiting["status"], waiting["status_reason"]) == ("QUEUED", PAUSED)
        listed = await shown(admin, "pools", "list")
        assert_matches_example("testhide pools list", listed)
        assert await shown(admin, "admin", "pools", "list") == listed
        pools = {p["name"]: p for p in listed}
        assert pools["ci"] == {
            "name": "ci",
            "paused": True,
            "allowed_images": [],
            "pull_policy": "never",
            "runtime": "",
            "agent_cert_ttl_s": 3600.0,
            "agents_enrolled": 1,
            "agents_connected": 1,
            "jobs_queued": 1,
            "jobs_running": 0,
            "created_at": pools["ci"]["created_at"],
            "egress_allow": [],
        }
        assert pools["ci"]["created_at"].endswith("Z")

        await ok(admin, "admin", "pools", "resume", "ci")

        async def succeeded() -> bool:
            return bool((await shown(admin, "jobs", "show", job_id))["status"] == "SUCCEEDED")

        await eventually(succeeded, 20, "the waiting job to run once the pool is resumed")

        revoked = await ok(admin, "admin", "agents", "revoke", credentials.agent_id)
        assert f"agent {credentials.agent_id} (walk-1) revoked" in revoked.stderr.decode()
        with pytest.raises(CredentialsError, match="this agent has been revoked"):
            await asyncio.wait_for(running, 30)  # cut off: the agent stops
        [agent] = await shown(admin, "admin", "agents", "list")
        assert agent["state"] == "revoked"
    finally:
        if not running.done():
            agent_process.shutdown()
            await asyncio.wait_for(running, 60)

    bot = await logged_in(cp, tmp_path / "ci-runner", bot_key.stdout.decode().strip())
    assert (await shown(bot, "whoami"))["scopes"] == ["jobs:read", "jobs:write"]

    engineer = Cli(tmp_path / "engineer-laptop")
    await ok(
        engineer,
        "login",
        "--server",
        cp.api_target,
        "--ca-file",
        str(tmp_path / "admin-laptop" / "ca.pem"),
        "--user",
        "alice",
        "--password-stdin",
        stdin=password.encode() + b"\n",
    )
    assert (await shown(engineer, "whoami"))["principal_id"] == "alice"
    refused = await engineer("admin", "pools", "pause", "ci")
    assert refused.returncode == 125
    assert refused.stderr.decode().splitlines() == [
        "Error: this credential lacks the 'agents:admin' scope (permission_denied)"
    ]
    assert [p["name"] for p in await shown(engineer, "pools", "list")] == ["ci", "default"]
