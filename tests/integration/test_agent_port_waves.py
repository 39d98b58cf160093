"""A wave of calls on the agent port (a fleet renewing or reconnecting together)
is answered whole. grpc.aio takes calls from gRPC core one at a time, from its
event loop, and core refuses calls once more than 1,000 wait to be taken (all
of them past 3,000) and drops those that waited 30 s: the agent sees CANCELLED,
the control plane's handlers see nothing. The agent port lets a fleet's worth
of calls wait, for as long as their deadlines allow. Real control plane, real
mutual TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import UTC, datetime

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testhide.controlplane.store.base import AgentRecord
from tests.harness import RunningControlPlane
from tests.integration.test_transport import agent_certificate, our_ca

WAVE = 4000
"""Past core's default hard limit of 3,000 calls waiting: refused without the fix (~1,400 here)."""


async def agent_credentials(cp: RunningControlPlane) -> grpc.ChannelCredentials:
    """Channel credentials of an enrolled agent."""
    agent_id = "a00000000000000a1"
    key_pem, cert_pem = agent_certificate(our_ca(cp), agent_id)
    not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    assert cp.daemon._store is not None
    await cp.daemon._store.create_agent(
        AgentRecord(agent_id, "default", "default", "wave", "x", not_after, datetime.now(UTC))
    )
    return grpc.ssl_channel_credentials(cp.ca_pem, private_key=key_pem, certificate_chain=cert_pem)


async def test_a_wave_of_calls_on_open_connections_is_answered_whole(cp: RunningControlPlane) -> None:
    credentials = await agent_credentials(cp)
    async with grpc.aio.secure_channel(cp.agent_target, credentials) as channel:
        # types-grpcio-health-checking declares HealthStub without its methods.
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # type: ignore[attr-defined]

        async def check() -> grpc.StatusCode:
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=60)  # type: ignore[attr-defined]
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = collections.Counter(await asyncio.gather(*(check() for _ in range(WAVE))))
    assert codes == {grpc.StatusCode.OK: WAVE}


@pytest.mark.slow
async def test_calls_that_wait_longer_than_30_s_to_be_taken_are_answered(cp: RunningControlPlane) -> None:
    """The control plane's event loop held for 31 s (a wave it takes that long to
    work through): calls that arrived meanwhile are answered once it gets to them.
    A blocking client (its own threads), as the held event loop cannot run one."""
    credentials = await agent_credentials(cp)
    with grpc.secure_channel(cp.agent_target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await asyncio.to_thread(health.Check, health_pb2.HealthCheckRequest(), timeout=30)  # type: ignore[attr-defined]
        # The first is taken at once (grpc.aio always has a request out); the others wait.
        calls = [health.Check.future(health_pb2.HealthCheckRequest(), timeout=90) for _ in range(3)]  # type: ignore[attr-defined]
        time.sleep(31)  # noqa: ASYNC251  # holds the event loop on purpose, as a long wave of work does
        codes = [await asyncio.to_thread(call.code) for call in calls]
    assert codes == [grpc.StatusCode.OK] * 3
