"""Hostile conditions: the control plane's database locked by another process,
its disk full, and the Docker daemon going away under the agent. Each must give
a clear error, change nothing it should not, and recover once cleared."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import pytest

from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.jobs.model import JobStatus
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    assert_same_bytes,
    containers_of,
    control_plane,
    eventually,
    in_status,
    job,
    log_reached,
    numbered,
    running_agent,
    unavailable,
)
from tests.netproxy import CuttableProxy

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.timeout(180)]

WAIT_FOR_GO = "while [ ! -e /tmp/go ]; do sleep 0.1; done"


async def start_job(cli: Cli, script: str) -> str:
    result = await cli("run", "-d", "--no-workspace", "--image", JOB_IMAGE, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


async def release_job(docker_client: Any, job_id: str) -> None:
    """Let a job waiting for /tmp/go go on (docker exec, as its own user)."""
    await asyncio.to_thread(containers_of(docker_client, job_id)[0].exec_run, ["touch", "/tmp/go"])


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def finished_log(cli: Cli, job_id: str) -> bytes:
    followed = await cli("logs", "--follow", job_id, within=120)
    assert followed.returncode == 0, followed.stderr
    return followed.stdout


async def refused_submit(cli: Cli) -> str:
    result = await cli("run", "-d", "--no-workspace", "--image", JOB_IMAGE, "--", "true")
    assert result.returncode != 0
    return result.stderr.decode()


async def test_locked_database_refuses_clearly_and_recovers(tmp_path: Path, docker_client: Any) -> None:
    async with (
        control_plane(tmp_path, db_busy_timeout=timedelta(milliseconds=300)) as cp,
        running_agent(
            cp,
            tmp_path,
            DockerRuntime(docker_client),
            max_backoff=timedelta(seconds=1),
            stop_grace=timedelta(seconds=1),
        ) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id = await start_job(cli, f"seq 1 1000; {WAIT_FOR_GO}; seq 1001 200000")
        await eventually(lambda: log_reached(cp, job_id, len(numbered(1, 1000))), 30, "the first lines")

        locker = sqlite3.connect(cp.data_dir / "testhide.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # an operator's tool holding the write lock
        try:
            message = await refused_submit(cli)
            assert "database is locked by another process" in message
            assert "nothing was changed" in message
            # The job finishes while nothing can be stored: its output and result wait on the agent.
            await release_job(docker_client, job_id)
            await asyncio.wait_for(agent.job_done(job_id), 60)  # the job to end
            assert (await job(cp, job_id)).status == JobStatus.RUNNING
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        log = await finished_log(cli, job_id)
        final = await job(cp, job_id)
        assert cp.daemon.jobs is not None
        listed, _ = await cp.daemon.jobs.list("default", 50, "")
    assert_same_bytes(log, numbered(1, 200000))
    assert final.status == JobStatus.SUCCEEDED
    assert [j.id for j in listed] == [job_id], "the refused submit left nothing behind"
    assert integrity(cp.data_dir / "testhide.db") == "ok"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of our own, filled up by the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        unavailable(f"cannot mount a tmpfs (CI runs as root): {exc}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem has not one byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1024 * 1024, 65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


async def test_full_disk_refuses_writes_keeps_serving_reads_and_recovers(
    tmp_path: Path, small_disk: Path, docker_client: Any
) -> None:
    async with (
        control_plane(small_disk) as cp,
        running_agent(
            cp,
            tmp_path,
            DockerRuntime(docker_client),
            max_backoff=timedelta(seconds=1),
            stop_grace=timedelta(seconds=1),
        ) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id = await start_job(cli, f"seq 1 1000; {WAIT_FOR_GO}; seq 1001 300000")
        await eventually(lambda: log_reached(cp, job_id, len(numbered(1, 1000))), 30, "the first lines")

        filler = fill(small_disk)
        try:
            message = await refused_submit(cli)
            assert "disk is full" in message, message
            assert "nothing was changed" in message, message
            shown = await cli("jobs", "show", job_id)  # reads still work
            assert shown.returncode == 0
            assert b"RUNNING" in shown.stdout
            await release_job(docker_client, job_id)
            await asyncio.wait_for(agent.job_done(job_id), 60)  # the job to end
            assert agent.outbox.unacked_bytes() > 0, "its output waits on the agent"
        finally:
            os.unlink(filler)
        log = await finished_log(cli, job_id)
        final = await job(cp, job_id)
        again = await cli("run", "--no-workspace", "--image", JOB_IMAGE, "--", "echo", "space again")
    assert_same_bytes(log, numbered(1, 300000))
    assert final.status == JobStatus.SUCCEEDED
    assert again.returncode == 0
    assert again.stdout == b"space again\n"
    assert integrity(cp.data_dir / "testhide.db") == "ok"


async def test_docker_daemon_going_away_fails_the_running_job_and_pauses_the_agent(
    tmp_path: Path, docker_client: Any
) -> None:
    engine_socket = Path(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://"))
    async with (
        CuttableProxy.unix(tmp_path / "docker.sock", engine_socket) as engine,
        control_plane(tmp_path) as cp,
    ):
        # docker-py blocks: through a proxy on this event loop it must run in a thread.
        client = await asyncio.to_thread(docker.DockerClient, base_url=f"unix://{tmp_path / 'docker.sock'}")
        runtime = DockerRuntime(client)
        await asyncio.to_thread(runtime.runtimes)  # asked once, then cached
        async with running_agent(
            cp, tmp_path, runtime, max_backoff=timedelta(seconds=1), stop_grace=timedelta(seconds=1)
        ) as agent:
            cli = Cli(tmp_path / "config")
            assert (await cli.login(cp)).returncode == 0
            first = await start_job(cli, "echo started; sleep 600")
            await eventually(lambda: log_reached(cp, first, 1), 30, "the job to start")

            engine.cut()  # to the agent, the daemon is gone (the container itself lives on)
            failed = await eventually(lambda: in_status(cp, first, JobStatus.ERROR), 30, "the job to fail")
            assert "lost contact with the container engine" in failed.status_reason
            await eventually(lambda: _paused(cp, agent.agent_id), 10, "the agent to stop taking jobs")
            second = await start_job(cli, "echo after the restart")
            waiting = await job(cp, second)
            assert waiting.status == JobStatus.QUEUED
            assert "container engine is down" in waiting.status_reason

            engine.restore()
            done = await eventually(lambda: in_status(cp, second, JobStatus.SUCCEEDED), 60, "the next job")
            log = await finished_log(cli, second)
            await eventually(
                lambda: containers_of(docker_client, first) == [],
                30,
                "the first job's container to be removed",
            )
    assert log == b"after the restart\n"
    assert [t.status for t in done.transitions][-1] == JobStatus.SUCCEEDED


async def _paused(cp: RunningControlPlane, agent_id: str) -> bool:
    assert cp.daemon.scheduler is not None
    session = cp.daemon.scheduler.session_of(agent_id)
    return session is not None and session.draining
