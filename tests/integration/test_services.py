"""Services beside a job, on the real engine: the job reaches its own services
at 127.0.0.1 and sees only ``lo``, another job's services stay out of reach,
each service is hardened like a job, its output is kept, an early exit is
reported by name, and nothing is left behind."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
from docker import DockerClient

from testhide.agent.errors import JobSetupError
from testhide.agent.model import ServiceSpec
from testhide.agent.runtime import services
from testhide.agent.runtime.docker import LABEL, OWNER_LABEL
from testhide.agent.runtime.hardening import container_options
from testhide.agent.runtime.services import ServiceGroup
from tests.docker_runtimes import SHARED_LOOPBACK_ARGS, registered_runtime
from tests.harness import JOB_IMAGE

pytestmark = pytest.mark.docker

USER = "65534:65534"
MEMORY = 64 * 1024 * 1024
WEB_SCRIPT = "echo hello from web > /www/index.html && exec httpd -f -v -p 8080 -h /www"


@pytest.fixture
def owner(docker_client: DockerClient) -> Iterator[str]:
    """This test's agent name on every container it makes; whatever is left
    at the end is removed (and the test that checks for leftovers fails)."""
    name = f"test-services-{uuid.uuid4().hex[:12]}"
    yield name
    for container in docker_client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={name}"}):
        container.remove(force=True)


@pytest.fixture(scope="module")
def exposing(docker_client: DockerClient) -> Iterator[Callable[[int], str]]:
    """Busybox images that declare one TCP port each (``EXPOSE``), made
    locally from the test image: no network involved."""
    tag = uuid.uuid4().hex[:12]
    made: dict[int, str] = {}

    def image(port: int) -> str:
        if port not in made:
            name = f"testhide/test-exposing-{port}:{tag}"
            dockerfile = f"FROM {JOB_IMAGE}\nEXPOSE {port}\n".encode()
            docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag=name, rm=True, network_mode="none")
            made[port] = name
        return made[port]

    yield image
    for name in made.values():
        docker_client.images.remove(name, force=True)


@pytest.fixture
async def start(docker_client: DockerClient, owner: str) -> AsyncIterator[Callable[..., Any]]:
    """ServiceGroup.start with the job's limits; every group is removed afterwards."""
    groups: list[ServiceGroup] = []

    async def start_group(specs: Sequence[ServiceSpec], runtime: str = "runc") -> ServiceGroup:
        group = await ServiceGroup.start(
            docker_client,
            uuid.uuid4().hex[:16],
            owner,
            specs,
            runtime=runtime,
            is_gvisor=runtime != "runc",
            user=USER,
            pids=64,
            memory_bytes=MEMORY,
            cpus=0.5,
        )
        groups.append(group)
        return group

    yield start_group
    for group in groups:
        await group.remove()


def web(exposing: Callable[[int], str], name: str = "web") -> ServiceSpec:
    return ServiceSpec(name, exposing(8080), ("sh", "-c", WEB_SCRIPT), tmpfs=("/www",))


def echo(exposing: Callable[[int], str], name: str = "echo") -> ServiceSpec:
    # busybox nc: -ll keeps listening, running `echo hi` for each connection.
    return ServiceSpec(name, exposing(9000), ("nc", "-ll", "-p", "9000", "-e", "echo", "hi"))


async def run_job(
    client: DockerClient, owner: str, network_mode: str, script: str, runtime: str = "runc"
) -> tuple[int, str]:
    """A job-like container, hardened as a job, in ``network_mode``."""
    options = container_options(runtime, runtime != "runc", 64, MEMORY, 0.5, USER, network_mode=network_mode)

    def run() -> tuple[int, str]:
        container = client.containers.create(
            JOB_IMAGE, ["sh", "-c", script], labels={LABEL: "job", OWNER_LABEL: owner}, **options
        )
        try:
            container.start()
            code = int(container.wait(timeout=60)["StatusCode"])
            return code, container.logs().decode()
        finally:
            container.remove(force=True)

    return await asyncio.to_thread(run)


async def output_with(group: ServiceGroup, name: str, expected: bytes) -> bytes:
    """The service's output once it holds ``expected`` (polled, 10 s at most)."""
    for _ in range(200):
        if expected in group.output(name):
            break
        await asyncio.sleep(0.05)
    return group.output(name)


def ours(client: DockerClient, owner: str) -> list[str]:
    return [
        c.name or "" for c in client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={owner}"})
    ]


