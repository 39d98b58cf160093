"""Agent identity over time: renewal under load, revocation, expiry on open
streams, enrollment scoping, server-certificate and CA rotation."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from docker import DockerClient

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.daemon import Agent
from testhide.agent.errors import CredentialsError, EnrollmentError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.docker import DockerRuntime
from testhide.agent.runtime.fake import FakeRuntime
from testhide.common.identity import AgentIdentity
from testhide.common.tls import _peer_chain, fingerprint
from testhide.controlplane.ca import rotation
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.store.base import AgentRecord
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    control_plane,
    enrolled,
    eventually,
    operator,
    running_agent,
    wait_until,
)
from tests.integration.test_transport import agent_certificate, connect_with, our_ca

STOP_GRACE = timedelta(seconds=1)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):
        return False
    return True


async def audit_actions(data_dir: Path) -> list[dict[str, object]]:
    code, out, err = await operator("audit", "export", "--data-dir", str(data_dir))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(300)
async def test_renewal_under_load_loses_duplicates_and_reorders_nothing(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=12)) as cp:
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        async with running_agent(cp, tmp_path, DockerRuntime(docker_client), stop_grace=STOP_GRACE) as agent:
            first_serial = agent.credentials.certificate.serial_number
            script = 'i=0; while [ $i -lt 450 ]; do echo "line $i"; i=$((i+1)); sleep 0.1; done'
            result = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", script, within=240)
            assert agent.credentials.certificate.serial_number != first_serial
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == "".join(f"line {i}\n" for i in range(450))
        renewals = [e for e in await audit_actions(cp.data_dir) if e["action"] == "agent_certificate_renewed"]
        assert len(renewals) >= 3


@pytest.mark.docker
async def test_revocation_cuts_off_an_agent_mid_job(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path, docker_client: DockerClient
) -> None:
    data_dir = tmp_path / "agent"
    await enroll(cp.api_target, await cp.enrollment_token(), data_dir, "doomed")
    agent = Agent(AgentConfig(data_dir=data_dir, stop_grace=STOP_GRACE), DockerRuntime(docker_client))
    running = asyncio.create_task(agent.run())
    assert cp.daemon.scheduler is not None
    await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent.agent_id), 30)
    job_id = (
        (await cli("run", "-d", "--image", JOB_IMAGE, "--", "sh", "-c", "echo started; exec sleep 3600"))
        .stdout.decode()
        .strip()
    )
    follower = await cli.start("logs", "--follow", job_id)
    assert follower.stdout is not None
    assert await asyncio.wait_for(follower.stdout.readline(), 30) == b"started\n"

    code, _, err = await operator("agents", "revoke", "--data-dir", str(cp.data_dir), agent.agent_id)
    assert code == 0, err
    revoked_at = asyncio.get_running_loop().time()
    with pytest.raises(CredentialsError, match="revoked"):
        await asyncio.wait_for(running, 15)
    assert asyncio.get_running_loop().time() - revoked_at < 5  # the stream was closed within seconds

    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert shown["status"] == "ERROR"
    assert "revoked" in shown["status_reason"]
    await asyncio.wait_for(follower.wait(), 30)
    assert docker_client.containers.list(all=True, filters={"label": f"dev.testhide.job={job_id}"}) == []

    credentials = Credentials.load(data_dir)
    assert (
        await connect_with(cp, credentials.key_pem, credentials.certificate_pem)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    channel_credentials = grpc.ssl_channel_credentials(
        cp.ca_pem, credentials.key_pem, credentials.certificate_pem
    )
    async with grpc.aio.secure_channel(cp.agent_target, channel_credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await agent_pb2_grpc.AgentControlStub(channel).Renew(
                agent_pb2.RenewRequest(csr_pem=b"x"), timeout=10
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _, listed, _ = await operator("agents", "list", "--json", "--data-dir", str(cp.data_dir))
    assert [a["state"] for a in json.loads(listed) if a["id"] == agent.agent_id] == ["revoked"]
    assert "agent_revoked" in [e["action"] for e in await audit_actions(cp.data_dir)]


async def stream_until_expiry(
    cp: RunningControlPlane, agent_id: str
) -> tuple[x509.Certificate, grpc.aio.AioRpcError]:
    """An agent with a 3-second certificate opens its stream and reads until the
    control plane ends it: its certificate and the error the stream ended with."""
    key_pem, cert_pem = agent_certificate(our_ca(cp), agent_id, lifetime=timedelta(seconds=3))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cp.daemon._store is not None
    await cp.daemon._store.create_agent(
        AgentRecord(agent_id, "default", "default", "short", "x", cert.not_valid_after_utc, datetime.now(UTC))
    )
    credentials = grpc.ssl_channel_credentials(cp.ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    async with grpc.aio.secure_channel(cp.agent_target, credentials) as channel:
        call = agent_pb2_grpc.AgentControlStub(channel).Connect()
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=1)))

        async def read_until_refused() -> None:
            while True:
                await asyncio.wait_for(call.read(), 30)

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await read_until_refused()
    return cert, error.value


async def test_an_open_stream_ends_when_its_certificate_expires(cp: RunningControlPlane) -> None:
    cert, error = await stream_until_expiry(cp, "a00000000000000e1")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (error.details() or "")
    assert datetime.now(UTC) >= cert.not_valid_after_utc


async def test_an_agent_offline_past_expiry_is_told_to_enroll_again(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    data_dir = tmp_path / "agent"
    credentials = await enroll(cp.api_target, await cp.enrollment_token(), data_dir, "sleeper")
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    _, expired_pem = agent_certificate(our_ca(cp), credentials.agent_id, now=two_hours_ago)
    Credentials(
        credentials.agent_id,
        credentials.api_endpoints,
        credentials.agent_endpoints,
        credentials.key_pem,
        expired_pem,
        credentials.ca_pem,
        received_at=two_hours_ago,
    ).save(data_dir)
    agent = Agent(AgentConfig(data_dir=data_dir), FakeRuntime())
    with pytest.raises(CredentialsError, match=r"expired .* enroll this agent again"):
        await asyncio.wait_for(agent.run(), 30)


async def test_enrollment_tokens_are_scoped_and_revocable(cp: RunningControlPlane, tmp_path: Path) -> None:
    store = cp.daemon._store
    assert store is not None
    await store.create_org("acme", datetime.now(UTC))
    await store.create_pool("acme", "gpu", datetime.now(UTC))
    acme = await enroll(cp.api_target, await cp.enrollment_token("acme", "gpu"), tmp_path / "acme", "acme-1")
    identity = AgentIdentity.from_certificate(acme.certificate)
    assert (identity.org, identity.pool) == ("acme", "gpu")

    token = await cp.enrollment_token()
    token_id = token.split(".")[1]
    code, _, err = await operator("enroll-token", "revoke", "--data-dir", str(cp.data_dir), token_id)
    assert code == 0, err
    with pytest.raises(EnrollmentError, match="revoked"):
        await enroll(cp.api_target, token, tmp_path / "late", "late")
    _, listed, _ = await operator("enroll-token", "list", "--json", "--data-dir", str(cp.data_dir))
    states = {t["id"]: t["state"] for t in json.loads(listed)}
    assert states[token_id] == "revoked"
    refused = [e for e in await audit_actions(cp.data_dir) if e["action"] == "enrollment_token_refused"]
    assert [e["target"] for e in refused] == [token_id]


async def test_a_pool_can_shorten_certificate_lifetimes(cp: RunningControlPlane, tmp_path: Path) -> None:
    code, _, err = await operator(
        "pools", "create", "--data-dir", str(cp.data_dir), "short-lived", "--agent-cert-ttl", "2m"
    )
    assert code == 0, err
    credentials = await enroll(
        cp.api_target, await cp.enrollment_token("default", "short-lived"), tmp_path / "agent", "brief"
    )
    cert = credentials.certificate
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(minutes=2, seconds=30)  # 2 minutes plus the 30 s backdate


@pytest.mark.docker
async def test_server_certificate_rotation_reaches_new_connections_only(
    cp: RunningControlPlane, cli: Cli, docker_agent: Agent
) -> None:
    certificates, scheduler = cp.daemon.certificates, cp.daemon.scheduler
    assert certificates is not None
    assert scheduler is not None
    old_serial = certificates.current.server_certificate.serial_number
    session = scheduler.session_of(docker_agent.agent_id)
    code, _, err = await operator("server-cert", "rotate", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    new_serial = x509.load_pem_x509_certificate((cp.data_dir / "server.pem").read_bytes()).serial_number
    assert new_serial != old_serial

    async def new_certificate_served() -> bool:
        der = (await asyncio.to_thread(_peer_chain, "127.0.0.1", cp.daemon.api_port, 10))[0]
        return x509.load_der_x509_certificate(der).serial_number == new_serial

    # The watcher applies it within a second.
    await eventually(new_certificate_served, 60, "the new server certificate to be served")
    result = await cli("run", "--image", JOB_IMAGE, "--", "echo", "still here")
    assert result.stdout == b"still here\n"
    assert scheduler.session_of(docker_agent.agent_id) is session  # the open stream carried on


async def test_a_ca_retired_under_an_open_connection_refuses_its_certificates_next_call(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    """The handshake is not enough: a connection the retired CA's certificate opened stays open,
    and every call on it is checked against the CAs trusted now."""
    credentials = Credentials.load(await enrolled(cp, tmp_path))
    directory = DataDir(cp.data_dir)
    certificates = cp.daemon.certificates
    assert certificates is not None
    channel_credentials = grpc.ssl_channel_credentials(
        cp.ca_pem, private_key=credentials.key_pem, certificate_chain=credentials.certificate_pem
    )
    async with grpc.aio.secure_channel(cp.agent_target, channel_credentials) as channel:
        agent = agent_pb2_grpc.AgentControlStub(channel)
        renewed = await agent.Renew(agent_pb2.RenewRequest(csr_pem=new_key_and_csr()[1]), timeout=10)
        assert renewed.certificate_pem

        rotation.prepare(directory, directory.master_key())
        new_ca = directory.ca_certificate(rotation.activate(directory, directory.master_key()))
        assert rotation.retire(directory)
        await eventually(
            lambda: certificates.current.trusted == (new_ca,), 30, "the old CA to leave the trusted set"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.Renew(agent_pb2.RenewRequest(csr_pem=new_key_and_csr()[1]), timeout=10)
        # UNAUTHENTICATED, not UNAVAILABLE: the call went over the connection opened before the
        # retirement (a new handshake with this certificate fails).
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        assert "no longer trusted" in (refused.value.details() or "")
        stream = agent.Connect(timeout=10)
        assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not certificates.trust_only_grew


@pytest.mark.docker
@pytest.mark.timeout(180)
async def test_ca_rotation_with_a_connected_agent_and_a_running_job(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=10)) as cp:
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        directory = DataDir(cp.data_dir)
        old_ca = our_ca(cp)
        async with running_agent(cp, tmp_path, DockerRuntime(docker_client), stop_grace=STOP_GRACE) as agent:
            script = 'i=0; while [ $i -lt 300 ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done'
            job = asyncio.create_task(cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", script, within=150))

            rotation.prepare(directory, directory.master_key())
            await wait_until(
                agent.credentials_changed,
                lambda: agent.credentials.ca_pem.count(b"BEGIN CERTIFICATE") == 2,
                30,
            )
            new_generation = rotation.activate(directory, directory.master_key())
            new_ca = directory.ca_certificate(new_generation)
            await wait_until(
                agent.credentials_changed, lambda: issued_by(agent.credentials.certificate, new_ca), 60
            )
            code, _, err = await operator("ca", "rotate", "retire", "--data-dir", str(cp.data_dir))
            assert code == 0, err
            result = await job
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == "".join(f"tick {i}\n" for i in range(300))

        certificates = cp.daemon.certificates
        assert certificates is not None
        await eventually(
            lambda: old_ca.certificate_pem not in certificates.current.bundle_pem,
            60,
            "the old CA to leave the trust bundle",
        )
        old_key, old_cert = agent_certificate(old_ca, agent.agent_id)
        assert await connect_with(cp, old_key, old_cert) == grpc.StatusCode.UNAVAILABLE
        assert (
            fingerprint(new_ca.public_bytes(serialization.Encoding.DER))
            in certificates.current.trusted_fingerprints
        )
