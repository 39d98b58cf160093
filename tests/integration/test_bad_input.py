"""Bad input gets a precise status and a clear message, and changes nothing."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from testhide.agent.errors import EnrollmentError
from testhide.agent.rpc.enroll import enroll
from testhide.common.tls import fingerprint
from testhide.controlplane.auth.secrets import hash_secret, new_enrollment_token
from testhide.controlplane.store.base import EnrollmentTokenRecord
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import Cli, RunningControlPlane, operator


async def submit(cp: RunningControlPlane, spec: jobs_pb2.JobSpec) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        metadata = await cp.bearer()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Submit(jobs_pb2.SubmitJobRequest(spec=spec), metadata=metadata)
        listed = await stub.List(jobs_pb2.ListJobsRequest(), metadata=metadata)
        assert list(listed.jobs) == []  # nothing was created
        return error.value


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (jobs_pb2.JobSpec(image="Not A Valid/Image", command=["true"]), "image"),
        (jobs_pb2.JobSpec(image="busybox", command=[]), "command"),
        (jobs_pb2.JobSpec(image="busybox", command=[""]), "command"),
        (jobs_pb2.JobSpec(image="busybox", command=["true"], env={"1BAD": "x"}), "environment"),
        (jobs_pb2.JobSpec(image="busybox", command=["true"], pool="no-such-pool"), "pool"),
        (jobs_pb2.JobSpec(image="busybox", command=["true"], resources=jobs_pb2.Resources(pids=1)), "pids"),
        (jobs_pb2.JobSpec(image="busybox", command=["true"], workdir="relative"), "workdir"),
    ],
)
async def test_invalid_specs_are_refused_with_the_field_named(
    cp: RunningControlPlane, spec: jobs_pb2.JobSpec, field: str
) -> None:
    error = await submit(cp, spec)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")


async def test_an_oversized_request_is_refused(cp: RunningControlPlane) -> None:
    error = await submit(
        cp, jobs_pb2.JobSpec(image="busybox", command=["true"], env={"BIG": "x" * (5 << 20)})
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cli_reports_a_bad_image_in_one_line(cp: RunningControlPlane, cli: Cli) -> None:
    result = await cli("run", "--image", "UPPER/case", "--", "true")
    assert result.returncode == 125  # testhide's own failure, never a job's 1 or 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "not a valid image reference" in lines[0]
    assert "invalid_argument" in lines[0]
    assert (await cli("jobs", "list", "--json")).stdout.strip() == b"[]"


async def test_cli_without_a_command_is_a_usage_error(cli: Cli) -> None:
    result = await cli("run", "--image", "busybox")
    assert result.returncode == 125
    assert b"Traceback" not in result.stderr


async def test_cli_login_with_a_wrong_key_fails_and_stores_nothing(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    fresh = Cli(tmp_path / "other-config")
    result = await fresh.login(cp, api_key="thk_0123456789abcdef_" + "a" * 64)
    assert result.returncode == 125
    assert b"unauthenticated" in result.stderr
    assert b"Traceback" not in result.stderr
    assert not (tmp_path / "other-config" / "testhide" / "credentials.json").exists()
    not_logged_in = await fresh("jobs", "list")
    assert not_logged_in.returncode == 125
    assert b"not logged in" in not_logged_in.stderr


async def test_cli_unknown_job_is_not_found(cli: Cli) -> None:
    result = await cli("jobs", "show", "j000000000000000000000000")
    assert result.returncode == 125
    assert b"not found" in result.stderr
    assert b"Traceback" not in result.stderr


# Enrollment ---------------------------------------------------------------------------------------------


async def test_enrollment_with_a_forged_secret_is_refused(cp: RunningControlPlane, tmp_path: Path) -> None:
    real = await cp.enrollment_token()
    prefix, token_id, _secret, fp = real.split(".")
    forged = ".".join([prefix, token_id, "0" * 64, fp])
    with pytest.raises(EnrollmentError, match="enrollment refused"):
        await enroll(cp.api_target, forged, tmp_path / "agent", "forger")
    assert not (tmp_path / "agent").exists()
    await enroll(cp.api_target, real, tmp_path / "agent", "honest")  # the real token was not burnt


async def test_an_enrollment_token_works_once(cp: RunningControlPlane, tmp_path: Path) -> None:
    token = await cp.enrollment_token()
    await enroll(cp.api_target, token, tmp_path / "first", "first")
    with pytest.raises(EnrollmentError, match="already used"):
        await enroll(cp.api_target, token, tmp_path / "second", "second")
    assert not (tmp_path / "second").exists()


async def test_an_expired_enrollment_token_is_refused(cp: RunningControlPlane, tmp_path: Path) -> None:
    text, parsed = new_enrollment_token(fingerprint(cp.ca_pem))
    past = datetime.now(UTC) - timedelta(minutes=20)
    assert cp.daemon._store is not None
    await cp.daemon._store.create_enrollment_token(
        EnrollmentTokenRecord(
            parsed.token_id,
            "default",
            "default",
            hash_secret(parsed.secret),
            past,
            past + timedelta(minutes=10),
        )
    )
    with pytest.raises(EnrollmentError, match="expired"):
        await enroll(cp.api_target, text, tmp_path / "agent", "late")


async def test_a_token_pinning_another_ca_never_talks_to_this_server(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    real = await cp.enrollment_token()
    wrong_pin = real.rsplit(".", 1)[0] + "." + "ab" * 32
    with pytest.raises(EnrollmentError, match="pinned"):
        await enroll(cp.api_target, wrong_pin, tmp_path / "agent", "mitm")


async def test_a_malformed_token_is_refused_locally(cp: RunningControlPlane, tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="malformed"):
        await enroll(cp.api_target, "th1.garbage", tmp_path / "agent", "x")


# Operator commands on bad data dirs ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "--listen", "127.0.0.1:0"], ["enroll-token", "create"]])
async def test_missing_or_uninitialised_data_dir(tmp_path: Path, command: list[str]) -> None:
    code, _, err = await operator(*command, "--data-dir", str(tmp_path / "missing"))
    assert code == 1
    assert "does not exist" in err
    assert "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = await operator(*command, "--data-dir", str(tmp_path / "empty"))
    assert code == 1
    assert "not initialised" in err
    assert "Traceback" not in err


def files_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


async def test_init_twice_refuses_and_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "cp"
    code, _, _ = await operator("init", "--data-dir", str(target))
    assert code == 0
    before = await asyncio.to_thread(files_in, target)
    code, _, err = await operator("init", "--data-dir", str(target))
    assert code == 1
    assert "refusing" in err
    assert await asyncio.to_thread(files_in, target) == before
    assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == ["cp"]  # no staging left behind
