"""Issue 16 end to end, as an engineer runs it: `testhide run --fetch` fetches
through the agent's egress proxy (a real squid) from a package server on a
network this test creates, the job step then runs with only `lo` and the
fetched files read-only in /cache, a second job with the same `--cache` key
skips the fetch step, a failing fetch step fails the job before its job step,
and `--service` runs a server the job reaches at 127.0.0.1 and nobody else
does; `testhide logs --service` shows its output. Under gVisor the fetch step
needs runsc registered with --network=host, and runs in the sandbox with it."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from tests.docker_runtimes import SHARED_LOOPBACK_ARGS, registered_runtime
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, operator, running_agent

PACKAGE = "wheel-contents-0123456789"


@pytest.fixture
def package_server(docker_client: DockerClient) -> Iterator[str]:
    """An internal network of this test's (nothing on it leaves the machine) with a
    package server on it, reachable by the name `pkgs`: the network's name."""
    suffix = secrets.token_hex(4)
    network = docker_client.networks.create(
        f"testhide-test-egress-{suffix}", driver="bridge", internal=True, labels={"dev.testhide.test": "1"}
    )
    script = f"mkdir -p /tmp/w && echo {PACKAGE} > /tmp/w/pkg.txt && exec httpd -f -p 8080 -h /tmp/w"
    server = docker_client.containers.run(
        JOB_IMAGE,
        ["sh", "-c", script],
        name=f"testhide-test-pkgs-{suffix}",
        detach=True,
        user="1000:1000",
        network=network.name,
        read_only=True,
        tmpfs={"/tmp": "size=1m"},
        cap_drop=["ALL"],
        labels={"dev.testhide.test": "1"},
    )
    network.disconnect(server)
    network.connect(server, aliases=["pkgs"])
    try:
        yield str(network.name)
    finally:
        with suppress(docker.errors.NotFound):
            server.remove(force=True)
        with suppress(docker.errors.NotFound):
            network.remove()


@pytest.fixture
async def fetch_agent(
    cp: RunningControlPlane, tmp_path: Path, docker_client: DockerClient, package_server: str
) -> AsyncIterator[Agent]:
    from datetime import timedelta

    async with running_agent(
        cp,
        tmp_path,
        DockerRuntime(docker_client),
        stop_grace=timedelta(seconds=1),
        egress_network=package_server,
    ) as agent:
        yield agent
    with suppress(Exception):  # the caches this agent kept
        for volume in docker_client.volumes.list(filters={"label": f"dev.testhide.agent={agent.agent_id}"}):
            volume.remove(force=True)


async def allow_egress(cp: RunningControlPlane, *entries: str) -> None:
    allow = [arg for entry in entries for arg in ("--egress-allow", entry)]
    code, _, err = await operator("pools", "set", "default", *allow, "--data-dir", str(cp.data_dir))
    assert code == 0, err


