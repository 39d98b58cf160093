"""Hostile input to every RPC of both ports (issue 12, points 7 to 10): undecodable
requests, numbers that overflow, unbounded labels, and inputs the size of a megabyte
that must never be echoed back. Where the fix is a general rule, the test runs it over
every RPC found in the service descriptors (tests/rpc_catalog.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2

from testhide.agent.credentials import Credentials
from testhide.common.tls import secure_channel
from testhide.controlplane.errors import NotFound
from testhide.controlplane.rpc.auth import AUTHENTICATED_ONLY, PUBLIC, SCOPE_OF_METHOD
from testhide.controlplane.rpc.guard import DECODE_FAILED, guarded
from testhide.protos.v1 import agent_pb2, jobs_pb2, jobs_pb2_grpc
from tests.harness import RunningControlPlane, control_plane, enrolled
from tests.rpc_catalog import (
    AGENT,
    API,
    CORRUPTIONS,
    INVALID_UTF8,
    MAX_DETAILS_BYTES,
    RPCS,
    Outcome,
    Rpc,
    call_raw,
    encode_field,
    string_field_path,
    with_string,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1 << 20


@dataclass
class Callers:
    cp: RunningControlPlane
    api: grpc.aio.Channel
    agent: grpc.aio.Channel
    bearer: tuple[tuple[str, str], ...]
    job_id: str
    """A queued job of the caller's organisation."""

    async def send(
        self, rpc: Rpc, messages: list[bytes], anonymous: bool = False, read_all: bool = False
    ) -> Outcome:
        if rpc.port == AGENT:
            return await call_raw(self.agent, rpc, messages, read_all=read_all)
        return await call_raw(self.api, rpc, messages, () if anonymous else self.bearer, read_all=read_all)

    async def submit(self, spec: jobs_pb2.JobSpec) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await jobs_pb2_grpc.JobsStub(self.api).Submit(
                jobs_pb2.SubmitJobRequest(spec=spec), metadata=self.bearer, timeout=30
            )
        return error.value


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def callers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Callers]:
    """One control plane for the module (hundreds of calls, so rate limits are raised),
    an API caller with a bearer token, an enrolled agent's certificate, a queued job."""
    tmp = tmp_path_factory.mktemp("hostile")
    async with control_plane(tmp, rate_per_address=10_000.0, rate_per_principal=10_000.0) as cp:
        agent = Credentials.load(await enrolled(cp, tmp))
        api_channel = grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem))
        agent_channel = secure_channel(
            cp.agent_target, cp.ca_pem, client_key_pem=agent.key_pem, client_cert_pem=agent.certificate_pem
        )
        bearer = await cp.bearer()
        submitted = await jobs_pb2_grpc.JobsStub(api_channel).Submit(
            jobs_pb2.SubmitJobRequest(
                spec=jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"], labels={"never": "x"})
            ),
            metadata=bearer,
        )
        try:
            yield Callers(cp, api_channel, agent_channel, bearer, submitted.job.id)
        finally:
            await api_channel.close()
            await agent_channel.close()


def short(outcome: Outcome) -> bool:
    return len(outcome.details.encode()) <= MAX_DETAILS_BYTES


def closed(rpc: Rpc) -> bool:
    """An API-port method in neither of the auth interceptor's tables: refused before
    anything else, fail-closed (grpc's Health/List, today)."""
    return rpc.port == API and not {rpc.path} & (PUBLIC | SCOPE_OF_METHOD.keys() | AUTHENTICATED_ONLY)


def decode_refusal(rpc: Rpc) -> tuple[grpc.StatusCode, str]:
    if closed(rpc):
        return grpc.StatusCode.PERMISSION_DENIED, f"method {rpc.path} is not open to API callers"
    return grpc.StatusCode.INVALID_ARGUMENT, DECODE_FAILED


# 7. Undecodable requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.id)
async def test_corrupt_protobuf_to_every_rpc_is_invalid_argument(callers: Callers, rpc: Rpc) -> None:
    for name, corrupt in CORRUPTIONS.items():
        outcome = await callers.send(rpc, [corrupt])
        assert (outcome.code, outcome.details) == decode_refusal(rpc), name


WITH_STRINGS = [rpc for rpc in RPCS if string_field_path(rpc.input) is not None]


@pytest.mark.parametrize("rpc", WITH_STRINGS, ids=lambda r: r.id)
async def test_invalid_utf8_in_a_string_field_of_every_rpc_is_invalid_argument(
    callers: Callers, rpc: Rpc
) -> None:
    request = with_string(rpc.input, INVALID_UTF8)
    assert request is not None
    outcome = await callers.send(rpc, [request])
    assert (outcome.code, outcome.details) == decode_refusal(rpc)


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.port == API], ids=lambda r: r.id)
async def test_corrupt_protobuf_from_an_anonymous_caller_never_names_a_type(
    callers: Callers, rpc: Rpc
) -> None:
    """Public methods (Login, Refresh, Enroll...) decode nothing they cannot; the others
    ask for credentials first, whatever the body."""
    expected = grpc.StatusCode.INVALID_ARGUMENT if rpc.path in PUBLIC else grpc.StatusCode.UNAUTHENTICATED
    if closed(rpc):
        expected = grpc.StatusCode.PERMISSION_DENIED
    for name, corrupt in CORRUPTIONS.items():
        outcome = await callers.send(rpc, [corrupt], anonymous=True)
        assert outcome.code == expected, (name, outcome)
        assert not outcome.leaks(), outcome


