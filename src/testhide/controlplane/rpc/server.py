"""Server assembly: the two listeners, their options, the servicers each one serves, and
binding them to their addresses.

The agent port requires a client certificate and bounds a connection's age by the agent
certificate lifetime (an open connection outlives the certificate that opened it); the API
port serves users, with their credentials checked by the interceptor, and enrollment.
Both are ``guarded``: an undecodable request answers INVALID_ARGUMENT and no exception
reaches a caller with its type (``rpc/guard.py``). Each port has a health service that
answers for every service it serves (``rpc/health.py``); the API port also answers gRPC
reflection, so that ``grpcurl`` can call it (the agent port is internal, and mutual TLS).

Both set ``grpc.so_reuseport`` to 0: by default gRPC binds with SO_REUSEPORT, and a
second ``serve`` on the same port starts and silently shares its connections.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]  # ships no type hints

from testhide.common.tls import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, split_target
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.rpc.admin import AdminServicer
from testhide.controlplane.rpc.agent import AgentControlServicer
from testhide.controlplane.rpc.auth import ApiAuthInterceptor
from testhide.controlplane.rpc.auth_service import AuthServicer
from testhide.controlplane.rpc.enrollment import EnrollmentServicer
from testhide.controlplane.rpc.guard import guarded
from testhide.controlplane.rpc.jobs import JobsServicer, SecretsServicer
from testhide.controlplane.rpc.session import SessionServicer
from testhide.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)

# What each port serves besides health (and reflection): the names its health service answers for.
AGENT_SERVICES = (agent_pb2.DESCRIPTOR.services_by_name["AgentControl"].full_name,)
API_SERVICES = (
    jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["Secrets"].full_name,
    enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["Session"].full_name,
)
REFLECTION_SERVICE: str = reflection.SERVICE_NAME


@dataclass(frozen=True)
class Port:
    """One of the two listeners, as an operator knows it: for messages."""

    name: str
    setting: str
    """Where the operator chooses its address."""


API_PORT = Port("the API port", "--listen")
AGENT_PORT = Port("the agent port", "--agent-listen (by default the host of --listen, its port + 1)")


WAITING_CALLS = 20_000
"""Calls the agent port lets wait to be taken. grpc.aio takes calls from gRPC core one at a
time, from its event loop, and core refuses new ones at random once 1,000 wait, all past
3,000, and drops any that waited 30 s: the agent sees CANCELLED, no handler sees the call.
A fleet renewing or reconnecting together was cut short (tests/integration/
test_agent_port_waves.py). Two calls for each of 10,000 agents may wait, as long as
WAITING_S; each call's own deadline still ends it (an agent's Renew: 30 s)."""
WAITING_S = 300


def agent_server(
    servicer: AgentControlServicer, health: health_aio.HealthServicer, cert_ttl: timedelta
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=guarded(),
        options=[
            *CHANNEL_OPTIONS,
            ("grpc.so_reuseport", 0),
            # An open connection outlives the certificate that opened it: bound it.
            ("grpc.max_connection_age_ms", int(cert_ttl.total_seconds() * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # TLS record buffers per connection: 16 KiB by default, held by every idle agent.
            ("grpc.tsi.max_frame_size", 4096),
            ("grpc.server.max_pending_requests", WAITING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", WAITING_CALLS),
            ("grpc.server_max_unrequested_time_in_server", WAITING_S),
        ],
    )
    agent_pb2_grpc.add_AgentControlServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server


@dataclass(frozen=True)
class ApiServicers:
    jobs: JobsServicer
    secrets: SecretsServicer
    enrollment: EnrollmentServicer
    auth: AuthServicer
    session: SessionServicer
    health: health_aio.HealthServicer
    admin: AdminServicer | None = None


def api_server(
    servicers: ApiServicers, interceptor: ApiAuthInterceptor, max_request_bytes: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=guarded(interceptor),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    jobs_pb2_grpc.add_JobsServicer_to_server(servicers.jobs, server)
    jobs_pb2_grpc.add_SecretsServicer_to_server(servicers.secrets, server)
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(servicers.enrollment, server)
    auth_pb2_grpc.add_AuthServicer_to_server(servicers.auth, server)
    auth_pb2_grpc.add_SessionServicer_to_server(servicers.session, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicers.health, server)
    if servicers.admin is not None:
        admin_pb2_grpc.add_AdminServicer_to_server(servicers.admin, server)
    # The schema it reveals is the public one; the auth interceptor lists it as public.
    reflection.enable_server_reflection((*API_SERVICES, HEALTH_SERVICE, REFLECTION_SERVICE), server)
    return server


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, port: Port) -> int:
    """Binds ``server`` to ``address`` (HOST:PORT); returns the port bound (chosen, for port 0).

    gRPC's refusal says neither why nor what to do ("Failed to bind to address"), and its
    core prints a line of its own on stderr. So the address is tried with a plain socket
    first, which says why (in use, not this host's, ...), and given to gRPC only then."""
    why = unbindable(address, port)
    if why is None:
        try:
            bound = server.add_secure_port(address, credentials)
        except RuntimeError:
            bound = 0
        if bound:
            return bound
        # Taken meanwhile, or refused by gRPC alone.
        why = unbindable(address, port) or f"it could not be bound; check {port.setting}"
    raise ConfigError(f"cannot listen on {address} ({port.name}): {why}")


def check_bindable(address: str, port: Port) -> None:
    """Refuse ``address`` now if it cannot be bound, in ``bind``'s words."""
    why = unbindable(address, port)
    if why is not None:
        raise ConfigError(f"cannot listen on {address} ({port.name}): {why}")


def unbindable(address: str, port: Port) -> str | None:
    """Why a TCP listener cannot bind ``address`` and what to do, or None if it can: each
    address it resolves to is bound for a moment (with SO_REUSEADDR, as gRPC binds) and let go."""
    try:
        host, number = split_target(address)
    except ValueError:
        return None  # the configuration checks the form; gRPC has the last word
    if not 0 <= number <= 65535:  # getaddrinfo would take it modulo 65536, and so would gRPC
        return f"{number} is not a TCP port (0 to 65535); choose one with {port.setting}"
    try:
        targets = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        failures = [_bind_error(family, sockaddr) for family, _, _, _, sockaddr in targets]
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror}); give an address of this host with {port.setting}"
    choose = f"with {port.setting}"
    # gRPC goes ahead when some of a name's addresses bind; one in use is another server's.
    if errno.EADDRINUSE in failures:
        return f"port {number} on {host} is in use (another serve?); stop it or choose another {choose}"
    if not failures or not all(failures):
        return None
    if failures[0] == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this host; choose one of its own (or 0.0.0.0) {choose}"
    if failures[0] == errno.EACCES:
        return f"port {number} needs privileges (below 1024: CAP_NET_BIND_SERVICE); choose another {choose}"
    return f"{os.strerror(failures[0])}; choose another address {choose}"


def _bind_error(family: socket.AddressFamily, sockaddr: tuple[object, ...]) -> int:
    """The errno of binding a TCP socket to ``sockaddr``, 0 if it binds."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        return exc.errno or -1
    return 0