async def shown(cli: Cli, job_id: str) -> dict[str, Any]:
    result = await cli("jobs", "show", job_id, "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def job_id_of(stderr: bytes) -> str:
    return stderr.decode().split("job ", 1)[1].split()[0]


async def test_fetch_through_the_proxy_then_offline_with_the_cache_then_a_cache_hit(
    fetch_agent: Agent, cli: Cli, cp: RunningControlPlane
) -> None:
    await allow_egress(cp, "pkgs:8080")
    fetch = (
        "wget -q -O /cache/pkg.txt http://pkgs:8080/pkg.txt"
        " && { wget -q -O- http://pkgs:8081/ || echo refused-port; }"
        " && { touch /workspace/x 2>/dev/null || echo workspace-read-only; }"
    )
    job_step = (
        "cat /cache/pkg.txt; ls /sys/class/net; { touch /cache/y 2>/dev/null || echo cache-read-only; }; "
        "wget -q -T 2 -O- http://pkgs:8080/pkg.txt || echo offline"
    )
    first = await cli(
        "run", "--image", JOB_IMAGE, "--fetch", fetch, "--cache", "k1", "--", "sh", "-c", job_step
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().splitlines() == [
        "refused-port",
        "workspace-read-only",
        PACKAGE,
        "lo",
        "cache-read-only",
        "offline",
    ]
    assert b"testhide: fetch step: sh -c" in first.stderr
    assert b"testhide: fetch step ended with exit code 0" in first.stderr

    job = await shown(cli, job_id_of(first.stderr))
    assert job["fetch"]["cache"] == "miss"
    requests = [(r["method"], r["host"], r["port"], r["allowed"]) for r in job["fetch"]["requests"]]
    assert ("GET", "pkgs", 8080, True) in requests
    assert ("GET", "pkgs", 8081, False) in requests
    allowed = next(r for r in job["fetch"]["requests"] if r["allowed"])
    assert allowed["http_status"] == 200
    assert allowed["received_bytes"] > len(PACKAGE)

    second = await cli(
        "run", "--image", JOB_IMAGE, "--fetch", "exit 9", "--cache", "k1", "--", "cat", "/cache/pkg.txt"
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.decode().strip() == PACKAGE
    assert b"cache k1 restored on this agent: fetch step skipped" in second.stderr
    assert (await shown(cli, job_id_of(second.stderr)))["fetch"]["cache"] == "hit"


async def test_a_failing_fetch_step_fails_the_job_before_its_job_step(
    fetch_agent: Agent, cli: Cli, cp: RunningControlPlane
) -> None:
    await allow_egress(cp, "pkgs:8080")
    result = await cli(
        "run", "--image", JOB_IMAGE, "--fetch", "echo fetching; exit 4", "--", "echo", "job-step"
    )
    assert result.returncode == 4, result.stderr
    assert b"job-step" not in result.stdout
    assert b"fetching" in result.stdout
    job = await shown(cli, job_id_of(result.stderr))
    assert job["status"] == "FAILED"
    assert job["fetch"]["exit_code"] == 4
    assert "the fetch step failed with exit code 4" in json.dumps(job)


async def test_a_service_beside_the_job_reached_at_loopback_and_its_output_kept(
    docker_agent: Agent, cli: Cli
) -> None:
    serve = "echo web-started; mkdir -p /tmp/w && echo svc-ok > /tmp/w/index.html"
    serve += " && exec httpd -f -p 8080 -h /tmp/w"
    wait_then_get = (
        "i=0; until wget -q -O- http://127.0.0.1:8080/; do"
        " i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done; ls /sys/class/net"
    )
    result = await cli(
        "run",
        "--image",
        JOB_IMAGE,
        "--service",
        f"web={JOB_IMAGE}",
        "--service-command",
        f"web=sh -c '{serve}'",
        "--service-tmpfs",
        "web:/tmp",
        "--",
        "sh",
        "-c",
        wait_then_get,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["svc-ok", "lo"]
    logs = await cli("logs", job_id_of(result.stderr), "--service", "web")
    assert logs.returncode == 0, logs.stderr
    assert b"web-started" in logs.stdout


async def test_a_service_that_exits_early_fails_the_job_with_its_name_and_code(
    docker_agent: Agent, cli: Cli
) -> None:
    result = await cli(
        "run",
        "--image",
        JOB_IMAGE,
        "--service",
        f"db={JOB_IMAGE}",
        "--service-command",
        "db=sh -c 'echo db-dying; exit 3'",
        "--",
        "sleep",
        "60",
    )
    assert result.returncode != 0
    assert b"service db exited early with exit code 3" in result.stderr


async def test_under_gvisor_a_fetch_step_without_a_networked_registration_is_refused(
    fetch_agent: Agent, cli: Cli, cp: RunningControlPlane
) -> None:
    await allow_egress(cp, "pkgs:8080")
    result = await cli("run", "--image", JOB_IMAGE, "--runtime", "runsc", "--fetch", "true", "--", "true")
    assert result.returncode == 125, result.stderr
    assert b"the fetch step needs a network, which gVisor registered with --network=none never gives" in (
        result.stderr
    )


@pytest.fixture
def networked_runsc(docker_client: DockerClient) -> Iterator[str]:
    """Registered before the agent starts: the agent offers what it found then."""
    with registered_runtime(docker_client, "runsc-sharedlo-fetch", SHARED_LOOPBACK_ARGS) as name:
        yield name


# Python's urllib, which reads HTTP_PROXY as pip does (busybox wget and nc trip over gVisor's
# host network here: see the README).
PY_FETCH = (
    "python3 -c \"import urllib.request; data = urllib.request.urlopen('http://pkgs:8080/pkg.txt').read();"
    " open('/cache/pkg.txt', 'wb').write(data)\""
)


async def test_under_gvisor_with_a_networked_registration_the_fetch_step_runs_in_the_sandbox(
    networked_runsc: str, fetch_agent: Agent, cli: Cli, cp: RunningControlPlane, python_image: str
) -> None:
    await allow_egress(cp, "pkgs:8080")
    result = await cli(
        "run",
        "--image",
        python_image,
        "--runtime",
        "runsc",
        "--fetch",
        PY_FETCH,
        "--",
        "cat",
        "/cache/pkg.txt",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == PACKAGE
    job = await shown(cli, job_id_of(result.stderr))
    assert [(r["method"], r["host"], r["allowed"]) for r in job["fetch"]["requests"]] == [
        ("GET", "pkgs", True)
    ]
    assert job["isolation"]["runtime"] == "runsc"  # the job step: gVisor as registered for jobs, no network
