"""Transport security: mutual TLS on the agent port, API credentials on the
API port, and TLS 1.2+ without deprecated suites, checked from real clients."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.rpc.agent import SESSION_ACCEPTED
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import RunningControlPlane


def our_ca(cp: RunningControlPlane) -> CertificateAuthority:
    directory = DataDir(cp.data_dir)
    return directory.load_ca(directory.master_key())


async def connect_with(
    cp: RunningControlPlane, key_pem: bytes | None, cert_pem: bytes | None
) -> grpc.StatusCode:
    """Open Connect on the agent port and return the status the server refuses
    it with, or OK if the server accepts the agent.

    Like the agent, it sends nothing before the server has accepted the stream:
    a write that crosses the server's refusal makes grpc.aio replace the
    server's status with INTERNAL "Internal error from Core" (grpc/grpc#36066)."""
    credentials = grpc.ssl_channel_credentials(cp.ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    async with grpc.aio.secure_channel(cp.agent_target, credentials) as channel:
        call = agent_pb2_grpc.AgentControlStub(channel).Connect(timeout=10)
        if any(key == SESSION_ACCEPTED for key, _ in await call.initial_metadata()):
            return grpc.StatusCode.OK
        return await call.code()


def agent_certificate(
    ca: CertificateAuthority,
    agent_id: str,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(hours=1),
) -> tuple[bytes, bytes]:
    key_pem, csr_pem = new_key_and_csr()
    identity = AgentIdentity(ca.trust_domain, "default", "default", agent_id)
    return key_pem, ca.issue_agent(csr_pem, identity, lifetime, now=now).certificate_pem


async def test_agent_port_refuses_a_client_without_certificate(cp: RunningControlPlane) -> None:
    assert await connect_with(cp, None, None) == grpc.StatusCode.UNAVAILABLE


async def test_agent_port_refuses_a_certificate_from_another_ca(cp: RunningControlPlane) -> None:
    stranger = CertificateAuthority.create(our_ca(cp).trust_domain)
    assert (
        await connect_with(cp, *agent_certificate(stranger, "a0000000000000001"))
        == grpc.StatusCode.UNAVAILABLE
    )


async def test_agent_port_refuses_an_expired_certificate(cp: RunningControlPlane) -> None:
    issued_long_ago = datetime.now(UTC) - timedelta(hours=2)
    expired = agent_certificate(our_ca(cp), "a0000000000000002", now=issued_long_ago)
    assert await connect_with(cp, *expired) == grpc.StatusCode.UNAVAILABLE


async def test_a_valid_certificate_of_an_unknown_agent_is_denied(cp: RunningControlPlane) -> None:
    forged = agent_certificate(our_ca(cp), "a0000000000000003")
    assert await connect_with(cp, *forged) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "authorization", [None, "Bearer thk_0000000000000000_" + "0" * 64, "Basic abc", "Bearer not-a-key"]
)
async def test_api_calls_without_a_valid_key_are_unauthenticated(
    cp: RunningControlPlane, authorization: str | None
) -> None:
    metadata = (("authorization", authorization),) if authorization else ()
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        for call in (
            stub.List(jobs_pb2.ListJobsRequest(), metadata=metadata),
            stub.Get(jobs_pb2.GetJobRequest(job_id="j1"), metadata=metadata),
            stub.Submit(jobs_pb2.SubmitJobRequest(), metadata=metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        follow = stub.FollowLogs(jobs_pb2.FollowLogsRequest(job_id="j1"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await follow.read()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_agent_port_is_not_open_to_api_keys(cp: RunningControlPlane) -> None:
    """Users' bearer credentials are no way into the agent port."""
    async with grpc.aio.secure_channel(cp.agent_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await agent_pb2_grpc.AgentControlStub(channel).Renew(
                agent_pb2.RenewRequest(), metadata=(("authorization", f"Bearer {cp.admin_key}"),), timeout=10
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def s_client(port: int, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(errors="replace")


def _negotiated(output: str) -> str | None:
    for line in output.splitlines():
        if "Cipher is" in line and "(NONE)" not in line:
            return line.split("Cipher is", 1)[1].strip()
    return None


@pytest.mark.parametrize("port_name", ["api_port", "agent_port"])
async def test_old_protocols_and_cbc_suites_are_refused(cp: RunningControlPlane, port_name: str) -> None:
    port = getattr(cp.daemon, port_name)
    # The client offers them at security level 0, so only the server can be refusing.
    for args in (
        ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
        ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        [
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
            "ECDHE-ECDSA-AES256-SHA384:AES128-SHA:AES256-SHA:@SECLEVEL=0",
        ],
    ):
        _, output = await s_client(port, *args)
        assert _negotiated(output) is None, (args, output)
    # The control: a modern client does get through, with an AEAD suite.
    _, output = await s_client(port, "-tls1_2")
    assert _negotiated(output) in {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    }, output
    _, output = await s_client(port, "-tls1_3")
    assert _negotiated(output) is not None, output


def test_private_keys_never_leave_their_files_in_clear(cp: RunningControlPlane) -> None:
    """The CA, server and audit keys are sealed; only the master key file is secret."""
    data = Path(cp.data_dir)
    sealed = sorted(data.rglob("*.key.sealed"))
    names = [p.relative_to(data).as_posix() for p in sealed]
    assert names[:3] == ["audit.key.sealed", "cas/ca-1.key.sealed", "server.key.sealed"]
    assert len(names) == 4
    assert names[3].startswith("signing/")
    for path in sealed:
        assert b"PRIVATE KEY" not in path.read_bytes()
        assert path.stat().st_mode & 0o077 == 0
    assert (data / "master.key").stat().st_mode & 0o077 == 0
    assert data.stat().st_mode & 0o077 == 0
