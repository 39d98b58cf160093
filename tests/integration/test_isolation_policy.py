"""The control plane holds what the agent read back from a job's live container
against the job and its pool (controlplane/jobs/isolation_policy.py) before the
job may run on. A container runtime of this test's own attaches the job
container to an internal network the test creates (no route out; the job sends
nothing) instead of none: the job ends ERROR naming network_mode and interfaces,
`jobs show` says so, its container is stopped and removed, the audit chain and
the log record it. Its twin, the agent's own runtime, runs its job to success
with the facts checked. Real control plane, agent, Docker and CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from docker import DockerClient
from structlog.testing import capture_logs

from testhide.agent.daemon import Agent
from testhide.agent.runtime.base import ContainerSpec, OutputQueue
from testhide.agent.runtime.docker import LABEL, DockerContainer, DockerRuntime
from testhide.controlplane.auth.audit import AuditEvent
from tests.docker_runtimes import SHARED_LOOPBACK_ARGS, registered_runtime
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, running_agent

pytestmark = pytest.mark.docker


class InternalNetworkRuntime(DockerRuntime):
    """Docker as the agent drives it, but the job container joins ``network``
    instead of none: an engine or agent that did not apply what it should."""

    def __init__(self, client: DockerClient, network: str) -> None:
        super().__init__(client)
        self._network = network

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> DockerContainer:
        return await super().start(replace(spec, network=self._network), output)


@pytest.fixture
def internal_network(docker_client: DockerClient) -> Iterator[str]:
    """A network with no route out of it (``--internal``), removed afterwards."""
    network = docker_client.networks.create(
        f"testhide-test-internal-{time.monotonic_ns()}", driver="bridge", internal=True
    )
    try:
        yield str(network.name)
    finally:
        network.remove()


@pytest.fixture
async def networked_agent(
    cp: RunningControlPlane, tmp_path: Path, docker_client: DockerClient, internal_network: str
) -> AsyncIterator[Agent]:
    from datetime import timedelta

    runtime = InternalNetworkRuntime(docker_client, internal_network)
    async with running_agent(cp, tmp_path, runtime, stop_grace=timedelta(seconds=1)) as agent:
        yield agent


async def shown(cli: Cli, job_id: str) -> dict[str, object]:
    result = await cli("jobs", "show", "--json", job_id)
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def removed_within(client: DockerClient, job_id: str, since: float, within: float) -> bool:
    """Whether the job's container was destroyed between ``since`` and ``within`` seconds
    from now (Docker replays the events since ``since``: none is missed)."""
    events = client.events(
        decode=True,
        since=int(since),
        until=int(time.time() + within),
        filters={"type": "container", "event": "destroy", "label": f"{LABEL}={job_id}"},
    )
    try:
        return any(True for _ in events)
    finally:
        events.close()


async def audited(cp: RunningControlPlane, action: str) -> list[AuditEvent]:
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [e.event for e in entries if e.event.action == action]


async def test_a_job_container_given_a_network_is_stopped_as_error_naming_the_fields(
    networked_agent: Agent,
    cli: Cli,
    cp: RunningControlPlane,
    docker_client: DockerClient,
    internal_network: str,
) -> None:
    began = time.time()
    with capture_logs() as events:
        # Alive long enough to be read back, and to be stopped: it sends nothing.
        ran = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "sleep 60")
    elapsed = time.time() - began
    assert ran.returncode != 0
    job_id = ran.stderr.decode().split()[1]
    assert elapsed < 50  # stopped by the control plane, not run to its end

    job = await shown(cli, job_id)
    assert job["status"] == "ERROR"
    reason = str(job["status_reason"])
    assert f"network_mode: expected none, got {internal_network}" in reason
    assert "interfaces: expected lo only, got eth0, lo" in reason
    isolation = job["isolation"]
    assert isinstance(isolation, dict)
    assert (isolation["network_mode"], isolation["interfaces"]) == (internal_network, ["eth0", "lo"])
    transitions = job["transitions"]
    assert isinstance(transitions, list)
    assert [t["status"] for t in transitions] == ["QUEUED", "ASSIGNED", "RUNNING", "ERROR"]

    human = await cli("jobs", "show", job_id)
    assert human.returncode == 0, human.stderr
    text = human.stdout.decode()
    assert "network_mode: expected none" in text
    assert "interfaces: expected lo only" in text

    # The agent was told to stop it: its container goes.
    assert await asyncio.to_thread(removed_within, docker_client, job_id, began, 30)
    [logged] = [e for e in events if e["event"] == "job_isolation_mismatch"]
    assert (logged["job_id"], logged["fields"]) == (job_id, ["network_mode", "interfaces"])
    [entry] = await audited(cp, "job_isolation_mismatch")
    assert (entry.actor, entry.target) == (f"agent:{networked_agent.agent_id}", job_id)
    assert entry.details["fields"] == ["network_mode", "interfaces"]


async def test_the_agents_own_runtime_passes_the_check_and_its_job_runs_to_its_end(
    docker_agent: Agent, cli: Cli, cp: RunningControlPlane
) -> None:
    with capture_logs() as events:
        ran = await cli(
            "run", "--image", JOB_IMAGE, "--cpus", "1.5", "--memory", "256MiB", "--pids", "100",
            "--", "sh", "-c", "sleep 1; echo ok",
        )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.decode() == "ok\n"
    job = await shown(cli, ran.stderr.decode().split()[1])
    assert (job["status"], job["status_reason"]) == ("SUCCEEDED", "")
    isolation = job["isolation"]
    assert isinstance(isolation, dict)
    assert (isolation["network_mode"], isolation["interfaces"]) == ("none", ["lo"])  # checked, and held
    assert [e for e in events if e["event"] == "job_isolation_mismatch"] == []
    assert await audited(cp, "job_isolation_mismatch") == []


@pytest.fixture
def shared_loopback_runsc(docker_client: DockerClient) -> Iterator[str]:
    """runsc registered once more with --network=host, as for services under gVisor."""
    with registered_runtime(docker_client, "runsc-sharedlo-policy", SHARED_LOOPBACK_ARGS) as name:
        yield name


async def test_a_job_with_a_service_under_gvisor_passes_under_the_shared_loopback_registration(
    shared_loopback_runsc: str, docker_agent: Agent, cli: Cli
) -> None:
    ran = await cli(
        "run", "--image", JOB_IMAGE, "--runtime", "runsc", "--pids", "100",
        "--service", f"idle={JOB_IMAGE}", "--service-command", "idle=sleep 3600",
        "--", "sh", "-c", "sleep 1; echo ok",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    job = await shown(cli, ran.stderr.decode().split()[1])
    assert (job["status"], job["status_reason"]) == ("SUCCEEDED", "")
    isolation = job["isolation"]
    assert isinstance(isolation, dict)
    # Not "runsc", not "none": the registration sharing the services' loopback, in their holder's namespace.
    assert (isolation["runtime"], isolation["seccomp"]) == (shared_loopback_runsc, "testhide-gvisor")
    assert str(isolation["network_mode"]).startswith("container:")
    assert isolation["interfaces"] == ["lo"]
    assert isolation["pids_limit"] > 100  # the sandbox's budget
