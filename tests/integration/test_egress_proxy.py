"""The fetch step's egress proxy on real Docker: a squid built from the host's
package, on a job network that reaches nothing else. The "outside" here is
the test's own internal network holding an upstream container (busybox httpd
on 8080, an echo on 8443): no traffic leaves the host."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import docker.errors
import pytest
from docker import DockerClient
from docker.models.containers import Container

from testhide.agent.egress import EgressProxies, EgressSession, remove_leftover_networks
from testhide.agent.errors import JobSetupError
from tests.harness import JOB_IMAGE

pytestmark = pytest.mark.docker

TEST_LABEL = "dev.testhide.test"
BODY = "hello-from-upstream"


@dataclass(frozen=True)
class Upstream:
    network: str
    address: str
    """The upstream's IP on the test's network."""


@pytest.fixture
def owner(docker_client: DockerClient) -> Iterator[str]:
    """A fresh agent identity; whatever a test leaves of it is removed."""
    name = f"test-egress-{secrets.token_hex(4)}"
    yield name
    asyncio.run(remove_leftover_networks(docker_client, name))


@pytest.fixture(scope="module")
def upstream(docker_client: DockerClient) -> Iterator[Upstream]:
    tag = secrets.token_hex(4)
    labels = {TEST_LABEL: f"egress-{tag}"}
    name = f"testhide-test-egress-{tag}"
    network = docker_client.networks.create(name, internal=True, labels=labels)
    container = None
    try:
        container = docker_client.containers.create(
            JOB_IMAGE,
            [
                "sh",
                "-c",
                f"mkdir -p /tmp/www && echo {BODY} > /tmp/www/file.txt"
                " && { httpd -f -p 8080 -h /tmp/www & exec nc -ll -p 8443 -e cat; }",
            ],
            name=f"testhide-test-upstream-{tag}",
            user="1000:1000",
            cap_drop=["ALL"],
            labels=labels,
            network=name,
        )
        network.disconnect(container)
        network.connect(container, aliases=["upstream"])
        container.start()
        _wait_listening(container, (8080, 8443))
        container.reload()
        yield Upstream(name, container.attrs["NetworkSettings"]["Networks"][name]["IPAddress"])
    finally:
        if container is not None:
            container.remove(force=True)
        network.remove()


def _wait_listening(container: Container, ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        output = container.exec_run(["netstat", "-ltn"]).output
        listening = output.decode() if isinstance(output, bytes) else ""
        if all(f":{port} " in listening for port in ports):
            return
        time.sleep(0.05)
    pytest.fail(f"the upstream did not listen on {ports}")


def run_fetch_step(client: DockerClient, session: EgressSession, script: str) -> str:
    """``script`` in a container hardened like a fetch step, on the job network only."""
    container = client.containers.create(
        JOB_IMAGE,
        ["sh", "-c", script],
        network_mode=session.network,
        environment=session.proxy_env(),
        user="1000:1000",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        read_only=True,
        pids_limit=64,
        mem_limit=64 * 1024 * 1024,
        labels={TEST_LABEL: "egress-fetch"},
    )
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0
        return str(container.logs().decode())
    finally:
        container.remove(force=True)


def _gone(client: DockerClient, job_id: str) -> bool:
    lookups: list[tuple[Callable[[str], object], str]] = [
        (client.networks.get, f"testhide-egress-{job_id}"),
        (client.containers.get, f"testhide-egress-proxy-{job_id}"),
        (client.volumes.get, f"testhide-egress-conf-{job_id}"),
    ]
    for get, name in lookups:
        with contextlib.suppress(docker.errors.NotFound):
            get(name)
            return False
    return True


async def test_the_fetch_step_reaches_only_what_the_allow_list_names(
    docker_client: DockerClient, upstream: Upstream, owner: str
) -> None:
    proxies = EgressProxies(docker_client, upstream.network, owner)
    job_id = f"j{secrets.token_hex(6)}"
    session = await proxies.open(job_id, ["upstream:8080", "upstream:8443"])
    try:
        assert session.network == f"testhide-egress-{job_id}"
        assert session.proxy_url.startswith("http://")
        assert session.proxy_url.endswith(":3128")
        proxy_address = session.proxy_url.removeprefix("http://").removesuffix(":3128")
        output = run_fetch_step(
            docker_client,
            session,
            f"""
            echo "allowed: $(wget -q -O - http://upstream:8080/file.txt 2>&1)"
            echo "other port: $(wget -q -O - http://upstream:8081/file.txt 2>&1)"
            echo "other host: $(wget -q -O - http://elsewhere:8080/file.txt 2>&1)"
            {{ printf 'CONNECT upstream:8443 HTTP/1.1\\r\\nHost: upstream:8443\\r\\n\\r\\n'; sleep 0.3
               echo through-the-tunnel; sleep 0.5; }} | nc {proxy_address} 3128 | sed 's/^/tunnel: /'
            nc -w 2 {upstream.address} 8080 </dev/null; echo "direct: $?"
            echo "links: $(ls /sys/class/net | tr '\\n' ' ')"
            """,
        )
        lines = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
        assert lines["allowed"] == BODY
        assert "403 Forbidden" in lines["other port"]
        assert "403 Forbidden" in lines["other host"]
        assert "HTTP/1.1 200 Connection established" in output
        assert "tunnel: through-the-tunnel" in output
        assert lines["direct"] != "0"  # no route: the upstream is on another network
        assert lines["links"].split() == ["eth0", "lo"]

        records = await session.finish()
        seen = [(r.method, r.host, r.port, r.allowed, r.http_status) for r in records]
        assert seen == [
            ("GET", "upstream", 8080, True, 200),
            ("GET", "upstream", 8081, False, 403),
            ("GET", "elsewhere", 8080, False, 403),
            ("CONNECT", "upstream", 8443, True, 200),
        ]
        assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in records)
        assert [r.at for r in records] == sorted(r.at for r in records)
        assert await session.finish() == records

        # The host has no address on the job network's bridge: nothing there reaches it.
        network = docker_client.networks.get(session.network)
        assert network.attrs["Internal"] is True
        bridge = await asyncio.to_thread(
            subprocess.run,
            ["ip", "-4", "addr", "show", "dev", f"br-{str(network.id)[:12]}"],
            capture_output=True,
            text=True,
        )
        assert bridge.returncode == 0, bridge.stderr
        assert "inet " not in bridge.stdout
    finally:
        await session.close()
    assert _gone(docker_client, job_id)
    await session.close()  # again: nothing to do, no error


async def test_the_proxy_runs_locked_down(
    docker_client: DockerClient, upstream: Upstream, owner: str
) -> None:
    session = await EgressProxies(docker_client, upstream.network, owner).open(f"j{secrets.token_hex(6)}", [])
    try:
        proxy = docker_client.api.inspect_container(f"testhide-egress-proxy-{session.job_id}")
        host = proxy["HostConfig"]
        assert host["CapDrop"] == ["ALL"]
        assert host["ReadonlyRootfs"] is True
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["PidsLimit"] == 64
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["LogConfig"]["Type"] == "json-file"
        assert host["Binds"] in (None, [])
        assert proxy["Config"]["User"] == "13:13"
        assert set(proxy["NetworkSettings"]["Networks"]) == {upstream.network, session.network}
        assert proxy["Config"]["Labels"]["dev.testhide.job"] == session.job_id
        assert proxy["Config"]["Labels"]["dev.testhide.agent"] == owner
        image = docker_client.images.get(proxy["Config"]["Image"])
        assert image.tags[0].startswith("testhide/egress-proxy:")
        assert image.labels["dev.testhide.egress-proxy"]
        # An empty allow list: everything refused.
        output = run_fetch_step(
            docker_client, session, 'echo "got: $(wget -q -O - http://upstream:8080/file.txt 2>&1)"'
        )
        assert "403 Forbidden" in output
        assert [(r.host, r.allowed) for r in await session.finish()] == [("upstream", False)]
    finally:
        await session.close()


async def test_leftovers_of_a_killed_agent_are_removed(
    docker_client: DockerClient, upstream: Upstream, owner: str
) -> None:
    proxies = EgressProxies(docker_client, upstream.network, owner)
    dead, running = f"j{secrets.token_hex(6)}", f"j{secrets.token_hex(6)}"
    await proxies.open(dead, ["upstream:8080"])
    kept = await proxies.open(running, ["upstream:8080"])
    other = EgressProxies(docker_client, upstream.network, f"{owner}-other")
    stranger = await other.open(f"j{secrets.token_hex(6)}", [])
    try:
        assert await remove_leftover_networks(docker_client, owner, keep=frozenset({running})) == 1
        assert _gone(docker_client, dead)
        assert not _gone(docker_client, running)
        assert not _gone(docker_client, stranger.job_id)  # another agent's
        assert await remove_leftover_networks(docker_client, owner, keep=frozenset({running})) == 0
        assert await remove_leftover_networks(docker_client, owner) == 1
        assert _gone(docker_client, running)
    finally:
        await kept.close()
        await stranger.close()


async def test_a_missing_egress_network_fails_the_job_and_leaves_nothing(
    docker_client: DockerClient, owner: str
) -> None:
    job_id = f"j{secrets.token_hex(6)}"
    proxies = EgressProxies(docker_client, f"testhide-test-no-such-network-{job_id}", owner)
    with pytest.raises(JobSetupError, match=r"egress network .* does not exist"):
        await proxies.open(job_id, ["upstream:8080"])
    assert _gone(docker_client, job_id)


async def test_a_bad_allow_entry_fails_the_job_and_leaves_nothing(
    docker_client: DockerClient, upstream: Upstream, owner: str
) -> None:
    job_id = f"j{secrets.token_hex(6)}"
    with pytest.raises(JobSetupError, match=re.escape("'https://pypi.org'")):
        await EgressProxies(docker_client, upstream.network, owner).open(job_id, ["https://pypi.org"])
    assert _gone(docker_client, job_id)
