"""The build host: its disk filling up, its Docker engine out of reach, and what
``agents list`` tells the operator about each agent.

A full disk is a real one: a small tmpfs mounted here (as root) under the
agent's data dir, filled with a file the test removes to give the space back.
The control plane runs as its own process, so it can be killed and started
again while the agent (in this process, on real Docker) runs on."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from docker import DockerClient
from structlog.testing import capture_logs

from testhide import __version__
from testhide.agent import outbox as outbox_module
from testhide.agent import spool as spool_module
from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.errors import EnrollmentError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.base import ContainerSpec, OutputQueue
from testhide.agent.runtime.docker import DockerRuntime
from testhide.agent.runtime.fake import FakeContainer, FakeRuntime, Script
from testhide.controlplane.ca.enrollment import create_token
from testhide.controlplane.datadir import DataDir, initialise
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from tests.harness import (
    JOB_IMAGE,
    REPO,
    Cli,
    ControlPlaneProcess,
    RunningControlPlane,
    containers_of,
    control_plane,
    eventually,
    free_port,
    numbered,
    operator,
    running_agent,
    unavailable,
)
from tests.pg import fresh_database

MiB = 1024 * 1024


# ---------------------------------------------------------------- a disk of our own


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``small_disk(name, size)``: a tmpfs of ``size`` (mount's units) at tmp_path/name,
    unmounted after the test."""
    with ExitStack() as mounted:

        def mount(name: str, size: str) -> Path:
            if os.geteuid() != 0:
                unavailable("mounting a tmpfs needs root")
            where = tmp_path / name
            where.mkdir()
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                unavailable(f"cannot mount a tmpfs: {done.stderr.strip()}")
            mounted.callback(subprocess.run, ["umount", "--lazy", str(where)], check=True)
            return where

        yield mount


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk``; remove it to give the space back."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    size = stats.f_bavail * stats.f_frsize - leave
    with filler.open("wb") as handle:
        block = bytes(MiB)
        while size > 0:
            size -= handle.write(block[: min(size, MiB)])
    return filler


def fill_up(disk: Path) -> None:
    """Nothing left: written until the disk refuses."""
    block = bytes(64 * 1024)
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):  # noqa: PT012
        while True:
            handle.write(block)


# ---------------------------------------------------------------- a control plane that can go away


async def control_plane_process(tmp_path: Path) -> tuple[ControlPlaneProcess, str]:
    """Serving on fixed ports (it is killed and started again); the default pool
    never pulls. Its admin API key."""
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    store = await DataDir(data_dir).open_store()
    try:
        await store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
    finally:
        await store.close()
    cp = ControlPlaneProcess(data_dir, free_port(), free_port())
    await cp.start()
    return cp, admin_key


async def token_of(cp: ControlPlaneProcess) -> str:
    store = await DataDir(cp.data_dir).open_store()
    try:
        ca_pem = (cp.data_dir / "ca.pem").read_bytes()
        return await create_token(store, ca_pem, "default", "default", timedelta(minutes=10))
    finally:
        await store.close()


@pytest.fixture
def agent_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """What the agent in this process logs about its spool and its jobs' output."""
    # Loggers of their own: ones cached before (another test configured logging) bypass capture_logs.
    monkeypatch.setattr(spool_module, "log", structlog.get_logger("testhide.agent.spool"))
    monkeypatch.setattr(outbox_module, "log", structlog.get_logger("testhide.agent.outbox"))
    with capture_logs() as events:
        yield events


def named(events: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e["event"] == name]


async def shown(cli: Cli, job_id: str) -> dict[str, Any]:
    result = await cli("jobs", "show", job_id, "--json")
    assert result.returncode == 0, result.stderr
    job: dict[str, Any] = json.loads(result.stdout)
    return job


async def finished(cli: Cli, job_id: str) -> dict[str, Any] | None:
    job = await shown(cli, job_id)
    return job if job["status"] not in ("QUEUED", "ASSIGNED", "RUNNING") else None