async def test_job_reaches_its_services_at_loopback_and_has_only_lo(
    start: Callable[..., Any], exposing: Callable[[int], str], docker_client: DockerClient, owner: str
) -> None:
    group: ServiceGroup = await start([web(exposing), echo(exposing)])
    assert group.names == ("web", "echo")
    assert group.network_mode.startswith("container:")
    # No retry in the script: start returned only once both ports listened.
    code, out = await run_job(
        docker_client,
        owner,
        group.network_mode,
        "wget -qO- http://127.0.0.1:8080/index.html && nc 127.0.0.1 9000 </dev/null"
        " && echo links: $(ls /sys/class/net) && echo dev: $(tail -n +3 /proc/net/dev | cut -d: -f1)",
    )
    assert code == 0, out
    assert out.splitlines() == ["hello from web", "hi", "links: lo", "dev: lo"]
    assert b"response:200" in await output_with(group, "web", b"response:200")


async def test_a_job_cannot_reach_another_jobs_services(
    start: Callable[..., Any], exposing: Callable[[int], str], docker_client: DockerClient, owner: str
) -> None:
    first: ServiceGroup = await start([echo(exposing)])
    second: ServiceGroup = await start([web(exposing)])
    probe = (
        "nc 127.0.0.1 9000 </dev/null && echo 9000: open || echo 9000: closed; "
        "wget -q -O- http://127.0.0.1:8080/index.html && echo 8080: open || echo 8080: closed"
    )
    _, seen_from_first = await run_job(docker_client, owner, first.network_mode, probe)
    _, seen_from_second = await run_job(docker_client, owner, second.network_mode, probe)
    assert _ports(seen_from_first) == ("9000: open", "8080: closed"), seen_from_first
    assert _ports(seen_from_second) == ("9000: closed", "8080: open"), seen_from_second
    # Nor from a container in a namespace of its own.
    _, seen_from_outside = await run_job(docker_client, owner, "none", probe)
    assert _ports(seen_from_outside) == ("9000: closed", "8080: closed"), seen_from_outside


def _ports(seen: str) -> tuple[str, ...]:
    return tuple(line for line in seen.splitlines() if line.startswith(("9000:", "8080:")))


