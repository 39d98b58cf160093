from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from testhide.agent.daemon import Agent
from tests.harness import Cli, RunningControlPlane, control_plane, running_agent, unavailable
from tests.pg import fresh_database

if TYPE_CHECKING:
    from docker import DockerClient


@pytest.fixture(scope="session")
def docker_client() -> DockerClient:
    """A Docker engine with the job images built. Skips on a laptop without
    Docker; in CI (CI=true) a missing engine fails the test instead."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        unavailable(f"Docker engine not reachable: {exc}")
    from images.build import build

    build(client)
    return client


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database on the test cluster (dropped afterwards)."""
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with control_plane(tmp_path) as running:
        yield running


@pytest.fixture
async def docker_agent(
    cp: RunningControlPlane, tmp_path: Path, docker_client: DockerClient
) -> AsyncIterator[Agent]:
    from datetime import timedelta

    from testhide.agent.runtime.docker import DockerRuntime

    async with running_agent(
        cp, tmp_path, DockerRuntime(docker_client), stop_grace=timedelta(seconds=1)
    ) as agent:
        yield agent


@pytest.fixture
async def cli(cp: RunningControlPlane, tmp_path: Path) -> Cli:
    client = Cli(tmp_path / "config")
    result = await client.login(cp)
    assert result.returncode == 0, result.stderr
    return client


@pytest.fixture(scope="session")
def python_image(docker_client: DockerClient) -> str:
    """testhide/python:1 (Debian minbase with python3 and pytest); built by
    scripts/host-setup, or here on first use (about a minute)."""
    from images.build import PYTHON_IMAGE, build_python

    build_python(docker_client)
    return PYTHON_IMAGE