@asynccontextmanager
async def on_a_small_disk(
    tmp_path: Path, small_disk: Callable[[str, str], Path], docker_client: DockerClient, size: str
) -> AsyncIterator[tuple[ControlPlaneProcess, Agent, Cli, Path]]:
    """A control plane process; an agent whose data dir (and so its spool) is a
    tmpfs of ``size``, running on Docker; a logged-in CLI."""
    disk = small_disk("agent-disk", size)
    cp, admin_key = await control_plane_process(tmp_path)
    try:
        await enroll(f"127.0.0.1:{cp.api_port}", await token_of(cp), disk / "agent", "small-disk")
        agent = Agent(
            AgentConfig(data_dir=disk / "agent", max_backoff=timedelta(seconds=1)),
            DockerRuntime(docker_client),
        )
        agent_task = asyncio.create_task(agent.run())
        try:
            cli = Cli(tmp_path / "config")
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
            yield cp, agent, cli, disk
            assert not agent_task.done(), "the agent stopped"
            # The agent is healthy: it runs the next job as ever.
            after = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "echo still-here")
            assert (after.returncode, after.stdout) == (0, b"still-here\n"), after.stderr
        finally:
            agent.shutdown()
            await asyncio.wait_for(agent_task, 60)
    finally:
        await cp.stop()


