"""The agent image, built as operators build it (``python -m images.agent``): from the local base
testhide/agent-base:1 (debootstrap and ``docker import``; built once per machine and kept, like
testhide/python:1) and the lock's wheels, with no registry and no network in the build. Then an agent
enrolled inside the image runs in a container and runs a job.

The agent container gets what the README tells operators to give it, and nothing more: uid 10001, no
capabilities, no new privileges, a read-only root filesystem with a tmpfs /tmp, its data dir as a named
volume, and the Docker socket through the socket's group. It shares the host's network only to reach the
control plane on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker import DockerClient
from docker.models.containers import Container

from images.agent import AGENT_UID, DATA_DIR, Target, build_agent, check_wheelhouse, copy_locked, lock_entries
from images.build import build_agent_base
from testhide import __version__
from testhide.agent.runtime.docker import OWNER_LABEL
from tests.harness import JOB_IMAGE, REPO, Cli, RunningControlPlane, unavailable

# The Docker tests are slow: the base takes ~45 s to build the first time on a machine, the agent image
# 15-30 s every run.

SOCKET = "/var/run/docker.sock"
HARDENED: dict[str, Any] = {
    "network_mode": "host",
    "read_only": True,
    "tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m"},
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
}
DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))"
)


@pytest.fixture
def socket_group() -> int:
    """The group that may use the Docker socket: the one privilege the agent container gets."""
    if not os.path.exists(SOCKET):
        unavailable(f"the agent container needs the Docker socket at {SOCKET}")
    return os.stat(SOCKET).st_gid


@pytest.fixture(scope="module")
def agent_image(docker_client: DockerClient) -> Iterator[str]:
    build_agent_base(docker_client)
    tag = f"testhide/agent:test-{uuid.uuid4().hex[:8]}"
    build_agent(docker_client, tag)
    try:
        yield tag
    finally:
        docker_client.images.remove(tag)


def test_wheels_are_chosen_for_the_bases_interpreter_glibc_and_architecture() -> None:
    options = Target("3.11.2", "2.36", "aarch64").pip_options()
    interpreter = {"--implementation=cp", "--python-version=3.11.2", "--abi=cp311"}
    assert {"--only-binary=:all:", *interpreter} <= set(options)
    platforms = {option.removeprefix("--platform=") for option in options if option.startswith("--platform=")}
    assert {"manylinux_2_36_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= platforms
    assert "manylinux_2_37_aarch64" not in platforms  # built for a newer glibc than the base has
    assert not [platform for platform in platforms if "x86_64" in platform]


def test_every_entry_of_the_lock_is_read_with_its_version_and_hashes() -> None:
    lock = (REPO / "requirements.lock").read_text()
    entries = lock_entries(lock)
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", lock, re.MULTILINE))
    assert entries["grpcio"].version == importlib.metadata.version("grpcio")  # the venv is the lock
    for entry in entries.values():
        assert entry.hashes, entry.text
        assert entry.text.count("--hash=") == len(entry.hashes), entry.text


def test_a_wheel_other_than_the_locked_one_never_reaches_the_build_context(tmp_path: Path) -> None:
    lock = (REPO / "requirements.lock").read_text()
    idna = lock_entries(lock)["idna"]
    staging, dest = tmp_path / "staging", tmp_path / "wheels"
    staging.mkdir()
    (staging / f"idna-{idna.version}-py3-none-any.whl").write_bytes(b"not the wheel the lock names")
    with pytest.raises(SystemExit, match="DO NOT MATCH THE HASHES"):
        copy_locked([idna.text], staging, dest, Target("3.11.2", "2.36", platform.machine()))
    assert not list(dest.glob("*.whl"))
    # And the last look at the context before the build refuses it too.
    with pytest.raises(SystemExit, match=r"is not what requirements\.lock pins"):
        check_wheelhouse(staging, lock)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_image_holds_the_locked_runtime_and_runs_as_a_fixed_non_root_user(
    docker_client: DockerClient, agent_image: str
) -> None:
    config = docker_client.images.get(agent_image).attrs["Config"]
    assert config["User"] == f"{AGENT_UID}:{AGENT_UID}"
    assert config["Entrypoint"] == ["testhide-agent"]
    assert set(config["Volumes"]) == {DATA_DIR}
    # A tmpfs over the data dir: otherwise Docker makes an anonymous volume there, and keeps it.
    output = docker_client.containers.run(
        agent_image,
        ["-c", DISTRIBUTIONS],
        entrypoint="python3",
        network_mode="none",
        tmpfs={DATA_DIR: "size=1m"},
        remove=True,
    )
    installed: dict[str, str] = json.loads(output)
    assert installed.pop("testhide") == __version__
    locked = lock_entries((REPO / "requirements.lock").read_text())
    pins = {name: entry.version for name, entry in locked.items()}
    assert {name: pins.get(name) for name in installed} == installed  # each one locked, at its version
    assert {"grpcio", "docker", "cryptography", "structlog"} <= installed.keys()
    # Nothing that installs or tests: the test tools of the lock and pip itself stay out.
    tools = {"pip", "setuptools", "pytest", "mypy", "ruff", "uv", "grpcio-tools", "psycopg"}
    assert not tools & installed.keys()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_an_agent_enrolled_in_its_container_runs_a_job_with_only_the_socket_as_privilege(
    cp: RunningControlPlane, cli: Cli, docker_client: DockerClient, agent_image: str, socket_group: int
) -> None:
    suffix = uuid.uuid4().hex[:8]
    volume = docker_client.volumes.create(f"testhide-agent-test-{suffix}")
    data = {volume.name: {"bind": DATA_DIR, "mode": "rw"}}

    def enroll(token: str) -> bytes:
        command = ["enroll", "--server", cp.api_target, "--name", "in-a-container"]
        environment = {"TESTHIDE_ENROLL_TOKEN": token}
        output: bytes = docker_client.containers.run(
            agent_image, command, environment=environment, volumes=data, remove=True, **HARDENED
        )
        return output

    def start() -> Container:
        return docker_client.containers.run(
            agent_image,
            detach=True,
            name=f"testhide-agent-test-{suffix}",
            volumes={**data, SOCKET: {"bind": SOCKET, "mode": "rw"}},
            group_add=[str(socket_group)],
            **HARDENED,
        )

    try:
        enrolled = await asyncio.to_thread(enroll, await cp.enrollment_token())
        found = re.search(rb"enrolled as agent (\S+);", enrolled)
        assert found, enrolled
        container = await asyncio.to_thread(start)
        try:
            await connected(cp, container, found.group(1).decode())
            result = await cli("run", "--image", JOB_IMAGE, "--", "echo", "hello from the agent image")
            assert (result.returncode, result.stdout) == (0, b"hello from the agent image\n"), result.stderr
            await assert_unprivileged(container, socket_group)
            # SIGTERM drains and the agent exits 0: it is PID 1 and handles the signal itself.
            await asyncio.to_thread(container.stop, timeout=30)
            assert (await asyncio.to_thread(container.wait, timeout=30))["StatusCode"] == 0
            # The job's container and workspace volume went, removed by the agent through the socket.
            mine: dict[str, Any] = {"label": f"{OWNER_LABEL}={found.group(1).decode()}"}
            assert docker_client.containers.list(all=True, filters=mine) == []
            assert docker_client.volumes.list(filters=mine) == []
        finally:
            await asyncio.to_thread(container.remove, force=True)
    finally:
        await asyncio.to_thread(volume.remove, force=True)


async def connected(cp: RunningControlPlane, container: Container, agent_id: str) -> None:
    assert cp.daemon.scheduler is not None
    try:
        await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent_id), 60)
    except TimeoutError:
        logs = await asyncio.to_thread(container.logs)
        pytest.fail(f"the agent container never connected:\n{logs.decode(errors='replace')}")


async def assert_unprivileged(container: Container, socket_group: int) -> None:
    """What the agent is, seen from inside its container and in the container's configuration."""
    code, uid = await asyncio.to_thread(container.exec_run, ["id", "-u"])
    assert (code, uid) == (0, f"{AGENT_UID}\n".encode())
    code, status = await asyncio.to_thread(container.exec_run, ["cat", "/proc/1/status"])
    assert code == 0
    assert isinstance(status, bytes)
    fields = dict(line.split(":\t", 1) for line in status.decode().splitlines() if ":\t" in line)
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[capabilities] == "0000000000000000", (capabilities, fields[capabilities])
    assert fields["NoNewPrivs"] == "1"
    assert str(socket_group) in fields["Groups"].split()
    await asyncio.to_thread(container.reload)
    host = container.attrs["HostConfig"]
    assert (host["Privileged"], host["ReadonlyRootfs"], host["CapDrop"]) == (False, True, ["ALL"])
    assert not host["CapAdd"]
