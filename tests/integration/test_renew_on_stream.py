"""Renewal on the open Connect stream (AgentMessage.renew): the same certificate the
Renew RPC gives, the same refusals, and an agent that uses the RPC where the control
plane does not announce it."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.rpc import session as agent_session
from testhide.agent.runtime.fake import FakeRuntime
from testhide.common.identity import AgentIdentity
from testhide.controlplane.rpc import agent as agent_rpc
from testhide.controlplane.rpc.agent import AgentControlServicer
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import (
    RunningControlPlane,
    control_plane,
    enrolled,
    eventually,
    running_agent,
    wait_until,
)
from tests.integration.test_identity import audit_actions, issued_by
from tests.integration.test_transport import our_ca

AgentStream = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage]


@asynccontextmanager
async def stream_of(cp: RunningControlPlane, credentials: Credentials) -> AsyncIterator[AgentStream]:
    """The agent's Connect stream, accepted, its hello sent (no batches: one answer a message)."""
    channel_credentials = grpc.ssl_channel_credentials(
        cp.ca_pem, private_key=credentials.key_pem, certificate_chain=credentials.certificate_pem
    )
    async with grpc.aio.secure_channel(cp.agent_target, channel_credentials) as channel:
        call = agent_pb2_grpc.AgentControlStub(channel).Connect(timeout=60)
        metadata = dict(await call.initial_metadata())
        assert metadata.get(agent_rpc.SESSION_ACCEPTED) == "1", await call.details()
        assert metadata.get(agent_rpc.RENEWS) == "1"
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=1)))
        yield call


async def answer(call: AgentStream) -> agent_pb2.ControlMessage:
    """The next answer to a renewal (what else comes, the trust bundle, is passed over)."""
    while True:
        message = await call.read()
        assert isinstance(message, agent_pb2.ControlMessage), message
        if message.WhichOneof("body") in ("renewed", "renew_refused"):
            return message


async def outcome(call: AgentStream) -> tuple[str, str]:
    """The renewal's answer as (status code name, message), or how the stream ended."""
    try:
        message = await answer(call)
    except grpc.aio.AioRpcError as ended:
        return ended.code().name, ended.details() or ""
    if message.HasField("renewed"):
        return "OK", "renewed"
    return message.renew_refused.code, message.renew_refused.message


def renew(csr_pem: bytes) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(renew=agent_pb2.RenewRequest(csr_pem=csr_pem))


async def renewals_audited(cp: RunningControlPlane) -> int:
    return sum(1 for e in await audit_actions(cp.data_dir) if e["action"] == "agent_certificate_renewed")


