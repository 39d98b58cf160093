"""Server assembly: the two listeners, their options, and the servicers each one serves.

The agent port requires a client certificate and bounds a connection's age by the agent
certificate lifetime (an open connection outlives the certificate that opened it); the API
port serves users, with their credentials checked by the interceptor, and enrollment.
Both are ``guarded``: an undecodable request answers INVALID_ARGUMENT and no exception
reaches a caller with its type (``rpc/guard.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from testhide.common.tls import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from testhide.controlplane.rpc.agent import AgentControlServicer
from testhide.controlplane.rpc.auth import ApiAuthInterceptor
from testhide.controlplane.rpc.auth_service import AuthServicer
from testhide.controlplane.rpc.enrollment import EnrollmentServicer
from testhide.controlplane.rpc.guard import guarded
from testhide.controlplane.rpc.jobs import JobsServicer, SecretsServicer
from testhide.protos.v1 import agent_pb2_grpc, auth_pb2_grpc, enrollment_pb2_grpc, jobs_pb2_grpc


def agent_server(
    servicer: AgentControlServicer, health: health_aio.HealthServicer, cert_ttl: timedelta
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=guarded(),
        options=[
            *CHANNEL_OPTIONS,
            # An open connection outlives the certificate that opened it: bound it.
            ("grpc.max_connection_age_ms", int(cert_ttl.total_seconds() * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # TLS record buffers per connection: 16 KiB by default, held by every idle agent.
            ("grpc.tsi.max_frame_size", 4096),
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
    health: health_aio.HealthServicer


def api_server(
    servicers: ApiServicers, interceptor: ApiAuthInterceptor, max_request_bytes: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=guarded(interceptor),
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    jobs_pb2_grpc.add_JobsServicer_to_server(servicers.jobs, server)
    jobs_pb2_grpc.add_SecretsServicer_to_server(servicers.secrets, server)
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(servicers.enrollment, server)
    auth_pb2_grpc.add_AuthServicer_to_server(servicers.auth, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicers.health, server)
    return server
