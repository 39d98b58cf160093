"""A follower never gives up while its job may still be running: `testhide
run` and `testhide logs --follow` ride out control-plane restarts that come
later than the reconnect window (5 minutes by default, shortened here with
TESTHIDE_RECONNECT_WINDOW), and every restart gets the whole window. A
control plane that is down at the start is reported at once; one that stays
away longer than the window ends the follow with a clear line and 125. The
control plane runs as a real process, killed and started on the same ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

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
from tests.harness import JOB_IMAGE, Cli, ControlPlaneProcess, containers_of, free_port

# Longer than the channel's own reconnect backoff (at most 5 s) plus a restart of
# the control plane, short enough to follow for longer than it twice.
WINDOW_S = 8


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[ControlPlaneProcess, Cli, str]]:
    """A control plane process whose default pool never pulls, a logged-in
    CLI with the short reconnect window, and an enrollment token."""
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    store = await SqliteStore.open(data_dir / "testhide.db")
    try:
        await store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
        token = await create_token(
            store, (data_dir / "ca.pem").read_bytes(), "default", "default", timedelta(minutes=5)
        )
    finally:
        await store.close()
    cp = ControlPlaneProcess(data_dir, free_port(), free_port())
    await cp.start()
    try:
        cli = Cli(tmp_path / "config")
        cli.env["TESTHIDE_RECONNECT_WINDOW"] = f"{WINDOW_S}s"
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
        yield cp, cli, token
    finally:
        await cp.stop()


@asynccontextmanager
async def agent_running(
    cp: ControlPlaneProcess, token: str, tmp_path: Path, docker: DockerClient
) -> AsyncIterator[None]:
    await enroll(f"127.0.0.1:{cp.api_port}", token, tmp_path / "agent", "follower-test")
    agent = Agent(
        AgentConfig(data_dir=tmp_path / "agent", max_backoff=timedelta(seconds=1)), DockerRuntime(docker)
    )
    task = asyncio.create_task(agent.run())
    try:
        yield
    finally:
        agent.shutdown()
        await asyncio.wait_for(task, 60)


def lost_connection(stderr: bytes, cp: ControlPlaneProcess) -> int:
    notice = f"lost the connection to the control plane at 127.0.0.1:{cp.api_port}"
    return sum(1 for line in stderr.decode().splitlines() if notice in line and f"up to {WINDOW_S}s" in line)


@pytest.mark.docker
@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_run_and_logs_follow_a_job_through_restarts_later_than_the_window(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    async with serving(tmp_path) as (cp, cli, token), agent_running(cp, token, tmp_path, docker_client):
        # The job prints a line, then nothing until the test lets it finish.
        script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo last"
        runner = await cli.start("run", "--image", JOB_IMAGE, "--", "sh", "-c", script)
        assert runner.stdout is not None
        assert runner.stderr is not None
        queued = await asyncio.wait_for(runner.stderr.readline(), 60)
        job_id = queued.decode().split()[1]
        assert await asyncio.wait_for(runner.stdout.readline(), 60) == b"first\n"
        follower = await cli.start("logs", "--follow", job_id)
        assert follower.stdout is not None
        assert await asyncio.wait_for(follower.stdout.readline(), 60) == b"first\n"

        following_since = time.monotonic()
        for _ in range(2):
            # Following (with no output) for longer than the window, then a restart.
            await asyncio.sleep(WINDOW_S + 1)
            await cp.kill()
            await cp.start()
        assert time.monotonic() - following_since > 2 * WINDOW_S

        [container] = containers_of(docker_client, job_id)
        await asyncio.to_thread(container.exec_run, ["touch", "/tmp/go"])
        run_out, run_err = await asyncio.wait_for(runner.communicate(), 60)
        logs_out, logs_err = await asyncio.wait_for(follower.communicate(), 60)
    assert runner.returncode == 0, run_err
    assert run_out == b"last\n"  # after "first", read above: nothing lost, nothing twice
    assert follower.returncode == 0, logs_err
    assert logs_out == b"last\n"
    assert lost_connection(run_err, cp) == 2, run_err
    assert lost_connection(logs_err, cp) == 2, logs_err


async def test_a_control_plane_down_at_the_start_is_reported_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path) as (cp, cli, _):
        job_id = (await cli("run", "-d", "--image", JOB_IMAGE, "--", "true")).stdout.decode().strip()
        await cp.kill()
        for args in (
            ["logs", "--follow", job_id],
            ["run", "--image", JOB_IMAGE, "--", "true"],
            ["jobs", "list"],
        ):
            started = time.monotonic()
            result = await cli(*args, within=30)
            assert result.returncode == 125, (args, result.stderr)
            lines = result.stderr.decode().strip().splitlines()
            assert len(lines) == 1, (args, lines)
            assert f"cannot reach the control plane at 127.0.0.1:{cp.api_port}" in lines[0]
            assert "is the control plane running and reachable?" in lines[0]
            assert time.monotonic() - started < 10, args


@pytest.mark.docker
async def test_a_control_plane_gone_for_longer_than_the_window_ends_the_follow(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    async with serving(tmp_path) as (cp, cli, token), agent_running(cp, token, tmp_path, docker_client):
        cli.env["TESTHIDE_RECONNECT_WINDOW"] = "2s"
        script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done"
        follower = await cli.start("run", "--image", JOB_IMAGE, "--", "sh", "-c", script)
        assert follower.stdout is not None
        assert await asyncio.wait_for(follower.stdout.readline(), 60) == b"first\n"
        await cp.kill()
        lost_at = time.monotonic()
        _, err = await asyncio.wait_for(follower.communicate(), 30)
        waited = time.monotonic() - lost_at
        await cp.start()  # lets the agent end the job when it stops
    assert follower.returncode == 125
    lines = err.decode().strip().splitlines()
    assert "reconnecting for up to 2s" in lines[-2]
    assert f"cannot reach the control plane at 127.0.0.1:{cp.api_port}" in lines[-1]
    assert "gave up after reconnecting for 2s" in lines[-1]
    assert 2 <= waited < 15
