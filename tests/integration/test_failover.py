"""Agents and the CLI with several control-plane replicas: enrollment passes
over a server that is down, a refusal is final, a connected agent moves to
another replica when its own stops (its running job carries on, its log
whole), and so does a CLI follower; the CLI passes over a server that does
not connect without sending it anything. Server certificates carry every
name the operator gives.

Two replicas are two ``ControlPlane`` daemons on one data dir (SQLite: fine
while only one of them holds agents), each on its own ports. FakeRuntime
agents; no Docker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.errors import EnrollmentError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.base import ContainerRuntime
from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane.jobs.model import JobStatus
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    control_plane,
    free_port,
    job,
    operator,
    serving,
)
from tests.integration.test_agent_channel import FIRST, SECOND, WITHIN, Puppet, read_log, submit
from tests.integration.test_identity import audit_actions

# Replica A's in-flight calls get this long when it stops (a follower's stream among them).
GRACE = timedelta(seconds=1)


def nowhere() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    return f"127.0.0.1:{free_port()}"


@asynccontextmanager
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[RunningControlPlane, RunningControlPlane]]:
    async with (
        control_plane(tmp_path, shutdown_grace=GRACE) as a,
        serving(a.data_dir, a.admin_key, shutdown_grace=GRACE) as b,
    ):
        yield a, b


@asynccontextmanager
async def agent_of(
    data_dir: Path, runtime: ContainerRuntime, first: RunningControlPlane
) -> AsyncIterator[Agent]:
    """The agent enrolled in ``data_dir``, running, once connected to ``first``."""
    agent = Agent(AgentConfig(data_dir=data_dir), runtime)
    task = asyncio.create_task(agent.run())
    try:
        assert first.daemon.scheduler is not None
        await asyncio.wait_for(first.daemon.scheduler.wait_for_agent(agent.agent_id), 30)
        yield agent
    finally:
        agent.shutdown()
        await asyncio.wait_for(task, 60)


async def test_enrollment_passes_over_a_server_that_is_down(cp: RunningControlPlane, tmp_path: Path) -> None:
    down = nowhere()
    data_dir = tmp_path / "agent"
    credentials = await enroll([down, cp.api_target], await cp.enrollment_token(), data_dir, "second-try")
    assert credentials.api_endpoints == (down, cp.api_target)
    assert credentials.agent_endpoints[-1] == cp.agent_target  # as the replica that answered said
    assert Credentials.load(data_dir).api_endpoints == (down, cp.api_target)
    # `run` tries the first replica's (guessed) agent port first, and gets through on the second.
    async with agent_of(data_dir, FakeRuntime(), cp) as agent:
        assert agent.endpoints.preferred == cp.agent_target


async def test_no_server_answering_is_one_error_naming_them_all(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        token = await cp.enrollment_token()
    first, second = nowhere(), nowhere()
    with pytest.raises(EnrollmentError, match=f"cannot reach {first}: .*; nor {second}: "):
        await enroll([first, second], token, tmp_path / "agent", "lonely")
    assert not (tmp_path / "agent" / "agent.json").exists()


async def test_a_refusal_is_final_and_the_next_replica_is_not_asked(tmp_path: Path) -> None:
    async with replicas(tmp_path) as (a, b):
        token = await a.enrollment_token()
        await enroll(a.api_target, token, tmp_path / "first", "first")
        with pytest.raises(EnrollmentError, match="enrollment refused"):
            await enroll([a.api_target, b.api_target], token, tmp_path / "again", "again")
    refused = [e for e in await audit_actions(a.data_dir) if e["action"] == "enrollment_token_refused"]
    assert len(refused) == 1  # by A alone: B (same database) never saw the token


async def test_an_agent_moves_to_the_next_replica_when_its_own_stops(tmp_path: Path) -> None:
    async with replicas(tmp_path) as (a, b):
        assert b.daemon.scheduler is not None
        data_dir = tmp_path / "agent"
        await enroll(
            [a.api_target, b.api_target],
            await a.enrollment_token(),
            data_dir,
            "roamer",
            agent_servers=[a.agent_target, b.agent_target],
        )
        puppet = Puppet()
        async with agent_of(data_dir, puppet, a) as agent:
            job_id = await submit(a, workspace=False)
            await asyncio.wait_for(read_log(a, job_id, lambda log, _: log == FIRST), WITHIN)
            on_b = asyncio.create_task(b.daemon.scheduler.wait_for_agent(agent.agent_id))
            await a.daemon.shutdown()
            session = await asyncio.wait_for(on_b, 30)
            assert job_id in session.jobs  # its hello listed the running job
            assert agent.endpoints.preferred == b.agent_target
            await puppet.finish(job_id, SECOND)
            log = await asyncio.wait_for(read_log(b, job_id, lambda _, ended: ended is not None), WITHIN)
        assert log == FIRST + SECOND  # whole: what A had, and the rest through B
        final = await job(b, job_id)
        assert (final.status, final.exit_code) == (JobStatus.FAILED, 143)  # as the agent reported it


async def login(cli: Cli, cp: RunningControlPlane, *servers: str) -> None:
    args = [arg for server in servers for arg in ("--server", server)]
    result = await cli("login", *args, "--api-key", cp.admin_key, "--ca-file", str(cp.data_dir / "ca.pem"))
    assert result.returncode == 0, result.stderr


async def test_the_cli_passes_over_a_server_that_does_not_connect(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cli = Cli(tmp_path / "config")
    down = nowhere()
    await login(cli, cp, down, cp.api_target)
    stored = json.loads((tmp_path / "config" / "testhide" / "credentials.json").read_text())
    assert stored["servers"] == [down, cp.api_target]

    submitted = await cli("run", "--detach", "--no-workspace", "--image", JOB_IMAGE, "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    listed = await cli("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [submitted.stdout.decode().strip()]  # once


async def test_the_cli_with_no_server_answering_says_so_at_once(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cli = Cli(tmp_path / "config")
    first, second = nowhere(), nowhere()
    result = await cli("login", "--server", first, "--server", second, "--api-key", cp.admin_key, within=20)
    assert result.returncode == 125
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot reach the control plane at {first}, {second}: " in lines[0]


async def test_a_follower_moves_to_the_next_replica_with_the_agent(tmp_path: Path) -> None:
    async with replicas(tmp_path) as (a, b):
        assert b.daemon.scheduler is not None
        data_dir = tmp_path / "agent"
        await enroll(
            [a.api_target, b.api_target],
            await a.enrollment_token(),
            data_dir,
            "roamer",
            agent_servers=[a.agent_target, b.agent_target],
        )
        cli = Cli(tmp_path / "config")
        await login(cli, a, a.api_target, b.api_target)
        puppet = Puppet()
        async with agent_of(data_dir, puppet, a) as agent:
            job_id = await submit(a, workspace=False)
            follower = await cli.start("logs", "--follow", job_id)
            assert follower.stdout is not None
            assert await asyncio.wait_for(follower.stdout.readline(), WITHIN) == FIRST
            on_b = asyncio.create_task(b.daemon.scheduler.wait_for_agent(agent.agent_id))
            await a.daemon.shutdown()
            await asyncio.wait_for(on_b, 30)
            await puppet.finish(job_id, SECOND)
            out, err = await asyncio.wait_for(follower.communicate(), WITHIN)
    assert follower.returncode == 0, err
    assert out == SECOND  # after FIRST, read above: nothing lost, nothing twice
    assert f"lost the connection to the control plane at {a.api_target}" in err.decode()


async def test_server_certificates_carry_every_name_given(tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"
    names = ["cp-a.example.test", "cp-b.example.test", "192.0.2.10", "2001:db8::10", "localhost"]
    code, _, err = await operator("init", "--data-dir", str(data_dir), *_each("--server-name", names))
    assert code == 0, err
    assert sans(data_dir) == (
        ["cp-a.example.test", "cp-b.example.test", "localhost"],
        ["192.0.2.10", "2001:db8::10"],
    )

    later = ["cp-c.example.test", "192.0.2.11", "[2001:db8::11]"]
    code, _, err = await operator(
        "server-cert", "rotate", "--data-dir", str(data_dir), *_each("--server-name", later)
    )
    assert code == 0, err
    assert "for cp-c.example.test, 192.0.2.11, 2001:db8::11" in err
    assert sans(data_dir) == (["cp-c.example.test"], ["192.0.2.11", "2001:db8::11"])
    # Recorded: a rotation without names (and a CA activation) keeps them.
    code, _, err = await operator("server-cert", "rotate", "--data-dir", str(data_dir))
    assert code == 0, err
    assert sans(data_dir) == (["cp-c.example.test"], ["192.0.2.11", "2001:db8::11"])

    before = (data_dir / "server.pem").read_bytes()
    for bad in ("cp.example.test:7443", "https://cp.example.test", "under_score.test", ""):
        code, _, err = await operator(
            "server-cert", "rotate", "--data-dir", str(data_dir), "--server-name", bad
        )
        assert code != 0, bad
        assert "neither an IP address nor a DNS name" in err, err
    assert (data_dir / "server.pem").read_bytes() == before


def _each(option: str, values: list[str]) -> list[str]:
    return [arg for value in values for arg in (option, value)]


def sans(data_dir: Path) -> tuple[list[str], list[str]]:
    """The DNS and IP names of the server certificate in ``data_dir``."""
    leaf = x509.load_pem_x509_certificate((data_dir / "server.pem").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        names.get_values_for_type(x509.DNSName),
        [str(ip) for ip in names.get_values_for_type(x509.IPAddress)],
    )
