"""Nothing lost when agents go away: the agent's connection cut for 30 s, an
agent killed mid-job, an agent that comes back after its lease lapsed, and an
agent told to stop (SIGTERM). Real control plane, real agents, real Docker."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.credentials import Credentials
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.jobs.model import Job, JobStatus
from tests.harness import (
    JOB_IMAGE,
    REPO,
    Cli,
    RunningControlPlane,
    assert_same_bytes,
    containers_of,
    control_plane,
    enrolled,
    eventually,
    in_status,
    job,
    log_reached,
    numbered,
    running_agent,
    stored_log,
)
from tests.netproxy import CuttableProxy

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.timeout(300)]

TERMINAL = {s.value for s in JobStatus if s.terminal}


async def submit(cli: Cli, *command: str, retries: int = 0) -> str:
    result = await cli(
        "run", "-d", "--no-workspace", "--retries", str(retries), "--image", JOB_IMAGE, "--", *command
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


async def test_connection_cut_for_30s_mid_job_loses_nothing(tmp_path: Path, docker_client: Any) -> None:
    part1, part2 = (1, 1_500_000), (1_500_001, 6_000_000)  # about 11 MB, then 41 MB while cut off
    script = (
        f"seq {part1[0]} {part1[1]}; while [ ! -e /tmp/go ]; do sleep 0.1; done; seq {part2[0]} {part2[1]}"
    )
    async with (
        control_plane(tmp_path) as cp,
        CuttableProxy("127.0.0.1", cp.daemon.agent_port) as proxy,
        running_agent(
            cp,
            tmp_path,
            DockerRuntime(docker_client),
            agent_port=proxy.port,
            max_backoff=timedelta(seconds=1),
            stop_grace=timedelta(seconds=1),
        ) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id = await submit(cli, "sh", "-c", script)
        first = numbered(*part1)
        await eventually(lambda: log_reached(cp, job_id, len(first)), 60, "the first part stored")

        proxy.cut()
        cut_at = time.monotonic()
        await asyncio.to_thread(containers_of(docker_client, job_id)[0].exec_run, ["touch", "/tmp/go"])
        # The job writes the rest and ends while the agent is cut off: all of it waits in the spool.
        await asyncio.wait_for(agent.job_done(job_id), 25)  # the job to end while cut off
        assert agent.outbox.unacked_bytes() >= len(numbered(*part2)) - 8 * 1024 * 1024
        assert any(agent.config.spool_dir.iterdir()), "the backlog is on disk"
        assert (await job(cp, job_id)).status == JobStatus.RUNNING
        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))  # the cut itself lasts 30 s
        proxy.restore()

        followed = await cli("logs", "--follow", job_id, within=240)
        shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert proxy.connections >= 2, "the agent reconnected through the proxy"
    expected = numbered(part1[0], part2[1])
    assert_same_bytes(followed.stdout, expected)
    assert shown["status"] == "SUCCEEDED", shown
    assert [t["status"] for t in shown["transitions"]].count("SUCCEEDED") == 1
    assert not any(t["status"] in TERMINAL - {"SUCCEEDED"} for t in shown["transitions"])


class AgentProcess:
    """``testhide-agent run`` as operators start it."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir, self.args = data_dir, args
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        with await asyncio.to_thread(log_path.open, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "testhide.agent.cli",
                "run",
                "--data-dir",
                str(self.data_dir),
                *self.args,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=log,
            )

    async def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, within: float) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), within)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def test_killed_agent_job_is_lost_within_the_lease_and_retried_once(
    tmp_path: Path, docker_client: Any
) -> None:
    lease = timedelta(seconds=3)
    async with control_plane(tmp_path, job_lease=lease) as cp:
        assert cp.daemon.scheduler is not None
        data_dir = await enrolled(cp, tmp_path, "mortal")
        agent_id = Credentials.load(data_dir).agent_id
        agent = AgentProcess(data_dir)
        await agent.start()
        try:
            await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent_id), 30)
            cli = Cli(tmp_path / "config")
            assert (await cli.login(cp)).returncode == 0
            follower = await cli.start(
                "run",
                "--no-workspace",
                "--retries",
                "1",
                "--image",
                JOB_IMAGE,
                "--",
                "sh",
                "-c",
                "echo attempt-start; sleep 2; echo attempt-end",
            )
            assert follower.stderr is not None
            job_id = (await follower.stderr.readline()).decode().split()[1]
            await eventually(lambda: log_reached(cp, job_id, 1), 30, "the job to start")

            await agent.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await agent.wait(10)
            lost = await eventually(lambda: in_status(cp, job_id, JobStatus.LOST), 30, "the job to be LOST")
            assert time.monotonic() - killed_at <= lease.total_seconds() + 2, "LOST within the lease"
            assert "stopped reporting" in lost.status_reason
            retry = await eventually(lambda: _retry_of(cp, job_id), 10, "the retry")
            assert (retry.attempt, retry.retry_of, retry.spec.command) == (2, job_id, lost.spec.command)

            await agent.start()  # the same host comes back: it clears what the killed run left
            out, err = await asyncio.wait_for(follower.communicate(), 60)
            assert follower.returncode == 0, err
        finally:
            await agent.stop()
        final_lost, final_retry = await job(cp, job_id), await job(cp, retry.id)
        lost_log = await stored_log(cp, job_id)
    assert final_retry.status == JobStatus.SUCCEEDED
    assert out == b"attempt-start\nattempt-start\nattempt-end\n"
    assert f"retrying as job {retry.id} (attempt 2 of 2)".encode() in err
    # Reported once: the first attempt stays LOST with the log it had, and its container is gone.
    assert final_lost.status == JobStatus.LOST
    assert lost_log == b"attempt-start\n"
    assert [t.status for t in final_lost.transitions].count(JobStatus.LOST) == 1
    assert not [t for t in final_lost.transitions if t.status.terminal and t.status != JobStatus.LOST]
    assert containers_of(docker_client, job_id) == []


