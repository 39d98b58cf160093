"""The containers beside a job's own are read back and checked too: a fetch step's
container (on the job's own internal network, /workspace read-only, /cache writable)
and each service's (in the namespace the job's container joins, only `lo`) show in
`testhide jobs show` and its --json as Docker applied them. A container runtime of this
test's own attaches the fetch step's container to another internal network the test
creates (no route out): the job ends ERROR naming the fetch step and network_mode while
the fetch step runs, whose container is stopped then; its job step never starts. Real
control plane, agent, Docker, squid and CLI; every network is this test's or the agent's
own internal one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from docker import DockerClient
from structlog.testing import capture_logs

from testhide.agent.daemon import Agent
from testhide.agent.runtime.base import ContainerSpec, OutputQueue
from testhide.agent.runtime.docker import DockerContainer, DockerRuntime
from testhide.common.fetch import JOB_NETWORK_PREFIX, job_network
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, running_agent
from tests.integration.test_fetch_and_services import (
    allow_egress,
    fetch_agent,
    job_id_of,
    package_server,
    shown,
)

pytestmark = pytest.mark.docker

__all__ = ["fetch_agent", "package_server"]  # fixtures of test_fetch_and_services.py, used here by name

FETCH_MOUNTS = ["/cache (rw)", "/tmp (tmpfs)", "/workspace (ro)"]


class FetchElsewhereRuntime(DockerRuntime):
    """Docker as the agent drives it, but a fetch step's container joins ``network``
    instead of the job's own: an agent or engine that did not apply what it should."""

    def __init__(self, client: DockerClient, network: str) -> None:
        super().__init__(client)
        self._network = network

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> DockerContainer:
        if spec.network.startswith(JOB_NETWORK_PREFIX):
            spec = replace(spec, network=self._network)
        return await super().start(spec, output)


@pytest.fixture
def other_network(docker_client: DockerClient) -> Iterator[str]:
    """An internal network (no route out) with nothing else on it, removed afterwards."""
    network = docker_client.networks.create(
        f"testhide-test-other-{time.monotonic_ns()}",
        driver="bridge",
        internal=True,
        labels={"dev.testhide.test": "1"},
    )
    try:
        yield str(network.name)
    finally:
        network.remove()


@pytest.fixture
async def misattaching_agent(
    cp: RunningControlPlane,
    tmp_path: Path,
    docker_client: DockerClient,
    package_server: str,
    other_network: str,
) -> AsyncIterator[Agent]:
    runtime = FetchElsewhereRuntime(docker_client, other_network)
    async with running_agent(
        cp, tmp_path, runtime, stop_grace=timedelta(seconds=1), egress_network=package_server
    ) as agent:
        yield agent


async def test_a_fetch_steps_container_is_shown_as_docker_applied_it(
    fetch_agent: Agent, cli: Cli, cp: RunningControlPlane
) -> None:
    await allow_egress(cp, "pkgs:8080")
    with capture_logs() as events:
        ran = await cli(
            "run", "--image", JOB_IMAGE, "--pids", "100",
            "--fetch", "wget -q -O /cache/pkg.txt http://pkgs:8080/pkg.txt; sleep 1",
            "--", "cat", "/cache/pkg.txt",
        )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    job_id = job_id_of(ran.stderr)
    job = await shown(cli, job_id)
    assert job["status"] == "SUCCEEDED"
    assert (job["fetch"]["running"], job["fetch"]["exit_code"]) == (False, 0)  # its end reported
    facts = job["fetch"]["isolation"]
    assert (facts["network_mode"], facts["interfaces"]) == (job_network(job_id), ["eth0", "lo"])
    assert (facts["cap_drop"], facts["cap_add"], facts["no_new_privileges"]) == (["ALL"], [], True)
    assert (facts["seccomp"], facts["read_only_root"], facts["pids_limit"]) == ("testhide", True, 100)
    assert facts["mounts"] == FETCH_MOUNTS
    assert facts["user"] == job["isolation"]["user"]
    assert job["isolation"]["network_mode"] == "none"  # the job step: offline as ever
    assert [e for e in events if e["event"] == "job_isolation_mismatch"] == []

    human = await cli("jobs", "show", job_id)
    text = human.stdout.decode().splitlines()
    at = text.index("fetch step isolation:")
    assert text[at + 1] == f"  runtime runc, network {job_network(job_id)} (interfaces: eth0, lo)"


async def test_a_services_container_is_shown_as_docker_applied_it(docker_agent: Agent, cli: Cli) -> None:
    ran = await cli(
        "run", "--image", JOB_IMAGE, "--pids", "100",
        "--service", f"idle={JOB_IMAGE}", "--service-command", "idle=sleep 3600",
        "--service-tmpfs", "idle:/data",
        "--", "sh", "-c", "sleep 1; echo ok",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    job_id = job_id_of(ran.stderr)
    job = await shown(cli, job_id)
    assert (job["status"], job["status_reason"]) == ("SUCCEEDED", "")
    [service] = job["service_isolation"]
    facts = service["isolation"]
    assert service["name"] == "idle"
    # The namespace the job's container joined: one, with only lo.
    assert facts["network_mode"] == job["isolation"]["network_mode"]
    assert str(facts["network_mode"]).startswith("container:")
    assert facts["interfaces"] == ["lo"]
    assert (facts["cap_drop"], facts["cap_add"], facts["read_only_root"]) == (["ALL"], [], True)
    assert (facts["pids_limit"], facts["mounts"]) == (100, ["/data (tmpfs)", "/tmp (tmpfs)"])

    human = await cli("jobs", "show", job_id)
    text = human.stdout.decode().splitlines()
    at = text.index("service idle isolation:")
    assert text[at + 1] == f"  runtime runc, network {facts['network_mode']} (interfaces: lo)"


async def test_a_fetch_steps_container_on_another_network_ends_the_job_as_error(
    misattaching_agent: Agent, cli: Cli, cp: RunningControlPlane, other_network: str
) -> None:
    await allow_egress(cp, "pkgs:8080")
    began = time.monotonic()
    with capture_logs() as events:
        ran = await cli("run", "--image", JOB_IMAGE, "--fetch", "sleep 60", "--", "echo", "job step ran")
    assert ran.returncode != 0
    assert time.monotonic() - began < 50  # the fetch step stopped as it ran, not run to its end
    assert b"job step ran" not in ran.stdout
    job_id = job_id_of(ran.stderr)
    job = await shown(cli, job_id)
    assert job["status"] == "ERROR"
    network = job_network(job_id)
    expected = f"fetch step: network_mode: expected the job's internal network {network}, got {other_network}"
    assert job["status_reason"] == (
        f"the job's containers are not isolated as the job and its pool require: {expected}"
    )
    assert job["fetch"]["running"] is True  # the facts came as it started; its end never did
    facts = job["fetch"]["isolation"]
    assert (facts["network_mode"], facts["interfaces"]) == (other_network, ["eth0", "lo"])
    [logged] = [e for e in events if e["event"] == "job_isolation_mismatch"]
    assert (logged["job_id"], logged["fields"]) == (job_id, ["fetch step: network_mode"])

    human = await cli("jobs", "show", job_id)
    assert expected in human.stdout.decode()
    assert "  stopped with the job before its end (cache none: no cache)" in human.stdout.decode()
