"""Abuse by callers who hold nothing or little: a flood of password logins,
following made-up jobs, guessing across accounts from one address, and an
enrollment request that cannot succeed. Each test names the attack."""

from __future__ import annotations

import asyncio
import gc
import secrets
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testhide.agent.credentials import Credentials
from testhide.agent.rpc.enroll import enroll
from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.controlplane.auth.passwords import hash_password
from testhide.controlplane.store.base import UserRecord
from testhide.protos.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from tests.harness import JOB_IMAGE, RunningControlPlane, control_plane, enrolled, eventually

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PASSWORD = "Str0ng-Passw0rd!"


@asynccontextmanager
async def api(cp: RunningControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        yield channel


async def login(cp: RunningControlPlane, request: auth_pb2.LoginRequest) -> grpc.aio.AioRpcError | None:
    async with api(cp) as channel:
        try:
            await auth_pb2_grpc.AuthStub(channel).Login(request, timeout=60)
        except grpc.aio.AioRpcError as error:
            return error
    return None


def password(user: str, text: str) -> auth_pb2.LoginRequest:
    return auth_pb2.LoginRequest(password=auth_pb2.PasswordLogin(org="default", user=user, password=text))


def retry_after(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ())["retry-after"])


async def add_user(cp: RunningControlPlane, name: str) -> None:
    assert cp.daemon._store is not None
    hashed = await asyncio.to_thread(hash_password, PASSWORD)
    await cp.daemon._store.create_user(
        UserRecord("u" + secrets.token_hex(8), "default", name, hashed, ("jobs:read",), datetime.now(UTC))
    )


async def health_check(channel: grpc.aio.Channel) -> None:
    # types-grpcio-health-checking declares HealthStub without its methods.
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=60)  # type: ignore[attr-defined]
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def assignment(
    stream: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
) -> str:
    """The id of the next job assigned on an agent's stream."""
    while True:
        message = await asyncio.wait_for(stream.read(), 60)
        assert isinstance(message, agent_pb2.ControlMessage), "the agent's stream ended"
        if message.WhichOneof("body") == "assign":
            return message.assign.job_id


# -------------------------------------------------------------------------- 12: login flood

FLOOD = 64


@pytest.mark.timeout(300)
async def test_a_login_flood_does_not_stall_health_checks_or_agent_streams(tmp_path: Path) -> None:
    # Many addresses' worth of budget: what is under test here is bcrypt, not the per-address budget.
    async with control_plane(
        tmp_path, address_lockout=LockoutPolicy(failures=100_000), password_workers=1, password_queue=8
    ) as cp:
        assert cp.daemon.password_checks is not None
        capacity = cp.daemon.password_checks.capacity
        credentials = Credentials.load(await enrolled(cp, tmp_path))
        bearer = await cp.bearer()
        agent_channel = grpc.aio.secure_channel(
            cp.agent_target,
            grpc.ssl_channel_credentials(cp.ca_pem, credentials.key_pem, credentials.certificate_pem),
        )
        async with api(cp) as channel, agent_channel:
            stream = agent_pb2_grpc.AgentControlStub(agent_channel).Connect()
            await stream.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=1, runtimes=["runc"])))
            assert await stream.initial_metadata()  # the agent's stream is open

            answers: list[grpc.StatusCode] = []
            refusals: list[grpc.aio.AioRpcError] = []
            first_answer = asyncio.Event()

            async def guess(i: int) -> None:
                try:
                    await auth_pb2_grpc.AuthStub(channel).Login(password(f"nobody-{i}", "guess"), timeout=120)
                    answers.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    answers.append(error.code())
                    if error.code() == EXHAUSTED:
                        refusals.append(error)
                first_answer.set()

            flood = [asyncio.create_task(guess(i)) for i in range(FLOOD)]
            await asyncio.wait_for(first_answer.wait(), 60)

            # While the flood is being checked: health checks on both ports, and a job
            # submitted on the API port reaching the agent over its stream.
            checked_before = answers.count(UNAUTH)
            probes = 0
            for _ in range(20):
                await health_check(channel)
                probes += 1
            await health_check(agent_channel)
            submitted = await jobs_pb2_grpc.JobsStub(channel).Submit(
                jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"])),
                metadata=bearer,
                timeout=60,
            )
            assert await assignment(stream) == submitted.job.id
            probes += 3
            checked_during = answers.count(UNAUTH) - checked_before
            unanswered = FLOOD - len(answers)
            stream.cancel()
            await asyncio.gather(*flood)

    # The probes did not queue behind password checks: with them on the event loop,
    # each probe waited for at least one (~240 ms) and the flood finished first.
    assert checked_during < probes / 2, (checked_during, probes)
    assert unanswered > 0, "the flood was over before the probes were answered"
    # The excess was refused at once, with a reason and a retry hint; nobody got in.
    assert set(answers) <= {UNAUTH, EXHAUSTED}, answers
    assert len(refusals) >= FLOOD - 2 * capacity, answers
    assert "too many password logins" in (refusals[0].details() or "")
    assert retry_after(refusals[0]) == "1"