async def test_a_service_is_hardened_like_a_job(
    start: Callable[..., Any], docker_client: DockerClient, owner: str
) -> None:
    script = (
        "touch /rootfs 2>/dev/null && echo root: writable || echo root: read-only; "
        "touch /data/ok && echo data: writable; touch /tmp/ok && echo tmp: writable; "
        "echo uid: $(id -u); grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "echo links: $(ls /sys/class/net); echo ready; exec sleep 600"
    )
    group: ServiceGroup = await start(
        [ServiceSpec("probe", JOB_IMAGE, ("sh", "-c", script), tmpfs=("/data",))]
    )
    seen = (await output_with(group, "probe", b"ready")).decode()
    for fact in (
        "root: read-only",
        "data: writable",
        "tmp: writable",
        "uid: 65534",
        "CapEff:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "links: lo",
    ):
        assert fact in seen, seen
    holder_id = group.network_mode.removeprefix("container:")
    service = docker_client.api.inspect_container(f"testhide-svc-{_job_of(docker_client, owner)}-probe")
    host = service["HostConfig"]
    assert host["NetworkMode"] == f"container:{holder_id}"
    assert host["CapDrop"] == ["ALL"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert any(opt.startswith("seccomp=") for opt in host["SecurityOpt"])
    assert (host["PidsLimit"], host["Memory"], host["NanoCpus"]) == (64, MEMORY, 500_000_000)
    assert host["LogConfig"]["Type"] == "none"
    assert host["Runtime"] == "runc"
    assert service["Config"]["User"] == USER
    holder = docker_client.api.inspect_container(holder_id)
    assert holder["HostConfig"]["NetworkMode"] == "none"
    assert holder["HostConfig"]["ReadonlyRootfs"] is True
    assert holder["HostConfig"]["CapDrop"] == ["ALL"]
    assert holder["Config"]["User"] == USER
    assert holder["Config"]["Labels"][OWNER_LABEL] == owner


def _job_of(client: DockerClient, owner: str) -> str:
    (holder,) = [name for name in ours(client, owner) if name.startswith("testhide-holder-")]
    return holder.removeprefix("testhide-holder-")


async def test_exited_names_the_first_service_to_exit_and_keeps_its_output(
    start: Callable[..., Any],
) -> None:
    group: ServiceGroup = await start(
        [
            ServiceSpec("steady", JOB_IMAGE, ("sleep", "600")),
            ServiceSpec("quits", JOB_IMAGE, ("sh", "-c", "echo out; echo err >&2; sleep 0.3; exit 3")),
        ]
    )
    assert await asyncio.wait_for(group.exited(), 30) == ("quits", 3)
    assert await group.exited() == ("quits", 3)
    assert group.output("quits") in (b"out\nerr\n", b"err\nout\n")
    assert group.output("steady") == b""


async def test_remove_leaves_nothing_and_can_run_twice(
    start: Callable[..., Any], exposing: Callable[[int], str], docker_client: DockerClient, owner: str
) -> None:
    group: ServiceGroup = await start([web(exposing), echo(exposing)])
    assert len(ours(docker_client, owner)) == 3
    await group.remove()
    assert ours(docker_client, owner) == []
    await group.remove()


async def test_a_missing_image_names_the_service_and_nothing_is_left(
    start: Callable[..., Any], docker_client: DockerClient, owner: str
) -> None:
    with pytest.raises(JobSetupError) as refused:
        await start(
            [ServiceSpec("steady", JOB_IMAGE, ("sleep", "600")), ServiceSpec("db", "testhide/absent:0")]
        )
    assert str(refused.value) == "service 'db': image 'testhide/absent:0' is not present on this agent's host"
    assert ours(docker_client, owner) == []


async def test_a_command_docker_cannot_run_names_the_service(
    start: Callable[..., Any], docker_client: DockerClient, owner: str
) -> None:
    with pytest.raises(JobSetupError) as refused:
        await start([ServiceSpec("cache", JOB_IMAGE, ("/no/such-server",))])
    assert str(refused.value) == f"service 'cache': command '/no/such-server' not found in image {JOB_IMAGE}"
    assert ours(docker_client, owner) == []


async def test_a_service_exiting_before_it_listens_fails_start_with_its_words(
    start: Callable[..., Any], exposing: Callable[[int], str], docker_client: DockerClient, owner: str
) -> None:
    broken = ServiceSpec("db", exposing(8080), ("sh", "-c", "echo 'fatal: no config' >&2; exit 4"))
    with pytest.raises(JobSetupError) as refused:
        await start([broken])
    assert (
        str(refused.value)
        == "service 'db' exited with code 4 before it was ready; its last output: fatal: no config"
    )
    assert ours(docker_client, owner) == []


async def test_a_port_that_never_listens_fails_start(
    start: Callable[..., Any],
    exposing: Callable[[int], str],
    docker_client: DockerClient,
    owner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(services, "READY_TIMEOUT_S", 1.0)
    with pytest.raises(JobSetupError) as refused:
        await start([ServiceSpec("mute", exposing(8080), ("sleep", "600"))])
    assert str(refused.value) == "service 'mute' did not listen on port 8080 within 1 s"
    assert ours(docker_client, owner) == []


@pytest.fixture
def shared_loopback_runsc(docker_client: DockerClient) -> Iterator[str]:
    """runsc registered a second time with ``--network=host``, as an operator
    registers runsc-sharedlo, under a name of this test run's own."""
    with registered_runtime(docker_client, "runsc-sharedlo-test", SHARED_LOOPBACK_ARGS) as name:
        yield name


async def test_under_gvisor_services_and_job_share_only_lo(
    shared_loopback_runsc: str,
    start: Callable[..., Any],
    exposing: Callable[[int], str],
    docker_client: DockerClient,
    owner: str,
) -> None:
    group: ServiceGroup = await start([web(exposing), echo(exposing)], runtime="runsc")
    assert group.job_runtime == shared_loopback_runsc
    # Not wget: busybox wget under runsc --network=host fails "error getting
    # response: Resource temporarily unavailable" (nc and Python's sockets do not).
    script = (
        "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 | tail -n 1"
        " && nc 127.0.0.1 9000 </dev/null"
        " && echo links: $(ls /sys/class/net) && grep '^Seccomp:' /proc/self/status"
    )
    code, out = await run_job(docker_client, owner, group.network_mode, script, runtime=group.job_runtime)
    assert code == 0, out
    assert out.split() == ["hello", "from", "web", "hi", "links:", "lo", "Seccomp:", "2"]
    service = docker_client.api.inspect_container(f"testhide-svc-{_job_of(docker_client, owner)}-web")
    assert service["HostConfig"]["Runtime"] == shared_loopback_runsc
    holder = docker_client.api.inspect_container(group.network_mode.removeprefix("container:"))
    assert holder["HostConfig"]["Runtime"] == "runc"
    # The usual registration has a network stack of its own: the services are not on its lo.
    _, alone = await run_job(docker_client, owner, group.network_mode, script, runtime="runsc")
    assert "hello from web" not in alone
