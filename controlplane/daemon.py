"""The control plane daemon: two listeners, the scheduler, the store."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from common.tls import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from controlplane.auth.apikeys import ApiKeyAuthenticator
from controlplane.ca.enrollment import Enrollment
from controlplane.config import ControlPlaneConfig
from controlplane.datadir import DataDir
from controlplane.jobs.logs import LogBook
from controlplane.jobs.scheduler import Scheduler
from controlplane.jobs.service import JobService
from controlplane.rpc.agent import AgentControlServicer
from controlplane.rpc.auth import ApiAuthInterceptor
from controlplane.rpc.enrollment import EnrollmentServicer
from controlplane.rpc.jobs import JobsServicer
from controlplane.store.sqlite import SqliteStore
from protos.v1 import agent_pb2_grpc, enrollment_pb2_grpc, jobs_pb2_grpc

log = structlog.get_logger("testhide.controlplane")


class ControlPlane:
    """``start()`` binds and serves; ``run()`` serves until ``shutdown()``,
    which is idempotent and safe to call from a signal handler."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self.api_port = 0
        self.agent_port = 0
        self._stopped = asyncio.Event()
        self._shutdown_started = False
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[grpc.aio.Server] = []
        self._store: SqliteStore | None = None
        self.scheduler: Scheduler | None = None

    async def start(self) -> None:
        data_dir = DataDir(self.config.data_dir)
        data_dir.require_initialised()
        master = data_dir.master_key()
        ca = data_dir.load_ca(master, allow_development=self.config.dev)
        key_pem, chain_pem = data_dir.server_credentials(master)
        self._store = store = await SqliteStore.open(data_dir.db_path)

        self.scheduler = scheduler = Scheduler(store)
        jobs = JobService(store, master, scheduler, LogBook(store, master))
        health = health_aio.HealthServicer()

        agent_server = grpc.aio.server(options=CHANNEL_OPTIONS + [
            # An open connection outlives the certificate that opened it: bound it.
            ("grpc.max_connection_age_ms", int(self.config.agent_cert_ttl.total_seconds() * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        agent_pb2_grpc.add_AgentControlServicer_to_server(
            AgentControlServicer(store, scheduler, jobs, ca, self.config.agent_cert_ttl), agent_server)
        health_pb2_grpc.add_HealthServicer_to_server(health, agent_server)
        agent_creds = grpc.ssl_server_credentials([(key_pem, chain_pem)], root_certificates=ca.certificate_pem,
                                                  require_client_auth=True)
        self.agent_port = agent_server.add_secure_port(self.config.resolved_agent_listen, agent_creds)

        api_server = grpc.aio.server(
            interceptors=[ApiAuthInterceptor(ApiKeyAuthenticator(store))],
            options=[("grpc.max_receive_message_length", self.config.max_request_bytes),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000)],
        )
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(jobs), api_server)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
            EnrollmentServicer(Enrollment(store, ca, self.config.agent_cert_ttl), self.agent_port), api_server)
        health_pb2_grpc.add_HealthServicer_to_server(health, api_server)
        self.api_port = api_server.add_secure_port(self.config.listen,
                                                   grpc.ssl_server_credentials([(key_pem, chain_pem)]))

        self._servers = [api_server, agent_server]
        for server in self._servers:
            await server.start()
        self._tasks.append(asyncio.create_task(scheduler.run(), name="scheduler"))
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("controlplane_started", api_port=self.api_port, agent_port=self.agent_port,
                 data_dir=str(self.config.data_dir))

    async def run(self) -> None:
        if not self._servers:
            await self.start()
        await self._stopped.wait()

    async def shutdown(self) -> None:
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        grace = self.config.shutdown_grace.total_seconds()
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._store is not None:
            await self._store.close()
        log.info("controlplane_stopped")
        self._stopped.set()
