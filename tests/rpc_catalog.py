"""Every RPC of both ports, found in the service descriptors (so an RPC added later is
covered by the tests that use this), and the means to send them anything: raw bytes
through a channel with an identity serializer, a protobuf wire encoder that can put
any bytes in a string field, and Hypothesis strategies that build requests from the
message descriptors and then mutate their serialisation."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import pkgutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

import testhide.protos.v1 as protos

API, AGENT = "api", "agent"
# Where each service is served; any other service of ours is on the API port.
PORTS_OF_SERVICE = {"testhide.v1.AgentControl": (AGENT,), "grpc.health.v1.Health": (API, AGENT)}
# Details a caller may be shown: never a Python type, a traceback, or grpc's wrapper of one.
LEAKS = ("<class", "Traceback", "Unexpected", "Error parsing message", "Exception")
MAX_DETAILS_BYTES = 1024


@dataclass(frozen=True)
class Rpc:
    path: str
    port: str
    input: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def id(self) -> str:
        return f"{self.port}:{self.path.rsplit('/', 2)[1].rsplit('.', 1)[1]}/{self.path.rsplit('/', 1)[1]}"


def _services() -> list[ServiceDescriptor]:
    files: list[Any] = [health_pb2.DESCRIPTOR]
    for module in pkgutil.iter_modules(protos.__path__):
        if module.name.endswith("_pb2"):
            files.append(importlib.import_module(f"{protos.__name__}.{module.name}").DESCRIPTOR)
    return [service for file in files for service in file.services_by_name.values()]


def all_rpcs() -> list[Rpc]:
    return [
        Rpc(
            f"/{service.full_name}/{method.name}",
            port,
            method.input_type,
            method.client_streaming,
            method.server_streaming,
        )
        for service in _services()
        for method in service.methods
        for port in PORTS_OF_SERVICE.get(service.full_name, (API,))
    ]


RPCS = all_rpcs()


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    lost: bool = False
    """The client lost the server's status (see ``call_raw``); only the server's log tells."""
    attempts: int = 1

    def leaks(self) -> bool:
        return any(word in self.details for word in LEAKS)


# grpc's client, not the server: a write that races the server's answer to a request
# stream fails in core, and the client reports this instead of the status it received.
CLIENT_LOST_STATUS = "Internal error from Core"


async def call_raw(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    messages: Sequence[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
    deadline_s: float = 10.0,
    read_all: bool = False,
    attempts: int = 5,
) -> Outcome:
    """Send ``messages`` (serialised requests, sent as they are) and return the final
    status. A response stream is read until its first message, then cancelled (the
    server answered, and some streams, Health/Watch or a follower, never end on their
    own), or with ``read_all`` to its end. When the client loses the server's status
    to grpc's write race, the call is made again, up to ``attempts`` times."""
    made = 0
    while True:
        outcome = await _call_once(channel, rpc, messages, metadata, deadline_s, read_all)
        made += 1
        if not outcome.lost or made == attempts:
            return dataclasses.replace(outcome, attempts=made)


async def _call_once(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    messages: Sequence[bytes],
    metadata: tuple[tuple[str, str], ...],
    deadline_s: float,
    read_all: bool,
) -> Outcome:
    call: Any
    write_failed = False
    if rpc.client_streaming:
        factory = channel.stream_stream if rpc.server_streaming else channel.stream_unary
        call = factory(rpc.path, request_serializer=_identity, response_deserializer=_identity)(
            metadata=metadata, timeout=deadline_s
        )
        try:
            for message in messages:
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            write_failed = True  # the server has already answered; its status says how
    elif rpc.server_streaming:
        call = channel.unary_stream(rpc.path, request_serializer=_identity, response_deserializer=_identity)(
            messages[0], metadata=metadata, timeout=deadline_s
        )
    else:
        call = channel.unary_unary(rpc.path, request_serializer=_identity, response_deserializer=_identity)(
            messages[0], metadata=metadata, timeout=deadline_s
        )
    if rpc.server_streaming:
        try:
            async for _ in call:
                if not read_all:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError:
            pass
    code, details = await call.code(), await call.details() or ""
    lost = write_failed and code == grpc.StatusCode.INTERNAL and details == CLIENT_LOST_STATUS
    return Outcome(code, details, lost)


