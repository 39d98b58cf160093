"""Exit statuses CI can trust, end to end: a job's own 1 and 2 come back as
1 and 2, while testhide's own failures (refused requests, a failed login, a
control plane it cannot reach) exit 125, and a command that cannot be run
exits 126 or 127, as with `docker run`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, free_port

pytestmark = pytest.mark.docker


@pytest.mark.parametrize("code", [1, 2, 3])
async def test_a_job_exiting_1_or_2_exits_1_or_2(docker_agent: Agent, cli: Cli, code: int) -> None:
    result = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", f"echo ran; exit {code}")
    assert result.returncode == code, result.stderr
    assert result.stdout == b"ran\n"


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_a_command_not_found_exits_127(docker_agent: Agent, cli: Cli, runtime: str) -> None:
    result = await cli("run", "--runtime", runtime, "--image", JOB_IMAGE, "--", "no-such-command")
    assert result.returncode == 127, result.stderr
    assert b"no-such-command" in result.stderr


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_a_command_that_cannot_be_executed_exits_126(
    docker_agent: Agent, cli: Cli, runtime: str
) -> None:
    result = await cli("run", "--runtime", runtime, "--image", JOB_IMAGE, "--", "/")
    assert result.returncode == 126, result.stderr
    assert b"permission denied" in result.stderr


async def test_a_timeout_exits_124(docker_agent: Agent, cli: Cli) -> None:
    result = await cli("run", "--timeout", "1s", "--image", JOB_IMAGE, "--", "sleep", "60")
    assert result.returncode == 124, result.stderr
    assert b"TIMED_OUT" in result.stderr


async def test_an_unknown_pool_or_secret_exits_125_and_runs_nothing(
    cp: RunningControlPlane, cli: Cli
) -> None:
    pool = await cli("run", "--pool", "nowhere", "--image", JOB_IMAGE, "--", "true")
    assert pool.returncode == 125
    assert b"pool 'nowhere' does not exist" in pool.stderr
    secret = await cli("run", "--secret", "NOT_SET", "--image", JOB_IMAGE, "--", "true")
    assert secret.returncode == 125
    assert b"secrets not found" in secret.stderr
    assert json.loads((await cli("jobs", "list", "--json")).stdout) == []


async def test_an_unknown_job_and_a_usage_error_exit_125(cp: RunningControlPlane, cli: Cli) -> None:
    unknown = await cli("jobs", "show", "j000000000000000000000000")
    assert unknown.returncode == 125
    assert b"not found" in unknown.stderr
    usage = await cli("run", "--no-such-option", "--image", JOB_IMAGE, "--", "true")
    assert usage.returncode == 125
    assert b"No such option" in usage.stderr


async def test_a_failed_login_exits_125(cp: RunningControlPlane, tmp_path: Path) -> None:
    fresh = Cli(tmp_path / "other-config")
    result = await fresh.login(cp, api_key="thk_0123456789abcdef_" + "a" * 64)
    assert result.returncode == 125
    assert b"unauthenticated" in result.stderr
    not_logged_in = await fresh("jobs", "list")
    assert not_logged_in.returncode == 125
    assert b"not logged in" in not_logged_in.stderr


async def test_a_control_plane_nobody_answers_exits_125_at_once(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    fresh = Cli(tmp_path / "third-config")
    nowhere = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    login = await fresh("login", "--server", nowhere, "--api-key", cp.admin_key, within=10)
    assert login.returncode == 125
    lines = login.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot reach the control plane at {nowhere}" in lines[0]
    assert time.monotonic() - started < 10