OPENINGS: dict[str, Callable[[], bytes]] = {
    # A valid first message, read through context.read() (Connect) or the request iterator.
    "testhide.v1.AgentMessage": lambda: agent_pb2.AgentMessage(hello=agent_pb2.Hello()).SerializeToString(),
    "testhide.v1.DataChunk": lambda: jobs_pb2.DataChunk(data=b"x" * 1000).SerializeToString(),
}


@pytest.mark.parametrize(
    "rpc", [r for r in RPCS if r.input.full_name in OPENINGS and r.client_streaming], ids=lambda r: r.id
)
async def test_a_corrupt_message_mid_stream_is_invalid_argument(callers: Callers, rpc: Rpc) -> None:
    for name, corrupt in CORRUPTIONS.items():
        outcome = await callers.send(rpc, [OPENINGS[rpc.input.full_name](), corrupt], read_all=True)
        assert (outcome.code, outcome.details) == (grpc.StatusCode.INVALID_ARGUMENT, DECODE_FAILED), name


class _Broken(Exception):
    pass


async def test_an_exception_escaping_any_servicer_shape_is_internal_and_nameless() -> None:
    """Behind the interceptors both ports are assembled with, a servicer that raises
    answers INTERNAL "internal error" (never the type or text of what it raised), and a
    domain error gets its status from the table, in all four shapes of RPC."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise _Broken("/etc/shadow is not here")

    async def unary_stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield b"first"
        raise _Broken("/etc/shadow is not here")

    async def stream_unary(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        async for _ in requests:
            raise NotFound("no such thing")
        return b""

    async def stream_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:  # the reader/writer shape, as AgentControl/Connect is written
        await context.read()
        raise _Broken("/etc/shadow is not here")

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    server = grpc.aio.server(interceptors=guarded())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Broken", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, handler in handlers.items():
                rpc = Rpc(
                    f"/test.Broken/{name}",
                    API,
                    jobs_pb2.DataChunk.DESCRIPTOR,
                    handler.request_streaming,
                    handler.response_streaming,
                )
                outcome = await call_raw(channel, rpc, [b"\x0a\x01x"], read_all=True)
                if name == "StreamUnary":
                    assert (outcome.code, outcome.details) == (grpc.StatusCode.NOT_FOUND, "no such thing")
                else:
                    assert (outcome.code, outcome.details) == (grpc.StatusCode.INTERNAL, "internal error"), (
                        name
                    )
    finally:
        await server.stop(None)


@pytest.mark.parametrize("port", [API, AGENT])
async def test_health_watch_answers_on_both_ports(callers: Callers, port: str) -> None:
    """Found by the fuzz test: on the API port the auth interceptor wrapped Watch (a coroutine
    that writes through its context) as an async generator, and every Watch failed UNKNOWN."""
    channel = callers.api if port == API else callers.agent
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    call = watch(health_pb2.HealthCheckRequest(), timeout=10)
    first = await call.read()
    call.cancel()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING


# 8. Overflow ----------------------------------------------------------------------------------------


def _spec(**changes: Any) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"])
    for name, value in changes.items():
        if name in ("cpus", "memory_bytes", "pids"):
            setattr(spec.resources, name, value)
        elif name in ("seconds", "nanos"):
            setattr(spec.timeout, name, value)
        else:
            setattr(spec, name, value)
    return spec


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seconds": 2**62}, "timeout"),
        ({"seconds": -(2**63)}, "timeout"),
        ({"seconds": 2**63 - 1}, "timeout"),
        ({"seconds": 315_576_000_001}, "timeout"),  # beyond google.protobuf.Duration's own range
        ({"seconds": 60, "nanos": -1}, "timeout"),
        ({"seconds": 60, "nanos": 2**31 - 1}, "timeout"),
        ({"cpus": 1e-12}, "cpus"),  # nano_cpus would round to 0, which Docker reads as unlimited
        ({"cpus": 5e-324}, "cpus"),
        ({"cpus": 1e308}, "cpus"),
        ({"cpus": float("nan")}, "cpus"),
        ({"memory_bytes": 2**63 - 1}, "memory"),
        ({"memory_bytes": -(2**63)}, "memory"),
        ({"pids": 2**63 - 1}, "pids"),
        ({"pids": -(2**63)}, "pids"),
        ({"retries": 2**31 - 1}, "retries"),
        ({"retries": -(2**31)}, "retries"),
    ],
    ids=lambda v: str(v),
)
async def test_overflowing_numbers_in_a_job_spec_are_invalid_argument(
    callers: Callers, changes: dict[str, Any], field: str
) -> None:
    error = await callers.submit(_spec(**changes))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")


@pytest.mark.parametrize("page_size", [-1, -(2**31)])
async def test_a_negative_page_size_is_invalid_argument(callers: Callers, page_size: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await jobs_pb2_grpc.JobsStub(callers.api).List(
            jobs_pb2.ListJobsRequest(page_size=page_size), metadata=callers.bearer
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (error.value.details() or "")


@pytest.mark.parametrize("epoch", [0, -1, -(2**63), 2**63 - 1])
async def test_an_out_of_range_epoch_on_the_agent_port_is_invalid_argument(
    callers: Callers, epoch: int
) -> None:
    fetch = next(r for r in RPCS if r.path == "/testhide.v1.AgentControl/FetchWorkspace")
    lease = agent_pb2.JobLease(job_id=callers.job_id, epoch=epoch).SerializeToString()
    outcome = await callers.send(fetch, [lease])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "epoch" in outcome.details


# 9. Unbounded labels --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        {f"label-{i}": "x" for i in range(10_000)},
        {f"label-{i}": "x" for i in range(65)},  # agents announce at most 64
        {"team": "x" * 257},
        {"team": "\u00e9" * 200},  # 400 bytes
        {"team": "a\x00b"},
        {"team": "a\nb"},
        {"Team Name": "x"},
    ],
    ids=["10000", "65", "long-value", "long-utf8-value", "nul", "newline", "bad-key"],
)
async def test_unbounded_or_malformed_labels_are_refused(callers: Callers, labels: dict[str, str]) -> None:
    error = await callers.submit(
        jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"], labels=labels)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "label" in (error.details() or "")
    assert len((error.details() or "").encode()) <= 200


# 10. Echoes -----------------------------------------------------------------------------------------

MEGABYTE_ID = "j" + "0" * (MiB - 1)


@pytest.mark.parametrize(
    "method", ["Get", "Cancel", "ListArtifacts", "GetTestResults", "FollowLogs", "DownloadArtifact"]
)
async def test_a_megabyte_job_id_is_not_found_without_being_echoed(callers: Callers, method: str) -> None:
    """Not the client's RESOURCE_EXHAUSTED "Stream removed": an id not of the form of a job
    id names no job, and the answer says so quoting only its start."""
    rpc = next(r for r in RPCS if r.path == f"/testhide.v1.Jobs/{method}")
    request = encode_field(rpc.input.fields_by_name["job_id"], MEGABYTE_ID.encode())
    outcome = await callers.send(rpc, [request])
    assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome.code
    assert "not found" in outcome.details
    assert len(outcome.details) <= 200


async def test_a_megabyte_artifact_path_is_refused_without_being_echoed(callers: Callers) -> None:
    rpc = next(r for r in RPCS if r.path == "/testhide.v1.Jobs/DownloadArtifact")
    request = jobs_pb2.DownloadArtifactRequest(job_id=callers.job_id, path="a" * MiB).SerializeToString()
    outcome = await callers.send(rpc, [request])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code
    assert "path" in outcome.details
    assert len(outcome.details) <= 200


async def test_a_submit_naming_many_missing_secrets_does_not_list_them_all(callers: Callers) -> None:
    """256 secret names of 128 characters: a 33 KB message, beyond the client's metadata limit."""
    names = [f"S{i:03d}_" + "X" * 123 for i in range(256)]
    error = await callers.submit(
        jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"], secrets=names)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "secrets not found" in (error.details() or "")
    assert len((error.details() or "").encode()) <= MAX_DETAILS_BYTES


def _string_paths(descriptor: Any, depth: int = 3) -> list[list[FieldDescriptor]]:
    paths: list[list[FieldDescriptor]] = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            paths.append([field])
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth:
            paths.extend([field, *below] for below in _string_paths(field.message_type, depth - 1))
    return paths


@pytest.mark.parametrize("rpc", WITH_STRINGS, ids=lambda r: r.id)
async def test_a_megabyte_in_any_string_field_is_never_echoed(callers: Callers, rpc: Rpc) -> None:
    """1 MiB of 'é' (each a two-byte character, six bytes once percent-encoded in the
    grpc-message trailer) in each string field in turn: the answer is never the client's
    RESOURCE_EXHAUSTED "Stream removed", and its text stays within 1 KiB."""
    for path in _string_paths(rpc.input):
        request = encode_field(path[-1], ("\u00e9" * (MiB // 2)).encode())
        for field in reversed(path[:-1]):
            request = encode_field(field, request)
        outcome = await callers.send(rpc, [request])
        where = ".".join(f.name for f in path)
        assert "Stream removed" not in outcome.details, where
        assert outcome.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (where, outcome)
        assert short(outcome), (where, len(outcome.details))