# A protobuf wire encoder: any bytes in any length-delimited field, any integer in any varint.
_VARINT = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
}
_ZIGZAG = {FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_FIXED64 = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
_FIXED32 = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
_DELIMITED = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_field(field: FieldDescriptor, value: Any) -> bytes:
    if field.type in _VARINT or field.type in _ZIGZAG:
        number = int(value)
        if field.type in _ZIGZAG:
            number = (number << 1) ^ (number >> 63)
        return varint(field.number << 3) + varint(number)
    if field.type in _FIXED64:
        packed = struct.pack("<d" if field.type == FieldDescriptor.TYPE_DOUBLE else "<q", value)
        return varint(field.number << 3 | 1) + packed
    if field.type in _FIXED32:
        packed = struct.pack("<f" if field.type == FieldDescriptor.TYPE_FLOAT else "<i", value)
        return varint(field.number << 3 | 5) + packed
    assert field.type in _DELIMITED, field.full_name
    data = bytes(value)
    return varint(field.number << 3 | 2) + varint(len(data)) + data


def string_field_path(descriptor: Descriptor, depth: int = 4) -> list[FieldDescriptor] | None:
    """A way down to a string field, if the message has one within ``depth`` levels."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return [field]
    if depth:
        for field in descriptor.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                assert field.message_type is not None
                below = string_field_path(field.message_type, depth - 1)
                if below is not None:
                    return [field, *below]
    return None


def with_string(descriptor: Descriptor, raw: bytes) -> bytes | None:
    """A serialised ``descriptor`` whose first string field (nested if need be) holds ``raw``."""
    path = string_field_path(descriptor)
    if path is None:
        return None
    encoded = encode_field(path[-1], raw)
    for field in reversed(path[:-1]):
        encoded = encode_field(field, encoded)
    return encoded


# Serialisations no protobuf parser accepts, whatever the message type.
CORRUPTIONS = {
    "truncated-field": b"\x0a\x05ab",  # field 1 announces 5 bytes, 2 follow
    "bad-wire-type": b"\x0f\x00",  # wire type 7 does not exist
    "stray-end-group": b"\x0c",  # an end-group with no start
    "overlong-varint": b"\x08" + b"\xff" * 11,  # a varint longer than ten bytes
}
INVALID_UTF8 = b"\xff\xfe\xc3\x28"


# Hypothesis strategies built from the descriptors ------------------------------------------------

INTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**32, 2**53, 2**62, 2**63 - 1, -(2**63)]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e308, float("nan"), float("inf"), -float("inf")]),
)
LONG_STRINGS = [b"x" * 1024, b"y" * (64 << 10), b"z" * (1 << 20), ("\u00e9" * (256 << 10)).encode()]


def strings(known: Sequence[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text(max_size=24).map(str.encode),
        st.sampled_from([k.encode() for k in known]) if known else st.nothing(),
        st.binary(max_size=12),  # most of it is not UTF-8
        st.sampled_from(LONG_STRINGS),
    )


def _scalar(field: FieldDescriptor, depth: int, known: Sequence[str]) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, depth - 1, known)
    if field.type == FieldDescriptor.TYPE_STRING:
        return strings(known)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from(LONG_STRINGS))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.sampled_from([0, 1, 2, 2**63 - 1])  # a bool is any varint on the wire
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), INTS)
    if field.type in _FIXED64 or field.type in _FIXED32:
        return FLOATS if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT) else INTS
    return INTS


def _many(entry_and_count: tuple[bytes, int]) -> bytes:
    entry, count = entry_and_count
    return entry * (count if len(entry) < 512 else 1)


def messages(descriptor: Descriptor, depth: int, known: Sequence[str]) -> st.SearchStrategy[bytes]:
    """Serialised ``descriptor`` messages: any subset of fields, extreme values, repeated
    and map fields from empty to many entries, nested messages down to ``depth``."""
    if depth <= 0:
        return st.just(b"")
    parts: list[st.SearchStrategy[bytes]] = []
    for field in descriptor.fields:
        encoded = _scalar(field, depth, known).map(functools.partial(encode_field, field))
        if field.is_repeated:
            parts.append(
                st.one_of(
                    st.lists(encoded, max_size=3).map(b"".join),
                    # many entries, but not many megabytes
                    st.tuples(encoded, st.integers(60, 300)).map(_many),
                )
            )
        else:
            parts.append(st.one_of(st.just(b""), encoded))
    return st.tuples(*parts).map(b"".join) if parts else st.just(b"")


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A serialisation, often damaged: truncated, a bit flipped, bytes inserted, an
    unknown or malformed field appended."""
    data = draw(base)
    how = draw(st.sampled_from(["as-is", "as-is", "as-is", "truncate", "flip", "insert", "append"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == "append":
        return data + draw(st.sampled_from([*CORRUPTIONS.values(), b"\xf8\xff\xff\xff\x0f\x00"]))
    return data


def requests(rpc: Rpc, known: Sequence[str], prefix: Sequence[bytes] = ()) -> st.SearchStrategy[list[bytes]]:
    """What a caller may send to ``rpc``: one request, or for a request stream one to three
    messages, optionally after ``prefix`` (a valid opening, such as an agent's hello)."""
    one = mutated(messages(rpc.input, 4, known))
    if not rpc.client_streaming:
        return one.map(lambda m: [m])
    stream = st.lists(one, min_size=1, max_size=3)
    if not prefix:
        return stream
    return st.one_of(stream, stream.map(lambda ms: [*prefix, *ms]))