async def test_a_renewal_on_the_open_stream_gives_the_same_identity_a_new_key(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    credentials = Credentials.load(await enrolled(cp, tmp_path))
    key_pem, csr_pem = new_key_and_csr()
    with capture_logs() as events:
        async with stream_of(cp, credentials) as call:
            await call.write(renew(csr_pem))
            renewed = (await answer(call)).renewed
            # The stream carries on: its heartbeat is taken as before.
            await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
    certificate = x509.load_pem_x509_certificate(renewed.certificate_pem)
    assert issued_by(certificate, our_ca(cp).certificate)
    assert AgentIdentity.from_certificate(certificate) == AgentIdentity.from_certificate(
        credentials.certificate
    )
    new_key = serialization.load_pem_private_key(key_pem, None)
    assert certificate.public_key() == new_key.public_key()
    assert certificate.serial_number != credentials.certificate.serial_number
    assert renewed.ca_bundle_pem == cp.ca_pem
    logged = [e for e in events if e["event"] == "agent_certificate_renewed"]
    assert [(e["via"], e["agent_id"]) for e in logged] == [("stream", credentials.agent_id)]
    assert await renewals_audited(cp) == 1
    # The new certificate opens the next stream.
    async with stream_of(cp, credentials.with_certificate(key_pem, renewed.certificate_pem, None)):
        pass


async def test_a_refused_renewal_says_why_on_the_stream_and_issues_nothing(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    credentials = Credentials.load(await enrolled(cp, tmp_path))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    async with stream_of(cp, credentials) as call:
        for csr, why in ((b"x", "not a PEM certificate signing request"), (rsa_csr, "ECDSA P-256")):
            await call.write(renew(csr))
            refused = (await answer(call)).renew_refused
            assert (refused.code, why in refused.message) == ("INVALID_ARGUMENT", True), refused
        # One at a time: the second of two asked together is refused while the first is under way.
        await call.write(
            agent_pb2.AgentMessage(
                batch=agent_pb2.AgentBatch(
                    messages=[renew(new_key_and_csr()[1]), renew(new_key_and_csr()[1])]
                )
            )
        )
        answers = [await answer(call), await answer(call)]
        kinds = sorted(str(a.WhichOneof("body")) for a in answers)
        assert kinds == ["renew_refused", "renewed"]
        busy = next(a.renew_refused for a in answers if a.HasField("renew_refused"))
        assert busy.code == "RESOURCE_EXHAUSTED"
        assert "under way" in busy.message
    assert await renewals_audited(cp) == 1


async def test_a_revoked_agent_gets_no_certificate_on_its_open_stream(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    """Revoked in the store (as by another replica) while its stream is open: the renewal's
    transaction refuses it, or the stream is ended first; no certificate either way."""
    credentials = Credentials.load(await enrolled(cp, tmp_path))
    store = cp.daemon._store
    assert store is not None
    async with stream_of(cp, credentials) as call:
        await store.revoke_agent(credentials.agent_id, datetime.now(UTC))
        await call.write(renew(new_key_and_csr()[1]))
        assert await outcome(call) == ("PERMISSION_DENIED", "this agent has been revoked")
    assert await renewals_audited(cp) == 0


@pytest.mark.parametrize("announced", [True, False], ids=["stream", "older-control-plane"])
async def test_an_agent_renews_on_its_stream_where_the_control_plane_answers_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, announced: bool
) -> None:
    if not announced:  # a control plane from before AgentMessage.renew announces nothing
        monkeypatch.setattr(agent_rpc, "RENEWS", "x-testhide-unknown")
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=10)) as cp:
        with capture_logs() as events:
            async with running_agent(cp, tmp_path, FakeRuntime()) as agent:
                first = agent.credentials.certificate.serial_number
                await wait_until(
                    agent.credentials_changed,
                    lambda: agent.credentials.certificate.serial_number != first,
                    30,
                )
    logged = [e for e in events if e["event"] == "agent_certificate_renewed" and "via" in e]
    assert logged[0]["via"] == ("stream" if announced else "rpc")
    assert logged[0]["agent_id"] == agent.agent_id


async def test_a_renewal_left_unanswered_on_the_stream_ends_the_session_and_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an RPC past its deadline: the agent gives up on the answer, ends the session,
    reconnects and asks again on the new stream, keeping its certificate meanwhile."""
    asked: list[str] = []
    monkeypatch.setattr(
        AgentControlServicer,
        "_renew_on_stream",
        lambda self, session, csr_pem, peer: asked.append(session.identity.agent_id),
    )
    monkeypatch.setattr(agent_session, "RENEW_TIMEOUT_S", 1)
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=10)) as cp:
        with capture_logs() as events:
            async with running_agent(cp, tmp_path, FakeRuntime()) as agent:
                first = agent.credentials.certificate.serial_number

                def failures() -> list[MutableMapping[str, Any]]:
                    return [e for e in events if e["event"] == "agent_certificate_renewal_failed"]

                failed = await eventually(failures, 30, "the renewal to be given up")
                assert failed[0]["code"] == "DEADLINE_EXCEEDED"
                await eventually(lambda: len(asked) >= 2, 30, "the renewal asked again on a new stream")
                assert set(asked) == {agent.agent_id}
                assert agent.credentials.certificate.serial_number == first
