"""Rate limits, failed-login spikes and lockouts hold across replicas: the
requests through one replica, the effect on the other. Two replicas are two
``ControlPlane`` daemons on one data dir and one PostgreSQL database, each on
its own ports; every call is a real gRPC call over TLS.

With each replica counting for itself, a client would get a budget per
replica and a spike split over them would go unseen (or be alerted by each);
these fail then."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import grpc

from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import RunningControlPlane, control_plane, serving
from tests.integration.test_abuse import (
    EXHAUSTED,
    PASSWORD,
    UNAUTH,
    add_user,
    api,
    login,
    password,
    retry_after,
)


@asynccontextmanager
async def replicas(
    tmp_path: Path, pg_url: str, **config: object
) -> AsyncIterator[tuple[RunningControlPlane, RunningControlPlane]]:
    async with (
        control_plane(tmp_path, database_url=pg_url, **config) as a,
        serving(a.data_dir, a.admin_key, **config) as b,
    ):
        yield a, b


async def spike_alerts(cp: RunningControlPlane) -> list[str]:
    """The targets of the ``auth_failure_spike`` events in the (shared) audit log."""
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [e.event.target for e in entries if e.event.action == "auth_failure_spike"]


async def test_a_principals_budget_spent_through_one_replica_is_spent_on_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    # One request every two seconds for a credential, one at once: spent in a moment through A.
    async with replicas(tmp_path, pg_url, rate_per_principal=0.5) as (a, b):
        bearer = await a.bearer()
        async with api(a) as on_a, api(b) as on_b:
            await signing_keys(on_b)  # B's channel is up (a public call: no credential's budget)

            async def jobs(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError | None:
                try:
                    await jobs_pb2_grpc.JobsStub(channel).List(
                        jobs_pb2.ListJobsRequest(), metadata=bearer, timeout=30
                    )
                except grpc.aio.AioRpcError as error:
                    return error
                return None

            served = 0
            while (refused := await jobs(on_a)) is None:
                served += 1
            assert 1 <= served <= 2, served  # the burst of one, and one refilled meanwhile at most
            assert refused.code() == EXHAUSTED

            on_the_other = await jobs(on_b)  # at once, through B
            assert on_the_other is not None
            assert on_the_other.code() == EXHAUSTED
            assert "too many requests for this credential" in (on_the_other.details() or "")
            assert retry_after(on_the_other) in ("1", "2")

            await asyncio.sleep(int(retry_after(on_the_other)))  # refilled for both
            assert await jobs(on_b) is None


async def signing_keys(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError | None:
    try:
        await auth_pb2_grpc.AuthStub(channel).GetSigningKeys(auth_pb2.GetSigningKeysRequest(), timeout=30)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def test_an_address_budget_spent_through_one_replica_is_spent_on_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    # One request every two seconds from an address, one at once.
    async with replicas(tmp_path, pg_url, rate_per_address=0.5) as (a, b), api(a) as on_a, api(b) as on_b:
        served = 0
        while await signing_keys(on_a) is None:
            served += 1
        assert 1 <= served <= 2, served
        refused = await signing_keys(on_b)  # at once, through B
        assert refused is not None
        assert refused.code() == EXHAUSTED
        assert "too many requests from this address" in (refused.details() or "")


async def test_failed_logins_split_over_both_replicas_raise_one_spike_alert(
    tmp_path: Path, pg_url: str
) -> None:
    # The account lockout would refuse the later guesses before they count: out of the way here.
    config: dict[str, object] = {"failure_spike_threshold": 4, "lockout": LockoutPolicy(failures=100)}
    async with replicas(tmp_path, pg_url, **config) as (a, b):
        # Eight malformed API keys from one address, in turns: four through each replica.
        # Counted per replica, each would alert (four each); counted together, the fourth
        # alerts (the address and the account "api_key:malformed" at once: one event) and
        # the next four, within the same window, do not.
        for i in range(8):
            error = await login((a, b)[i % 2], auth_pb2.LoginRequest(api_key=f"not-a-key-{i}"))
            assert error is not None
            assert (error.code(), error.details()) == (UNAUTH, "invalid credentials")
        assert await spike_alerts(b) == ["api_key:malformed"]


async def test_a_lockout_earned_through_one_replica_holds_on_the_other(tmp_path: Path, pg_url: str) -> None:
    lockout = LockoutPolicy(failures=5, first_delay=timedelta(seconds=3))
    async with replicas(tmp_path, pg_url, lockout=lockout) as (a, b):
        await add_user(a, "grace")
        for _ in range(5):
            error = await login(a, password("grace", "wrong-guess"))
            assert error is not None
            assert error.code() == UNAUTH
        locked = await login(b, password("grace", PASSWORD))  # the right password, through B
        assert locked is not None
        assert locked.code() == EXHAUSTED
        assert "too many failed attempts" in (locked.details() or "")
        assert retry_after(locked) in ("1", "2", "3")
        await asyncio.sleep(int(retry_after(locked)))  # the backoff passes for both
        assert await login(b, password("grace", PASSWORD)) is None
