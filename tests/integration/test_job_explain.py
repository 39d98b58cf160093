"""Jobs explain themselves: `jobs show` gives the whole spec, the agent (name,
host, version), the isolation the agent read back from the live container, and
every transition; `run` says why its job waits, again when that changes, and
where it runs; Ctrl-C on `run` cancels the job and follows it to its end, a
second Ctrl-C (or the first with --detach-on-interrupt) detaches. Real control
plane, agents, Docker and CLI processes; the store on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from docker import DockerClient

from testhide import __version__
from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.ca.store import AgentHello
from testhide.controlplane.errors import NotHeld
from testhide.controlplane.jobs.model import Isolation, JobAgent, JobStatus
from testhide.controlplane.store.base import Store
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, running_agent
from tests.integration.test_store import NOW, assigned, empty_store, new_agent, populate

JOB_KEYS = [
    "id",
    "status",
    "exit_code",
    "status_reason",
    "image",
    "command",
    "pool",
    "agent_id",
    "attempt",
    "retries",
    "retry_of",
    "retried_as",
    "created_at",
    "started_at",
    "finished_at",
    "log_size",
    "spec",
    "agent",
    "isolation",
    "fetch",
    "service_isolation",
    "transitions",
]
SPEC_KEYS = [
    "image",
    "command",
    "env",
    "pool",
    "workdir",
    "timeout_s",
    "labels",
    "secrets",
    "runtime",
    "cpus",
    "memory_bytes",
    "pids",
    "artifact_globs",
    "junit_globs",
    "workspace_id",
    "fetch",
    "fetch_secrets",
    "cache",
    "services",
]
AGENT_KEYS = ["id", "name", "host", "version", "pool"]
ISOLATION_KEYS = [
    "runtime",
    "network_mode",
    "interfaces",
    "user",
    "cap_add",
    "cap_drop",
    "no_new_privileges",
    "seccomp",
    "read_only_root",
    "pids_limit",
    "memory_bytes",
    "cpus",
    "image_id",
    "image_digest",
    "mounts",
]
MIB = 1024 * 1024


async def shown(cli: Cli, job_id: str) -> dict[str, Any]:
    result = await cli("jobs", "show", "--json", job_id)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


async def job_id_of(process: asyncio.subprocess.Process) -> str:
    """`run` names its job on its first line of stderr: "job ID queued"."""
    assert process.stderr is not None
    first = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
    assert first.endswith(" queued\n"), first
    return first.split()[1]


async def stderr_until(process: asyncio.subprocess.Process, text: str, within: float = 60) -> str:
    """Lines of stderr up to and including the first holding ``text``."""
    assert process.stderr is not None
    seen = ""
    async with asyncio.timeout(within):
        while text not in seen:
            line = await process.stderr.readline()
            assert line, f"stderr ended without {text!r}: {seen}"
            seen += line.decode()
    return seen


async def status_becomes(cli: Cli, job_id: str, status: str, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        job = await shown(cli, job_id)
        if job["status"] == status or time.monotonic() > deadline:
            assert job["status"] == status, job
            return job
        await asyncio.sleep(0.2)  # polling a state, with a deadline


# ---------------------------------------------------------------- jobs show


@pytest.mark.docker
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_jobs_show_gives_the_spec_the_agent_and_the_isolation_read_back(
    docker_agent: Agent, cli: Cli, runtime: str
) -> None:
    # Alive for a moment: its network interfaces are read once it has started.
    script = "sleep 1; echo ok"
    ran = await cli(
        "run", "--runtime", runtime, "--image", JOB_IMAGE, "--cpus", "1.5", "--memory", "256MiB",
        "--pids", "100", "--env", "A=1", "--artifacts", "out/*", "--", "sh", "-c", script,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    job_id = ran.stderr.decode().split()[1]
    job = await shown(cli, job_id)

    assert list(job) == JOB_KEYS
    assert list(job["spec"]) == SPEC_KEYS
    assert list(job["agent"]) == AGENT_KEYS
    assert list(job["isolation"]) == ISOLATION_KEYS
    spec = job["spec"]
    assert (spec["command"], spec["env"], spec["labels"]) == (["sh", "-c", script], {"A": "1"}, {})
    assert (spec["cpus"], spec["memory_bytes"], spec["pids"], spec["timeout_s"]) == (
        1.5,
        256 * MIB,
        100,
        3600,
    )
    assert spec["runtime"] == runtime
    assert job["agent"] == {
        "id": docker_agent.agent_id,
        "name": "agent",
        "host": socket.gethostname(),
        "version": __version__,
        "pool": "default",
    }
    isolation = job["isolation"]
    assert isolation["runtime"] == runtime
    assert (isolation["network_mode"], isolation["interfaces"]) == ("none", ["lo"])
    assert isolation["cap_drop"] == ["ALL"]
    assert isolation["cap_add"] == []
    assert isolation["no_new_privileges"] is True
    assert isolation["read_only_root"] is True
    assert isolation["seccomp"] == ("testhide" if runtime == "runc" else "testhide-gvisor")
    assert isolation["user"] == "65534:65534"
    assert (isolation["memory_bytes"], isolation["cpus"]) == (256 * MIB, 1.5)
    # Under gVisor the container's pids limit is the sandbox's host-thread budget (gvisor.py).
    assert isolation["pids_limit"] == 100 if runtime == "runc" else isolation["pids_limit"] > 100
    assert isolation["image_id"].startswith("sha256:")
    assert isolation["mounts"] == ["/tmp (tmpfs)", "/workspace (rw)"]  # a volume: artifacts come from it
    assert spec["artifact_globs"] == ["out/*"]
    assert [t["status"] for t in job["transitions"]] == ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]

    human = await cli("jobs", "show", job_id)
    assert human.returncode == 0, human.stderr
    text = human.stdout.decode()
    assert f"agent on {socket.gethostname()} (testhide {__version__}" in text
    assert "network none (interfaces: lo)" in text
    assert "capabilities: drop ALL" in text
    assert "SUCCEEDED" in text.split("transitions:")[1]


async def test_a_queued_job_has_no_agent_and_no_isolation_yet(cp: RunningControlPlane, cli: Cli) -> None:
    job_id = (await cli("run", "-d", "--image", JOB_IMAGE, "--", "true")).stdout.decode().strip()
    job = await shown(cli, job_id)
    assert list(job) == JOB_KEYS
    assert (job["status"], job["agent"], job["isolation"], job["fetch"]) == ("QUEUED", None, None, None)
    assert "no agent of pool 'default' is connected" in job["status_reason"]
    listed = json.loads((await cli("jobs", "list", "--json")).stdout)
    assert [list(j) for j in listed] == [JOB_KEYS]
    text = (await cli("jobs", "show", job_id)).stdout.decode()
    assert "the container has not been created yet" in text
    assert f"now QUEUED: {job['status_reason']}" in text


# ---------------------------------------------------------------- why a job waits


@pytest.mark.docker
async def test_run_says_why_its_job_waits_and_when_that_changes(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    runner = await cli.start("run", "--label", "gpu=yes", "--image", JOB_IMAGE, "--", "echo", "done")
    job_id = await job_id_of(runner)
    waiting = f"job {job_id} queued: waiting: no connected agent of pool 'default' offers labels gpu=yes"
    said = await stderr_until(runner, waiting)
    # Looked at again every second meanwhile, and said once: the reason did not change
    # (nothing marks a line that was not said twice: time has to pass).
    await asyncio.sleep(2.5)
    async with running_agent(
        cp, tmp_path, DockerRuntime(docker_client), name="gpu-box", labels={"gpu": "yes"}
    ):
        said += await stderr_until(runner, f"job {job_id} running on gpu-box ({socket.gethostname()})")
        out, rest = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 0, said + rest.decode()
    assert out == b"done\n"
    assert said.count(waiting) == 1, said
    assert (said + rest.decode()).count("running on") == 1


# ---------------------------------------------------------------- Ctrl-C


async def started_run(cli: Cli, *options: str) -> tuple[asyncio.subprocess.Process, str]:
    """`run` of a job that prints "started" and then sleeps, once the job is running."""
    runner = await cli.start(
        "run", *options, "--image", JOB_IMAGE, "--", "sh", "-c", "echo started; sleep 300"
    )
    job_id = await job_id_of(runner)
    assert runner.stdout is not None
    assert await asyncio.wait_for(runner.stdout.readline(), 60) == b"started\n"
    await status_becomes(cli, job_id, "RUNNING")
    return runner, job_id


@pytest.mark.docker
async def test_ctrl_c_cancels_the_job_and_follows_it_to_its_end(docker_agent: Agent, cli: Cli) -> None:
    runner, job_id = await started_run(cli)
    runner.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 130, err
    assert f"testhide: canceling job {job_id} (press Ctrl-C again to detach)" in err.decode()
    assert f"job {job_id} CANCELED: canceled by user" in err.decode()
    assert b"detached" not in err
    assert (await shown(cli, job_id))["status"] == "CANCELED"


@pytest.mark.docker
async def test_a_second_ctrl_c_detaches_while_the_cancel_goes_on(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    # A job that ignores SIGTERM runs on for the agent's grace period after the cancel.
    async with running_agent(cp, tmp_path, DockerRuntime(docker_client), stop_grace=timedelta(seconds=8)):
        runner = await cli.start(
            "run", "--image", JOB_IMAGE, "--", "sh", "-c", "trap '' TERM; echo started; sleep 300"
        )
        job_id = await job_id_of(runner)
        assert runner.stdout is not None
        assert await asyncio.wait_for(runner.stdout.readline(), 60) == b"started\n"
        await status_becomes(cli, job_id, "RUNNING")
        runner.send_signal(signal.SIGINT)
        await stderr_until(runner, f"testhide: canceling job {job_id}")
        runner.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(runner.communicate(), 30)
        assert runner.returncode == 130, err
        assert (
            f"testhide: detached; job {job_id} is being canceled (it stops within the agent's grace "
            f"period): follow with 'testhide logs -f {job_id}'"
        ) in err.decode()
        assert (await shown(cli, job_id))["status"] == "RUNNING"
        await status_becomes(cli, job_id, "CANCELED")  # the first Ctrl-C's cancel, after the grace


@pytest.mark.docker
async def test_detach_on_interrupt_detaches_at_the_first_ctrl_c(docker_agent: Agent, cli: Cli) -> None:
    runner, job_id = await started_run(cli, "--detach-on-interrupt")
    runner.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(runner.communicate(), 30)
    assert runner.returncode == 130, err
    assert f"testhide: detached; job {job_id} continues" in err.decode()
    assert b"canceling" not in err
    assert (await shown(cli, job_id))["status"] == "RUNNING"
    canceled = await cli("cancel", job_id)
    assert canceled.returncode == 0, canceled.stderr
    await status_becomes(cli, job_id, "CANCELED")


# ---------------------------------------------------------------- the store, both backends

FACTS = Isolation(
    runtime="runc",
    network_mode="none",
    interfaces=("lo",),
    user="65534:65534",
    cap_drop=("ALL",),
    no_new_privileges=True,
    seccomp="testhide",
    read_only_root=True,
    pids_limit=100,
    memory_bytes=256 * MIB,
    cpus=1.5,
    image_id="sha256:abc",
    mounts=("/tmp (tmpfs)", "/workspace (rw)"),
)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        yield s


async def test_isolation_is_stored_from_the_holder_only(store: Store) -> None:
    await assigned(store, "j1")  # held by agent-1 at epoch 1
    with pytest.raises(NotHeld):
        await store.record_isolation("acme", "j1", "agent-2", 1, FACTS)
    with pytest.raises(NotHeld):
        await store.record_isolation("acme", "j1", "agent-1", 2, FACTS)
    assert (await store.get_job("acme", "j1")).isolation is None  # type: ignore[union-attr]
    await store.record_isolation("acme", "j1", "agent-1", 1, FACTS)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.isolation == FACTS
    [listed] = await store.list_jobs("acme", 10, None)
    assert listed.isolation == FACTS


async def test_agents_of_jobs_come_in_one_lookup_with_their_hosts(store: Store) -> None:
    for agent_id in ("a1", "a2"):
        await store.create_agent(new_agent(agent_id))
    await store.create_agent(new_agent("a3", org="other"))
    hello = AgentHello.shown("1.2.3", {}, ["runc"], 2, host="build-7.example\x1b[31m")
    await store.touch_agent("acme", "a1", NOW, hello)
    found = await store.job_agents("acme", {"a1", "a2", "a3", "missing"})
    assert found == {
        "a1": JobAgent("a1", "build-1", "build-7.example[31m", "1.2.3", "default"),
        "a2": JobAgent("a2", "build-1", "", "", "default"),
    }
    assert await store.job_agents("acme", set()) == {}
    assert (await store.get_agent("acme", "a1")).host == "build-7.example[31m"  # type: ignore[union-attr]


async def test_a_job_shows_running_once_its_isolation_is_there(store: Store) -> None:
    await assigned(store, "j1")
    await store.record_isolation("acme", "j1", "agent-1", 1, FACTS)
    job, changed = await store.report_job("acme", "j1", "agent-1", 1, JobStatus.RUNNING, NOW)
    assert changed
    assert (job.status, job.isolation) == (JobStatus.RUNNING, FACTS)