async def _retry_of(cp: RunningControlPlane, job_id: str) -> Job | None:
    lost = await job(cp, job_id)
    return await job(cp, lost.retried_as) if lost.retried_as else None


async def test_agent_back_after_its_lease_lapsed_stops_the_job_and_reports_nothing(
    tmp_path: Path, docker_client: Any
) -> None:
    lease = timedelta(seconds=2)
    async with (
        control_plane(tmp_path, job_lease=lease) as cp,
        CuttableProxy("127.0.0.1", cp.daemon.agent_port) as proxy,
        running_agent(
            cp,
            tmp_path,
            DockerRuntime(docker_client),
            agent_port=proxy.port,
            max_backoff=timedelta(seconds=1),
            stop_grace=timedelta(seconds=1),
        ) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id = await submit(cli, "sh", "-c", "echo before; while true; do sleep 0.2; done")
        first = await eventually(lambda: in_status(cp, job_id, JobStatus.RUNNING), 30, "RUNNING")
        assert first.lease_expires_at is not None
        # Heartbeats keep the lease: still RUNNING well past the first lease's end.
        await eventually(
            lambda: _lease_beyond(cp, job_id, first.lease_expires_at + 2 * lease),
            15,
            "the lease to be extended twice",
        )

        proxy.cut()
        lost = await eventually(lambda: in_status(cp, job_id, JobStatus.LOST), 15, "the job to be LOST")
        assert job_id in agent.executing(), "still running on the partitioned agent"
        proxy.restore()
        # Back again: the control plane tells it the job is no longer its; it stops the container.
        await asyncio.wait_for(agent.job_done(job_id), 30)  # the container to be stopped
        assert job_id not in agent.outbox.running()
        assert containers_of(docker_client, job_id) == []
        final = await job(cp, job_id)
    assert final.status == JobStatus.LOST
    assert final.log_size == lost.log_size
    assert [t.status for t in final.transitions].count(JobStatus.LOST) == 1
    assert final.epoch == first.epoch + 1


async def _lease_beyond(cp: RunningControlPlane, job_id: str, when: Any) -> bool:
    found = await job(cp, job_id)
    assert found.status == JobStatus.RUNNING, found.status_reason
    return found.lease_expires_at is not None and found.lease_expires_at > when


async def test_sigterm_drains_the_agent(tmp_path: Path, docker_client: Any) -> None:
    async with control_plane(tmp_path) as cp:
        assert cp.daemon.scheduler is not None
        data_dir = await enrolled(cp, tmp_path, "leaving")
        agent_id = Credentials.load(data_dir).agent_id
        agent = AgentProcess(data_dir, "--max-jobs", "2", "--drain-timeout", "3s")
        await agent.start()
        try:
            await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent_id), 30)
            cli = Cli(tmp_path / "config")
            assert (await cli.login(cp)).returncode == 0
            short = await submit(cli, "sh", "-c", "echo short; sleep 1; echo short-done")
            long = await submit(cli, "sh", "-c", "echo long; sleep 600")
            for job_id in (short, long):
                await eventually(functools.partial(log_reached, cp, job_id, 1), 30, "the jobs to start")

            await agent.signal(signal.SIGTERM)
            session = cp.daemon.scheduler.session_of(agent_id)
            assert session is not None
            await eventually(lambda: session.draining, 10, "the agent to say it drains")
            later = await submit(cli, "true")
            assert await agent.wait(60) == 0
            finished_short, finished_long, queued = [await job(cp, j) for j in (short, long, later)]
        finally:
            await agent.stop()
    assert finished_short.status == JobStatus.SUCCEEDED
    assert finished_long.status == JobStatus.CANCELED
    assert "shutting down" in finished_long.status_reason
    assert queued.status == JobStatus.QUEUED
    assert "no agent" in queued.status_reason
    assert [t.status for t in queued.transitions] == [JobStatus.QUEUED]
