"""Nothing lost: the control plane is killed (SIGKILL) while a job writes tens
of megabytes; the stored log must be byte-identical to what the container
wrote, with exactly one result. And stopped (SIGTERM): it exits cleanly and
the running job carries on. The control plane runs as a real process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from docker import DockerClient

from testhide.agent.config import AgentConfig
from testhide.agent.daemon import Agent
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.ca.enrollment import create_token
from testhide.controlplane.datadir import initialise
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.controlplane.store.sqlite import SqliteStore
from tests.harness import JOB_IMAGE, Cli, ControlPlaneProcess, eventually, free_port

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.timeout(600)]

CHUNKS, LINES_PER_CHUNK = 50, 120_000  # about 53 MB of numbered lines, in 50 bursts


def expected_log() -> bytes:
    return "".join(f"{i}\n" for i in range(1, CHUNKS * LINES_PER_CHUNK + 1)).encode()


async def serving_with_agent(tmp_path: Path, docker_client: Any) -> tuple[ControlPlaneProcess, Agent, str]:
    """A control plane process with the default pool never pulling, and an
    enrolled agent (not started); the admin API key."""
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    store = await SqliteStore.open(data_dir / "testhide.db")
    await store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
    token = await create_token(
        store, (data_dir / "ca.pem").read_bytes(), "default", "default", timedelta(minutes=5)
    )
    await store.close()
    cp = ControlPlaneProcess(data_dir, free_port(), free_port())
    await cp.start()
    await enroll(f"127.0.0.1:{cp.api_port}", token, tmp_path / "agent", "survivor")
    agent = Agent(
        AgentConfig(data_dir=tmp_path / "agent", max_backoff=timedelta(seconds=1)),
        DockerRuntime(docker_client),
    )
    return cp, agent, admin_key


async def test_sigkill_of_the_control_plane_loses_no_log_and_reports_once(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    cp, agent, admin_key = await serving_with_agent(tmp_path, docker_client)
    data_dir = cp.data_dir
    agent_task = asyncio.create_task(agent.run())
    cli = Cli(tmp_path / "config")
    try:
        login = await cli(
            "login",
            "--server",
            f"127.0.0.1:{cp.api_port}",
            "--api-key",
            admin_key,
            "--ca-file",
            str(data_dir / "ca.pem"),
        )
        assert login.returncode == 0, login.stderr
        script = (
            f"i=0; while [ $i -lt {CHUNKS} ]; do seq $((i*{LINES_PER_CHUNK}+1)) $(((i+1)*{LINES_PER_CHUNK}));"
            " i=$((i+1)); sleep 0.25; done"
        )
        job_id = (
            (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", script)).stdout.decode().strip()
        )
        assert job_id
        # Following from the start: the client resumes from its offset after each restart.
        follower = await cli.start("logs", "--follow", job_id)

        # The agent connects once it has probed its runtimes; the job is its own from then on.
        await eventually(lambda: job_id in agent.outbox.running(), 60, "the agent to take the job")
        # About one batch per burst: kill three times while the job is still writing.
        for kill_after_batches in (8, 18, 28):
            while agent.outbox.sent_batches(job_id) < kill_after_batches:
                assert job_id in agent.outbox.running(), "the job ended before the control plane was killed"
                await asyncio.sleep(0.05)
            await cp.kill()
            await asyncio.sleep(0.5)  # the agent notices and buffers while the control plane is down
            await cp.start()

        followed_out, followed_err = await asyncio.wait_for(follower.communicate(), 300)
        assert follower.returncode == 0, followed_err
        again = await cli("logs", job_id, within=300)
        shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    finally:
        agent.shutdown()
        await asyncio.wait_for(agent_task, 60)
        await cp.stop()
    assert shown["status"] == "SUCCEEDED", shown
    expected = hashlib.sha256(expected_log()).hexdigest()
    assert hashlib.sha256(followed_out).hexdigest() == expected, "the follower lost or repeated bytes"
    assert hashlib.sha256(again.stdout).hexdigest() == expected, "the stored log differs"
    terminal = [t for t in shown["transitions"] if t["status"] in ("SUCCEEDED", "FAILED", "ERROR", "LOST")]
    assert len(terminal) == 1
    assert await asyncio.to_thread(os.path.getsize, data_dir / "testhide.db") > 0


async def test_sigterm_stops_the_control_plane_cleanly_and_agents_carry_on(
    tmp_path: Path, docker_client: Any
) -> None:
    cp, agent, admin_key = await serving_with_agent(tmp_path, docker_client)
    agent_task = asyncio.create_task(agent.run())
    cli = Cli(tmp_path / "config")
    try:
        login = await cli(
            "login",
            "--server",
            f"127.0.0.1:{cp.api_port}",
            "--api-key",
            admin_key,
            "--ca-file",
            str(cp.data_dir / "ca.pem"),
        )
        assert login.returncode == 0, login.stderr
        script = "i=0; while [ $i -lt 20 ]; do seq $((i*5000+1)) $(((i+1)*5000)); i=$((i+1)); sleep 0.2; done"
        job_id = (
            (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", script)).stdout.decode().strip()
        )
        while agent.outbox.sent_batches(job_id) < 3:
            assert job_id in agent.outbox.running(), "the job ended before the control plane was stopped"
            await asyncio.sleep(0.05)
        assert (
            await cp.terminate() == 0
        )  # graceful: streams closed with UNAVAILABLE, in-flight calls finished
        await cp.start()
        followed = await cli("logs", "--follow", job_id, within=120)
        shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    finally:
        agent.shutdown()
        await asyncio.wait_for(agent_task, 60)
        await cp.stop()
    log = (cp.data_dir.parent / "controlplane.log").read_text()
    assert "controlplane_stopped" in log
    assert "Traceback" not in log
    assert shown["status"] == "SUCCEEDED", shown
    assert followed.stdout == "".join(f"{i}\n" for i in range(1, 100_001)).encode()
    assert [t["status"] for t in shown["transitions"]].count("SUCCEEDED") == 1
