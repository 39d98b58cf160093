"""The main path, as an engineer sees it: testhide run -> control plane ->
agent over mutual TLS -> a container with no network -> log back live."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane

pytestmark = pytest.mark.docker


async def test_run_prints_both_streams_and_exits_with_the_job_exit_code(
    docker_agent: Agent, cli: Cli
) -> None:
    result = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert b"err\n" in result.stderr
    assert b"out" not in result.stderr


async def test_run_exits_zero_on_success_and_detach_prints_only_the_id(docker_agent: Agent, cli: Cli) -> None:
    assert (await cli("run", "--image", JOB_IMAGE, "--", "true")).returncode == 0
    detached = await cli("run", "--detach", "--image", JOB_IMAGE, "--", "echo", "hi")
    assert detached.returncode == 0
    job_id = detached.stdout.decode().strip()
    assert job_id.startswith("j")
    assert "\n" not in job_id
    followed = await cli("logs", "--follow", job_id)
    assert followed.stdout == b"hi\n"


async def test_log_arrives_while_the_job_runs_and_cancel_stops_it(docker_agent: Agent, cli: Cli) -> None:
    detached = await cli(
        "run", "--detach", "--image", JOB_IMAGE, "--", "sh", "-c", "echo first; exec sleep 3600"
    )
    job_id = detached.stdout.decode().strip()
    follower = await cli.start("logs", "--follow", job_id)
    assert follower.stdout is not None
    line = await asyncio.wait_for(follower.stdout.readline(), 30)
    assert line == b"first\n"
    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert shown["status"] == "RUNNING"  # the line came while the job was still running

    canceled = await cli("cancel", job_id)
    assert canceled.returncode == 0
    await asyncio.wait_for(follower.wait(), 30)
    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert shown["status"] == "CANCELED"
    assert [t["status"] for t in shown["transitions"]] == ["QUEUED", "ASSIGNED", "RUNNING", "CANCELED"]


async def test_jobs_list_and_show(docker_agent: Agent, cli: Cli) -> None:
    await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "exit 7")
    listed = json.loads((await cli("jobs", "list", "--json")).stdout)
    assert len(listed) == 1
    shown = json.loads((await cli("jobs", "show", listed[0]["id"], "--json")).stdout)
    assert shown["status"] == "FAILED"
    assert shown["exit_code"] == 7
    assert shown["created_at"] <= shown["started_at"] <= shown["finished_at"]
    table = (await cli("jobs", "list")).stdout.decode()
    assert listed[0]["id"] in table
    assert "FAILED" in table


async def test_a_job_queued_before_any_agent_runs_when_one_connects(
    cp: RunningControlPlane, cli: Cli, docker_client: DockerClient, tmp_path: Path
) -> None:
    from datetime import timedelta

    from testhide.agent.runtime.docker import DockerRuntime
    from tests.harness import running_agent

    job_id = (
        (await cli("run", "--detach", "--image", JOB_IMAGE, "--", "echo", "late")).stdout.decode().strip()
    )
    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert shown["status"] == "QUEUED"
    async with running_agent(cp, tmp_path, DockerRuntime(docker_client), stop_grace=timedelta(seconds=1)):
        followed = await cli("logs", "--follow", job_id)
    assert followed.stdout == b"late\n"


async def test_an_image_missing_on_the_host_fails_the_job_with_a_reason(
    docker_agent: Agent, cli: Cli
) -> None:
    result = await cli("run", "--image", "testhide/not-built:1", "--", "true")
    assert result.returncode == 125
    assert b"not present on this agent's host" in result.stderr
    assert b"ERROR" in result.stderr


async def test_grpc_status_reaches_python_clients_unchanged(cp: RunningControlPlane) -> None:
    """The CLI's messages come from here: precise codes on the wire."""
    from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc

    credentials = grpc.ssl_channel_credentials(cp.ca_pem)
    async with grpc.aio.secure_channel(cp.api_target, credentials) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Get(jobs_pb2.GetJobRequest(job_id="jnope"), metadata=await cp.bearer())
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