# ---------------------------------------------------------------- a full disk under a running job


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_full_disk_holds_the_jobs_output_until_space_returns_and_loses_nothing(
    tmp_path: Path,
    small_disk: Callable[[str, str], Path],
    docker_client: DockerClient,
    agent_events: list[MutableMapping[str, Any]],
) -> None:
    async with on_a_small_disk(tmp_path, small_disk, docker_client, "48m") as (cp, agent, cli, disk):
        filler = fill(disk, leave=4 * MiB)
        # About 39 MB, after a pause in which the control plane goes away: far more than
        # fits on the disk, in memory and in the output buffer together.
        script = "echo start; sleep 2; seq 1 5000000"
        job_id = (
            (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", script)).stdout.decode().strip()
        )
        await eventually(lambda: agent.outbox.sent_batches(job_id) >= 1, 60, "the job's first output")
        await cp.kill()

        await eventually(lambda: named(agent_events, "job_output_waiting"), 60, "the output to wait")
        assert job_id in agent.executing()  # the job waits, its output kept
        [refused] = named(agent_events, "spool_write_failed")  # one warning, however many writes fail
        assert refused["log_level"] == "warning"
        assert (refused["errno"], refused["error"]) == ("ENOSPC", "No space left on device")
        assert refused["path"] == str(disk / "agent" / "spool" / f"{job_id}.spool")

        filler.unlink()  # space again: the job resumes and ends, the control plane still away
        await eventually(lambda: job_id not in agent.executing(), 120, "the job to finish")
        assert named(agent_events, "spool_writable_again")

        await cp.start()
        done = await eventually(lambda: finished(cli, job_id), 120, "the result")
        assert done["status"] == "SUCCEEDED", done
        stored = await cli("logs", job_id, within=120)
        assert stored.stdout == b"start\n" + numbered(1, 5000000), "the log lost, repeated or reordered bytes"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_with_the_disk_still_full_the_control_plane_back_drains_the_output_and_cancel_stops_the_job(
    tmp_path: Path,
    small_disk: Callable[[str, str], Path],
    docker_client: DockerClient,
    agent_events: list[MutableMapping[str, Any]],
) -> None:
    async with on_a_small_disk(tmp_path, small_disk, docker_client, "16m") as (cp, agent, cli, disk):
        fill(disk, leave=2 * MiB)
        burst = numbered(1, 100000)  # each pass of the loop prints it again
        script = "echo start; sleep 2; while :; do seq 1 100000; sleep 0.05; done"
        job_id = (
            (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", script)).stdout.decode().strip()
        )
        await eventually(lambda: agent.outbox.sent_batches(job_id) >= 1, 60, "the job's first output")
        await cp.kill()
        await eventually(lambda: named(agent_events, "job_output_waiting"), 60, "the output to wait")

        await cp.start()  # the disk stays full; the output goes to the control plane again
        held = 10 * MiB  # at least the disk's 2 MiB and memory's 8 MiB that waited

        async def drained() -> bool:
            return bool((await shown(cli, job_id))["log_size"] > held)

        await eventually(drained, 120, "the waiting output to reach the control plane")
        # It drained with the disk full: the filler, never removed, keeps it so, and the disk did
        # refuse the spool. (A spool write may still succeed meanwhile: the disk refused a batch larger
        # than the space left, and a smaller batch fits that space. Asserting that none did failed
        # under load, where the job's output comes in smaller batches.)
        assert named(agent_events, "spool_write_failed")
        canceled = await cli("cancel", job_id)
        assert canceled.returncode == 0, canceled.stderr
        done = await eventually(lambda: finished(cli, job_id), 60, "the job to end")
        assert done["status"] == "CANCELED", done
        await eventually(lambda: not containers_of(docker_client, job_id), 60, "the container to go")
        stored = (await cli("logs", job_id, within=120)).stdout
        body = stored.removeprefix(b"start\n").split(b"\n[testhide: log truncated", 1)[0]
        passes = len(body) // len(burst) + 1
        assert (burst * passes).startswith(body), "the log lost, repeated or reordered bytes"


# ---------------------------------------------------------------- enrollment and a full disk


async def run_agent_command(
    *args: str, env: dict[str, str] | None = None, within: float = 60
) -> tuple[int, str]:
    """``testhide-agent ARGS`` in a subprocess; its exit status and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testhide.agent.cli",
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def agents_listed(data_dir: Path) -> dict[str, dict[str, Any]]:
    code, out, err = await operator("agents", "list", "--json", "--data-dir", str(data_dir))
    assert code == 0, err
    return {a["id"]: a for a in json.loads(out)}


async def test_enrolling_onto_a_full_disk_says_so_in_one_line_and_keeps_the_token(
    cp: RunningControlPlane, tmp_path: Path, small_disk: Callable[[str, str], Path]
) -> None:
    disk = small_disk("full", "1m")
    fill_up(disk)
    token = await cp.enrollment_token()
    data_dir = disk / "agent"
    code, err = await run_agent_command(
        "enroll", "--server", cp.api_target, "--token", token, "--data-dir", str(data_dir)
    )
    assert code != 0
    assert err == f"Error: cannot write the agent data dir {data_dir}: No space left on device\n"
    assert await agents_listed(cp.data_dir) == {}  # nothing enrolled
    assert not data_dir.exists()

    code, err = await run_agent_command(
        "enroll", "--server", cp.api_target, "--token", token, "--data-dir", str(tmp_path / "agent")
    )
    assert code == 0, err  # the same token, not spent by the failure
    [agent] = (await agents_listed(cp.data_dir)).values()
    assert agent["id"] == Credentials.load(tmp_path / "agent").agent_id


class HoldingRuntime(FakeRuntime):
    """Every job runs until stopped."""

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> FakeContainer:
        self.scripts.setdefault(spec.job_id, Script(hold=True))
        return await super().start(spec, output)


@pytest.fixture(params=["sqlite", "postgres"])
async def any_control_plane(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RunningControlPlane]:
    """On SQLite, and on PostgreSQL (a fresh database of the test cluster)."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(fresh_database()) if request.param == "postgres" else None
        yield await stack.enter_async_context(control_plane(tmp_path, database_url=url))


async def test_agents_list_shows_who_is_connected_and_an_agent_whose_credentials_were_never_saved(
    any_control_plane: RunningControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = any_control_plane
    lost_dir = tmp_path / "lost-agent"

    def disk_full(self: Credentials, directory: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(Credentials, "save", disk_full)
        with pytest.raises(EnrollmentError) as refused:
            await enroll(cp.api_target, await cp.enrollment_token(), lost_dir, "lost")
    [lost_id] = await agents_listed(cp.data_dir)
    message = str(refused.value)
    assert f"enrolled as agent {lost_id}, but cannot save its credentials in {lost_dir}" in message
    assert "No space left on device" in message
    assert f"testhide-controlplane agents revoke {lost_id}" in message
    assert not lost_dir.exists()  # no half of an identity left behind

    labels = {"arch": "amd64", "disk": "ssd"}
    async with running_agent(cp, tmp_path, HoldingRuntime(), name="busy", labels=labels, max_jobs=3) as agent:
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id = (await cli("run", "-d", "--image", JOB_IMAGE, "--", "true")).stdout.decode().strip()
        assert job_id

        async def running_one() -> dict[str, dict[str, Any]] | None:
            listed = await agents_listed(cp.data_dir)
            return listed if listed[agent.agent_id]["running_jobs"] == 1 else None

        listed = await eventually(running_one, 30, "the job to run")
        busy, lost = listed[agent.agent_id], listed[lost_id]
        assert busy["connected"] is True
        assert busy["last_seen_at"] is not None
        assert (busy["labels"], busy["runtimes"], busy["max_jobs"]) == (labels, ["runc"], 3)
        assert (busy["version"], busy["state"]) == (__version__, "active")
        assert (lost["connected"], lost["last_seen_at"], lost["running_jobs"]) == (False, None, 0)
        assert (lost["labels"], lost["runtimes"], lost["max_jobs"], lost["version"]) == ({}, [], None, None)

        code, table, err = await operator("agents", "list", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        header, *rows = table.splitlines()
        assert header.split() == [
            "ID",
            "NAME",
            "ORG",
            "POOL",
            "STATE",
            "CONNECTED",
            "LAST_SEEN_AT",
            "RUNNING_JOBS",
            "MAX_JOBS",
            "LABELS",
            "RUNTIMES",
            "VERSION",
        ]
        [busy_row] = [r.split() for r in rows if r.startswith(agent.agent_id)]
        [lost_row] = [r.split() for r in rows if r.startswith(lost_id)]
        assert busy_row[5] == "yes"
        assert busy_row[7:11] == ["1", "3", "arch=amd64,disk=ssd", "runc"]
        assert lost_row[5:7] == ["never", "-"]

    # Gone: not connected any more, its last contact and offer kept.
    async def disconnected() -> dict[str, Any] | None:
        listed = (await agents_listed(cp.data_dir))[agent.agent_id]
        return None if listed["connected"] else listed

    gone = await eventually(disconnected, 30, "the agent to be shown disconnected")
    assert gone["labels"] == labels
    assert gone["last_seen_at"] >= busy["last_seen_at"]

    code, _, err = await operator("agents", "revoke", lost_id, "--data-dir", str(cp.data_dir))
    assert code == 0, err
    assert (await agents_listed(cp.data_dir))[lost_id]["state"] == "revoked"


# ---------------------------------------------------------------- Docker out of reach


async def test_an_unreachable_docker_engine_is_named_in_one_line(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    data_dir = tmp_path / "agent"
    await enroll(cp.api_target, await cp.enrollment_token(), data_dir, "no-docker")
    code, err = await run_agent_command(
        "run", "--data-dir", str(data_dir), env={"DOCKER_HOST": "unix:///nonexistent.sock"}
    )
    assert code != 0
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "Docker engine" in line]
    assert line == (
        "Error: cannot reach the Docker engine at unix:///nonexistent.sock (No such file or directory): "
        "is dockerd running? DOCKER_HOST=unix:///nonexistent.sock"
    )
