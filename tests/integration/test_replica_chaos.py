"""Nothing lost when a replica or the shared database goes away.

- The replica that holds an agent's stream is killed (SIGKILL) while the
  agent's job writes 50 MB and a follower follows through the other replica:
  the agent fails over and replays, the followed and the stored log are
  byte-identical to what the container wrote, and the job has one result.
- PostgreSQL is stopped for ten seconds under a running job: requests fail
  with UNAVAILABLE meanwhile, and everything resumes by itself once it is
  back: the log is whole, the job has one result."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from docker import DockerClient

from testhide.agent.config import AgentConfig
from testhide.agent.daemon import Agent
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.ca.enrollment import create_token
from testhide.controlplane.datadir import DataDir, initialise
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogChunk, PoolPolicy, PullPolicy
from testhide.controlplane.jobs.service import JobService
from tests.harness import (
    JOB_IMAGE,
    Cli,
    ControlPlaneProcess,
    RunningControlPlane,
    control_plane,
    eventually,
    free_port,
    running_agent,
)
from tests.pg import private_cluster

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

ORG = "default"
OUTAGE_S = 10.0
LINES = 250  # one every 0.1 s: the job runs through the whole outage


CHUNKS, LINES_PER_CHUNK = 50, 120_000  # about 53 MB of numbered lines, in 50 bursts


def jobs_of(cp: RunningControlPlane) -> JobService:
    assert cp.daemon.jobs is not None
    return cp.daemon.jobs


async def test_sigkill_of_the_replica_holding_the_agent_loses_nothing_and_the_job_runs_on(
    tmp_path: Path, pg_url: str, docker_client: DockerClient
) -> None:
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"], database_url=pg_url)
    store = await DataDir(data_dir).open_store()
    try:
        await store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
        token = await create_token(
            store, (data_dir / "ca.pem").read_bytes(), "default", "default", timedelta(minutes=5)
        )
    finally:
        await store.close()
    a = ControlPlaneProcess(data_dir, free_port(), free_port(), name="replica-a")
    b = ControlPlaneProcess(data_dir, free_port(), free_port(), name="replica-b")
    await a.start()
    await b.start()
    # The agent knows both replicas and connects to the first: A holds its stream.
    await enroll(
        [f"127.0.0.1:{a.api_port}", f"127.0.0.1:{b.api_port}"],
        token,
        tmp_path / "agent",
        "survivor",
        agent_servers=[f"127.0.0.1:{a.agent_port}", f"127.0.0.1:{b.agent_port}"],
    )
    agent = Agent(
        AgentConfig(data_dir=tmp_path / "agent", max_backoff=timedelta(seconds=1)),
        DockerRuntime(docker_client),
    )
    agent_task = asyncio.create_task(agent.run())
    cli = Cli(tmp_path / "config")  # the engineer talks to B only
    try:
        login = await cli(
            "login",
            "--server",
            f"127.0.0.1:{b.api_port}",
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
        submitted = await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", script)
        job_id = submitted.stdout.decode().strip()
        assert job_id, submitted.stderr
        follower = await cli.start("logs", "--follow", job_id)
        # Submitted through B, run by the agent connected to A.
        await eventually(lambda: job_id in agent.outbox.running(), within=60, what="the job to start")
        while agent.outbox.sent_batches(job_id) < 12:
            assert job_id in agent.outbox.running(), "the job ended before its replica was killed"
            await asyncio.sleep(0.05)
        await a.kill()

        followed_out, followed_err = await asyncio.wait_for(follower.communicate(), 300)
        assert follower.returncode == 0, followed_err
        again = await cli("logs", job_id, within=300)
        shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    finally:
        agent.shutdown()
        await asyncio.wait_for(agent_task, 60)
        await b.stop()
        if a.process is not None and a.process.returncode is None:
            await a.stop()
    # The stream was A's until the kill, then B's.
    assert b"agent_connected" in a.log_path.read_bytes()
    assert b"agent_connected" in b.log_path.read_bytes()
    source = "".join(f"{i}\n" for i in range(1, CHUNKS * LINES_PER_CHUNK + 1)).encode()
    expected = hashlib.sha256(source).hexdigest()
    assert shown["status"] == "SUCCEEDED", shown
    assert hashlib.sha256(followed_out).hexdigest() == expected, "the follower lost or repeated bytes"
    assert hashlib.sha256(again.stdout).hexdigest() == expected, "the stored log differs"
    ended = [t for t in shown["transitions"] if t["status"] in ("SUCCEEDED", "FAILED", "ERROR", "LOST")]
    assert len(ended) == 1, shown["transitions"]


async def test_postgres_stopped_for_ten_seconds_under_a_running_job_loses_nothing(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    expected = "".join(f"line {i}\n" for i in range(1, LINES + 1)).encode()
    script = f'i=1; while [ $i -le {LINES} ]; do echo "line $i"; i=$((i+1)); sleep 0.1; done'
    async with (
        private_cluster() as pg,
        control_plane(tmp_path, database_url=pg.url) as cp,
        running_agent(cp, tmp_path, DockerRuntime(docker_client), max_backoff=timedelta(seconds=1)),
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job = await jobs_of(cp).submit(ORG, JobSpec(image=JOB_IMAGE, command=("sh", "-c", script)))
        first = await anext(jobs_of(cp).follow(ORG, job.id, 0, follow=True))
        assert isinstance(first, LogChunk)  # running, and writing

        await pg.pause()
        down_at = time.monotonic()
        during = await cli("jobs", "show", job.id)
        assert during.returncode != 0
        assert "unavailable" in during.stderr.decode().lower(), during.stderr
        # The outage lasts as long as the test says: no event to wait for, by definition.
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        await pg.start()

        log = bytearray()
        final: Job | None = None
        async for item in jobs_of(cp).follow(ORG, job.id, 0, follow=True):
            if isinstance(item, LogChunk):
                log += item.data
            else:
                final = item
        shown = json.loads((await cli("jobs", "show", job.id, "--json")).stdout)
    assert final is not None
    assert final.status == JobStatus.SUCCEEDED, final.status_reason
    assert bytes(log) == expected, "the stored log lost or repeated bytes across the outage"
    ended = [t for t in shown["transitions"] if t["status"] in ("SUCCEEDED", "FAILED", "ERROR", "LOST")]
    assert len(ended) == 1, shown["transitions"]
