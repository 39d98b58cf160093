"""Jobs as engineers use them, end to end on real Docker: workspaces,
artifacts, secrets, stopping, limits, routing and image policy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.jobs.model import PoolPolicy, PullPolicy
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, running_agent

pytestmark = pytest.mark.docker


async def show(cli: Cli, job_id: str) -> dict[str, object]:
    shown: dict[str, object] = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    return shown


# Workspaces -----------------------------------------------------------------------------------------------


async def test_the_current_directory_becomes_the_workspace(
    docker_agent: Agent, cli: Cli, tmp_path: Path
) -> None:
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "hello.txt").write_text("hello from the workspace\n")
    (work / "build.log").write_text("ignored\n")
    (work / ".testhideignore").write_text("*.log\n")
    result = await cli(
        "run",
        "--image",
        JOB_IMAGE,
        "--",
        "sh",
        "-c",
        "cat src/hello.txt; ls -a; touch made-here && echo writable",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.startswith("hello from the workspace\n")
    assert "build.log" not in out
    assert ".testhideignore" in out
    assert "writable" in out


async def test_a_git_repository_sends_tracked_and_untracked_unignored_files(
    docker_agent: Agent, cli: Cli, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, text in {
        "tracked.txt": "t",
        "untracked.txt": "u",
        "secret.env": "s",
        ".gitignore": "*.env\n",
    }.items():
        (repo / name).write_text(text)
    await asyncio.to_thread(subprocess.run, ["git", "init", "-q"], cwd=repo, check=True)
    await asyncio.to_thread(subprocess.run, ["git", "add", "tracked.txt", ".gitignore"], cwd=repo, check=True)
    result = await cli("run", "--image", JOB_IMAGE, "--", "ls", "-A", cwd=repo)
    assert result.stdout.decode().split() == [".gitignore", "tracked.txt", "untracked.txt"]


async def test_a_workspace_over_the_cap_is_refused_before_anything_is_sent(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    work = tmp_path / "big"
    work.mkdir()
    (work / "blob.bin").write_bytes(b"x" * 4096)
    result = await cli("run", "--workspace-cap", "2k", "--image", JOB_IMAGE, "--", "true", cwd=work)
    assert result.returncode == 125
    assert b"above the" in result.stderr
    assert b"cap" in result.stderr
    assert b"Traceback" not in result.stderr
    assert json.loads((await cli("jobs", "list", "--json")).stdout) == []


def hostile_tar(kind: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(
            {"dotdot": "../../etc/cron.d/x", "absolute": "/etc/passwd", "symlink": "etc", "device": "null"}[
                kind
            ]
        )
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc"
            tar.addfile(info)
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "device"])
async def test_hostile_workspace_archives_are_refused_by_the_agent(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli, kind: str
) -> None:
    metadata = await cp.bearer()
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)

        async def chunks() -> AsyncIterator[jobs_pb2.DataChunk]:
            yield jobs_pb2.DataChunk(data=hostile_tar(kind))

        uploaded = await stub.UploadWorkspace(chunks(), metadata=metadata)
        spec = jobs_pb2.JobSpec(
            image=JOB_IMAGE, command=["sh", "-c", "echo ran"], workspace_id=uploaded.workspace_id
        )
        job = (await stub.Submit(jobs_pb2.SubmitJobRequest(spec=spec), metadata=metadata)).job
    followed = await cli("logs", "--follow", job.id)
    assert b"ran" not in followed.stdout
    assert b"workspace archive refused" in followed.stderr
    shown = await show(cli, job.id)
    assert shown["status"] == "ERROR"
    assert "refused" in str(shown["status_reason"])


# Artifacts ------------------------------------------------------------------------------------------------


async def test_artifacts_come_back_verified_and_links_are_not_followed(
    docker_agent: Agent, cli: Cli, tmp_path: Path
) -> None:
    script = (
        "mkdir -p out/nested && echo report > out/report.txt"
        " && head -c 100000 /dev/urandom > out/nested/r.bin"
        " && ln -s /etc/passwd out/passwd && echo done"
    )
    job_id = (
        (await cli("run", "-d", "--artifacts", "out/**", "--image", JOB_IMAGE, "--", "sh", "-c", script))
        .stdout.decode()
        .strip()
    )
    followed = await cli("logs", "--follow", job_id)
    assert b"out/passwd (not a regular file)" in followed.stderr
    download = tmp_path / "downloaded"
    result = await cli("artifacts", job_id, "-o", str(download))
    assert result.returncode == 0, result.stderr
    assert (download / "out" / "report.txt").read_text() == "report\n"
    assert (download / "out" / "nested" / "r.bin").stat().st_size == 100000
    assert not (download / "out" / "passwd").exists()
    assert sorted(line.split()[0] for line in result.stdout.decode().splitlines()) == [
        "out/nested/r.bin",
        "out/report.txt",
    ]


# Secrets --------------------------------------------------------------------------------------------------

SECRET = "s3cr3t-Value-0123456789"


async def test_secrets_reach_the_job_but_never_the_log(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=SECRET.encode() + b"\n")).returncode == 0
    listed = (await cli("secrets", "list")).stdout.decode()
    assert "DEPLOY_TOKEN" in listed
    assert SECRET not in listed
    half = len(SECRET) // 2
    script = (
        f'echo "plain: $DEPLOY_TOKEN"; printf "split: {SECRET[:half]}"; sleep 0.6; '
        f'printf "{SECRET[half:]} end\\n"; echo "b64: $(printf "user:$DEPLOY_TOKEN" | base64)"; '
        f'[ "$DEPLOY_TOKEN" = "{SECRET}" ] && echo "value arrived intact" >&2'
    )
    result = await cli("run", "--secret", "DEPLOY_TOKEN", "--image", JOB_IMAGE, "--", "sh", "-c", script)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "plain: ***" in out
    assert "split: *** end" in out
    assert SECRET not in out
    assert base64.b64encode(b"user:" + SECRET.encode()).decode() not in out
    assert SECRET[half:] not in out
    assert SECRET[:half] not in out
    assert b"value arrived intact" in result.stderr
    jobs = json.loads((await cli("jobs", "list", "--json")).stdout)
    stored = await cli("logs", jobs[0]["id"])
    assert SECRET.encode() not in stored.stdout + stored.stderr


async def test_an_unknown_secret_refuses_the_job(cp: RunningControlPlane, cli: Cli) -> None:
    result = await cli("run", "--secret", "NOT_SET", "--image", JOB_IMAGE, "--", "true")
    assert result.returncode == 125
    assert b"secrets not found" in result.stderr


# Stopping -------------------------------------------------------------------------------------------------


async def test_cancel_sends_sigterm_then_sigkill_within_grace(docker_agent: Agent, cli: Cli) -> None:
    job_id = (
        (
            await cli(
                "run",
                "-d",
                "--image",
                JOB_IMAGE,
                "--",
                "sh",
                "-c",
                "trap '' TERM; echo ignoring-term; while true; do sleep 1; done",
            )
        )
        .stdout.decode()
        .strip()
    )
    follower = await cli.start("logs", "--follow", job_id)
    assert follower.stdout is not None
    assert await asyncio.wait_for(follower.stdout.readline(), 30) == b"ignoring-term\n"
    started = time.monotonic()
    assert (await cli("cancel", job_id)).returncode == 0
    await asyncio.wait_for(follower.wait(), 30)
    shown = await show(cli, job_id)
    assert shown["status"] == "CANCELED"
    assert time.monotonic() - started < 1 + 2  # grace (1 s in tests) + 2 s


async def test_timeout_ends_the_job_as_timed_out(docker_agent: Agent, cli: Cli) -> None:
    result = await cli("run", "--timeout", "2s", "--image", JOB_IMAGE, "--", "sleep", "60")
    assert result.returncode == 124
    assert b"TIMED_OUT" in result.stderr


async def test_out_of_memory_is_reported_as_such(docker_agent: Agent, cli: Cli) -> None:
    result = await cli(
        "run",
        "--memory",
        "16m",
        "--image",
        JOB_IMAGE,
        "--",
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    )
    assert b"survived" not in result.stdout
    assert result.returncode == 137
    jobs = json.loads((await cli("jobs", "list", "--json")).stdout)
    assert jobs[0]["status"] == "FAILED"
    assert "out of memory" in jobs[0]["status_reason"]


async def test_the_log_cap_truncates_visibly_and_the_job_keeps_running(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(cp, tmp_path, DockerRuntime(docker_client), log_cap_bytes=1024 * 1024):
        result = await cli(
            "run",
            "--image",
            JOB_IMAGE,
            "--",
            "sh",
            "-c",
            "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo finished-after-cap >&2; exit 0",
        )
    assert result.returncode == 0
    assert len(result.stdout) == 1024 * 1024
    assert b"log truncated at 1 MiB; the job keeps running" in result.stderr
    jobs = json.loads((await cli("jobs", "list", "--json")).stdout)
    assert jobs[0]["status"] == "SUCCEEDED"


# Agents at work -------------------------------------------------------------------------------------------


async def test_max_jobs_runs_jobs_side_by_side(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(
        cp, tmp_path, DockerRuntime(docker_client), max_jobs=2, stop_grace=timedelta(seconds=1)
    ):
        ids = [
            (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", "echo up; sleep 30"))
            .stdout.decode()
            .strip()
            for _ in range(2)
        ]
        followers = [await cli.start("logs", "--follow", job_id) for job_id in ids]
        for follower in followers:
            assert follower.stdout is not None
            assert await asyncio.wait_for(follower.stdout.readline(), 30) == b"up\n"
        assert [(await show(cli, job_id))["status"] for job_id in ids] == ["RUNNING", "RUNNING"]
        for job_id in ids:
            await cli("cancel", job_id)
        for follower in followers:
            await asyncio.wait_for(follower.wait(), 30)


async def test_labels_route_jobs_and_a_job_nobody_can_take_says_why(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(cp, tmp_path, DockerRuntime(docker_client), labels={"gpu": "yes"}):
        routed = await cli("run", "--label", "gpu=yes", "--image", JOB_IMAGE, "--", "echo", "on a gpu host")
        assert routed.stdout == b"on a gpu host\n"
        stuck = (
            (await cli("run", "-d", "--label", "arch=arm64", "--image", JOB_IMAGE, "--", "true"))
            .stdout.decode()
            .strip()
        )
        shown = await show(cli, stuck)
        assert shown["status"] == "QUEUED"
        assert "no connected agent of pool 'default' offers labels arch=arm64" in str(shown["status_reason"])
        human = (await cli("jobs", "show", stuck)).stdout.decode()
        assert "arch=arm64" in human


# Image policy ---------------------------------------------------------------------------------------------


async def test_a_pool_refuses_images_outside_its_allow_list(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    assert cp.daemon._store is not None
    await cp.daemon._store.set_pool_policy(
        "default", "default", PoolPolicy(allowed_images=("testhide/*",), pull_policy=PullPolicy.NEVER)
    )
    allowed = await cli("run", "--image", JOB_IMAGE, "--", "echo", "fine")
    assert allowed.stdout == b"fine\n"
    refused = await cli("run", "--image", "docker.io/library/alpine:3", "--", "echo", "never")
    assert refused.returncode == 125
    assert b"never" not in refused.stdout
    assert b"is not allowed in pool 'default'" in refused.stderr


async def test_pull_policy_always_pulls_on_the_host_and_fails_clearly(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    # A registry address on loopback where nothing listens: the pull is refused at once.
    assert cp.daemon._store is not None
    await cp.daemon._store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.ALWAYS))
    result = await cli("run", "--image", "127.0.0.1:1/testhide/busybox:1", "--", "echo", "never")
    assert result.returncode == 125
    assert b"could not pull image '127.0.0.1:1/testhide/busybox:1' (pull policy: always)" in result.stderr
