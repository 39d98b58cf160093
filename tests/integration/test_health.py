"""Health checks and reflection, as a load balancer and grpcurl see them.

- Each port answers health checks (the API port without credentials) for "" and for
  every service it serves, found in the protos so that a service added later is
  covered; a service of the other port, or an unknown one, is NOT_FOUND.
- On PostgreSQL, stopping the database turns every name of both ports NOT_SERVING,
  and starting it again SERVING: awaited on Watch streams, as a balancer does. Each
  change is logged once.
- The API port answers gRPC reflection without credentials (the schema is public),
  within the per-address rate limit like every call; it lists the services and
  describes their methods, as grpcurl does. The agent port (internal) does not.
- The probe on a fake store: a store that does not answer counts as unavailable,
  a failure that is not an outage too (with its traceback, once), and from a
  shutdown on every name stays NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection_pb2  # type: ignore[import-untyped]  # ships no type hints
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # type: ignore[import-untyped]
    ProtoReflectionDescriptorDatabase,
)
from structlog.testing import capture_logs

import testhide.protos.v1 as protos
from testhide.agent.credentials import Credentials
from testhide.common.tls import secure_channel
from testhide.controlplane.errors import StorageUnavailable
from testhide.controlplane.rpc.health import StoreHealth
from tests.harness import RunningControlPlane, control_plane, enrolled
from tests.pg import private_cluster

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT_SERVICES = ("testhide.v1.AgentControl",)
REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def declared_services() -> list[str]:
    """Every service of the contract (testhide.protos.v1)."""
    names = []
    for module in pkgutil.iter_modules(protos.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"{protos.__name__}.{module.name}").DESCRIPTOR
            names += [service.full_name for service in descriptor.services_by_name.values()]
    return names


API_SERVICES = tuple(name for name in declared_services() if name not in AGENT_SERVICES)


def api_channel(cp: RunningControlPlane) -> grpc.aio.Channel:
    """No credentials: what a load balancer or grpcurl has."""
    return secure_channel(cp.api_target, cp.ca_pem)


async def agent_channel(cp: RunningControlPlane, tmp_path: Path) -> grpc.aio.Channel:
    """Mutual TLS with an enrolled agent's certificate: the agent port asks for nothing less."""
    credentials = Credentials.load(await enrolled(cp, tmp_path))
    return secure_channel(
        cp.agent_target,
        credentials.ca_pem,
        client_key_pem=credentials.key_pem,
        client_cert_pem=credentials.certificate_pem,
    )


async def status(channel: grpc.aio.Channel, service: str) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return response.status


async def not_found(channel: grpc.aio.Channel, service: str) -> bool:
    try:
        await status(channel, service)
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


Watch = grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]


def watch(channel: grpc.aio.Channel, service: str) -> Watch:
    watch_rpc = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch_rpc(health_pb2.HealthCheckRequest(service=service))


async def next_statuses(watches: list[Watch]) -> list[int]:
    """The next status each Watch stream sends (a stream sends only changes)."""
    responses = await asyncio.wait_for(asyncio.gather(*(w.read() for w in watches)), 60)
    statuses = []
    for response in responses:
        assert isinstance(response, health_pb2.HealthCheckResponse), "a Watch stream ended"
        statuses.append(response.status)
    return statuses


async def reflection_call(channel: grpc.aio.Channel, request: Any) -> Any:
    info = channel.stream_stream(
        REFLECTION_INFO,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    # The request goes as an iterator, written by gRPC itself: the server may end the call
    # before the request is written, and a write of our own then fails with a core error of
    # the client's (INTERNAL, now and then) instead of what the server said.
    call = info(iter([request]), timeout=30)
    try:
        response = await call.read()
    except grpc.aio.AioRpcError as error:
        raise Refused(error.code()) from None
    if response is grpc.aio.EOF:
        raise Refused(await call.code())
    assert response is not grpc.aio.EOF
    return response


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code)
        self.code = code


async def test_every_service_of_each_port_answers_serving(cp: RunningControlPlane, tmp_path: Path) -> None:
    assert {"testhide.v1.Jobs", "testhide.v1.Secrets", "testhide.v1.Enrollment", "testhide.v1.Auth"} <= set(
        API_SERVICES
    )
    async with api_channel(cp) as api, await agent_channel(cp, tmp_path) as agent:
        for name in ("", *API_SERVICES):
            assert await status(api, name) == SERVING, name
        for name in ("", *AGENT_SERVICES):
            assert await status(agent, name) == SERVING, name
        # Each port answers for what it serves, and for nothing else.
        assert await not_found(api, "testhide.v1.AgentControl")
        assert await not_found(agent, "testhide.v1.Jobs")
        assert await not_found(api, "testhide.v1.NoSuchService")


