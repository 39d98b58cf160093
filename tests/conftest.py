from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog

from testhide.agent.daemon import Agent
from tests.harness import Cli, RunningControlPlane, control_plane, running_agent, unavailable
from tests.pg import fresh_database

if TYPE_CHECKING:
    from docker import DockerClient


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files that hold slow or chaos tests first, each file's tests in their order: the test workers
    take one file at a time in this order, so the long ones start early instead of one of them
    running alone at the end."""
    long_files = {
        item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("chaos")
    }
    items.sort(key=lambda item: item.path not in long_files)


@pytest.fixture(autouse=True, scope="session")
def loggers_never_cached() -> Iterator[None]:
    """The daemons cache each module's logger on first use (cheaper per line). In one test process
    that would let a logger cached after one test configured logging escape a later test's
    ``capture_logs``, depending on test order; here every logger stays lazy."""
    original = structlog.configure

    def configure(**settings: Any) -> None:
        original(**{**settings, "cache_logger_on_first_use": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(structlog, "configure", configure)
        yield


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