# -------------------------------------------------------------------------- 13: following unknown jobs


async def test_following_unknown_jobs_does_not_grow_memory(tmp_path: Path) -> None:
    id_bytes, calls = 4096, 1000  # 4 KiB ids: their status still fits gRPC's metadata limit
    async with control_plane(tmp_path, rate_per_address=1e6, rate_per_principal=1e6) as cp:
        assert cp.daemon.jobs is not None
        logs = cp.daemon.jobs._logs
        metadata = await cp.bearer()
        codes: set[grpc.StatusCode] = set()
        async with api(cp) as channel:
            stub = jobs_pb2_grpc.JobsStub(channel)

            async def follow(i: int) -> None:
                job_id = f"j{i:024x}".ljust(id_bytes, "0")
                call = stub.FollowLogs(
                    jobs_pb2.FollowLogsRequest(job_id=job_id, follow=True), metadata=metadata, timeout=60
                )
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in call:
                        pass
                codes.add(error.value.code())

            await asyncio.gather(*(follow(i) for i in range(50)))  # warm up caches and pools
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for first in range(0, calls, 50):
                    await asyncio.gather(*(follow(i) for i in range(first, first + 50)))
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()

            assert codes <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, codes
            assert logs.watched_jobs == 0
            # Before, every call left its id behind: 1,000 x 4 KiB.
            assert grown < calls * id_bytes // 4, grown

            # A follower of a real job holds one watch, and it goes with the follower.
            submitted = await stub.Submit(
                jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"])),
                metadata=metadata,
            )
            call = stub.FollowLogs(
                jobs_pb2.FollowLogsRequest(job_id=submitted.job.id, follow=True), metadata=metadata
            )
            await call.initial_metadata()
            await eventually(lambda: logs.watched_jobs == 1, 30, "the follower's watch")
            call.cancel()
            await eventually(lambda: logs.watched_jobs == 0, 30, "the watch to go with its follower")


# -------------------------------------------------------------------------- 14: guessing across accounts


async def test_password_spraying_from_one_address_is_slowed_then_refused(tmp_path: Path) -> None:
    async with control_plane(tmp_path, address_lockout=LockoutPolicy(failures=20)) as cp:
        await add_user(cp, "grace")
        # One common password against twenty accounts: each account fails once only.
        for i in range(20):
            error = await login(cp, password(f"user-{i}", "Summer2030!"))
            assert error is not None
            assert (error.code(), error.details()) == (UNAUTH, "invalid credentials")
        # The address has spent its budget: refused before any check, alike for a known
        # account with its right password, an unknown one, and a valid API key.
        refused = [
            await login(cp, password("grace", PASSWORD)),
            await login(cp, password("nobody-by-this-name", "Summer2030!")),
            await login(cp, auth_pb2.LoginRequest(api_key=cp.admin_key)),
        ]
        for error in refused:
            assert error is not None
            assert error.code() == EXHAUSTED
            assert "too many failed logins from this address" in (error.details() or "")
            assert retry_after(error) == "1"
        assert len({error.details() for error in refused if error}) == 1
        await asyncio.sleep(1.1)  # the backoff itself is what is under test
        error = await login(cp, password("user-20", "Summer2030!"))
        assert error is not None
        assert error.code() == UNAUTH  # one more guess after the wait...
        error = await login(cp, password("user-21", "Summer2030!"))
        assert error is not None
        assert (error.code(), retry_after(error)) == (EXHAUSTED, "2")  # ...and the wait doubles


async def test_guessing_many_api_keys_from_one_address_is_slowed_then_refused(tmp_path: Path) -> None:
    async with control_plane(tmp_path, address_lockout=LockoutPolicy(failures=20)) as cp:
        for i in range(20):
            guess = f"thk_{secrets.token_hex(8)}_{secrets.token_hex(32)}" if i % 2 else f"not-a-key-{i}"
            error = await login(cp, auth_pb2.LoginRequest(api_key=guess))
            assert error is not None
            assert (error.code(), error.details()) == (UNAUTH, "invalid credentials")
        error = await login(cp, auth_pb2.LoginRequest(api_key=cp.admin_key))
        assert error is not None
        assert error.code() == EXHAUSTED
        assert cp.daemon._store is not None
        assert (await cp.daemon._store.address_failures("127.0.0.1", datetime.now(UTC) - timedelta(hours=1)))[
            0
        ] == 20


# -------------------------------------------------------------------------- 15: enrollment


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def test_enroll_with_a_non_p256_csr_does_not_burn_the_token(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    token = await cp.enrollment_token()
    wrong_keys: list[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] = [
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
    ]
    async with api(cp) as channel:
        for key in wrong_keys:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                    enrollment_pb2.EnrollRequest(token=token, csr_pem=csr_for(key), name="agent")
                )
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "P-256" in (error.value.details() or "")
    credentials = await enroll(cp.api_target, token, tmp_path / "agent", "agent")
    assert credentials.agent_id