async def test_stopping_postgres_turns_every_name_not_serving_and_starting_it_serving(
    tmp_path: Path,
) -> None:
    async with (
        private_cluster() as pg,
        control_plane(tmp_path, database_url=pg.url) as cp,
        api_channel(cp) as api,
        await agent_channel(cp, tmp_path) as agent,
    ):
        watches = [watch(api, name) for name in ("", *API_SERVICES)]
        watches += [watch(agent, name) for name in ("", *AGENT_SERVICES)]
        assert await next_statuses(watches) == [SERVING] * len(watches)
        with capture_logs() as events:
            await pg.pause()
            assert await next_statuses(watches) == [NOT_SERVING] * len(watches)
            assert await status(api, "testhide.v1.Jobs") == NOT_SERVING  # a new check, too
            await pg.start()
            assert await next_statuses(watches) == [SERVING] * len(watches)
        for call in watches:
            call.cancel()
    changes = [e["event"] for e in events if e["event"] in ("store_unavailable", "store_available")]
    assert changes == ["store_unavailable", "store_available"], changes
    assert "database is unavailable" in next(e for e in events if e["event"] == "store_unavailable")["reason"]


async def test_reflection_lists_and_describes_the_api_without_credentials(cp: RunningControlPlane) -> None:
    def as_grpcurl_does() -> tuple[set[str], set[str]]:
        # grpcurl's sequence: list the services, then the file descriptors of one, by symbol.
        with grpc.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            jobs = DescriptorPool(database).FindServiceByName("testhide.v1.Jobs")
            return services, {method.name for method in jobs.methods}

    services, methods = await asyncio.to_thread(as_grpcurl_does)
    assert services == {
        *API_SERVICES,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert {"Submit", "Get", "List", "Cancel", "FollowLogs"} <= methods


async def test_the_agent_port_does_not_answer_reflection(cp: RunningControlPlane, tmp_path: Path) -> None:
    async with await agent_channel(cp, tmp_path) as agent:
        with pytest.raises(Refused) as refused:
            await reflection_call(agent, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_is_within_the_per_address_rate_limit(tmp_path: Path) -> None:
    async with control_plane(tmp_path, rate_per_address=0.5) as cp, api_channel(cp) as api:  # a burst of 1
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = await reflection_call(api, request)
        with pytest.raises(Refused) as refused:
            await reflection_call(api, request)
    assert "testhide.v1.Jobs" in {s.name for s in answer.list_services_response.service}
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# The probe on a fake store -------------------------------------------------------------------------


class FakeStore:
    """Answers, fails with ``failure``, or with ``hang`` never answers."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.hang = False

    async def list_orgs(self) -> list[str]:
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return ["default"]


@asynccontextmanager
async def probed(store: FakeStore) -> AsyncIterator[tuple[StoreHealth, health_aio.HealthServicer]]:
    health = StoreHealth(store, interval=timedelta(seconds=1), timeout=timedelta(milliseconds=50))
    servicer = await health.servicer(["testhide.v1.Jobs"])
    yield health, servicer


async def statuses_of(servicer: health_aio.HealthServicer) -> set[int]:
    context = cast(Any, None)  # used only to refuse an unknown name
    return {
        (await servicer.Check(health_pb2.HealthCheckRequest(service=name), context)).status
        for name in ("", "testhide.v1.Jobs")
    }


async def test_every_name_is_not_serving_until_the_first_probe_answers() -> None:
    async with probed(FakeStore()) as (health, servicer):
        assert await statuses_of(servicer) == {NOT_SERVING}
        assert await health.probe()
        assert await statuses_of(servicer) == {SERVING}


async def test_an_outage_is_logged_once_and_its_end_once() -> None:
    store = FakeStore()
    async with probed(store) as (health, servicer):
        await health.probe()
        with capture_logs() as events:
            store.failure = StorageUnavailable("the control plane's database is unavailable (refused)")
            for _ in range(3):
                assert not await health.probe()
            assert await statuses_of(servicer) == {NOT_SERVING}
            store.failure = None
            for _ in range(3):
                assert await health.probe()
            assert await statuses_of(servicer) == {SERVING}
    assert [e["event"] for e in events] == ["store_unavailable", "store_available"]
    assert events[0]["reason"] == "the control plane's database is unavailable (refused)"


async def test_a_store_that_does_not_answer_is_not_serving() -> None:
    store = FakeStore()
    async with probed(store) as (health, servicer):
        await health.probe()
        store.hang = True
        with capture_logs() as events:
            assert not await health.probe()
        assert await statuses_of(servicer) == {NOT_SERVING}
    assert events[0]["reason"] == "the store did not answer within 0.05 s"


async def test_an_unexpected_failure_is_not_serving_with_its_traceback_once() -> None:
    store = FakeStore()
    async with probed(store) as (health, servicer):
        await health.probe()
        store.failure = RuntimeError("file is not a database")
        with capture_logs() as events:
            assert not await health.probe()
            assert not await health.probe()
        assert await statuses_of(servicer) == {NOT_SERVING}
    assert [e["event"] for e in events] == ["store_probe_failed", "store_unavailable"]
    assert isinstance(events[0]["exc_info"], RuntimeError)


async def test_from_a_shutdown_on_every_name_stays_not_serving() -> None:
    async with probed(FakeStore()) as (health, servicer):
        await health.probe()
        await health.shutting_down()
        assert await statuses_of(servicer) == {NOT_SERVING}
        await health.probe()  # the store still answers: a stopping daemon takes no new work all the same
        assert await statuses_of(servicer) == {NOT_SERVING}
