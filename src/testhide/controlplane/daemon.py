"""The control plane daemon: two listeners, the scheduler, the store, and a
watcher that applies rotations and revocations made by operator commands."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from testhide.common.tls import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.limits import RateLimiter, SpikeDetector
from testhide.controlplane.auth.sessions import Sessions
from testhide.controlplane.auth.tokens import AccessTokens, SigningKeys, issuer_for
from testhide.controlplane.ca.enrollment import Enrollment
from testhide.controlplane.ca.rotation import rotate_server_certificate
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.datadir import DataDir, TlsMaterial
from testhide.controlplane.jobs.blobs import BlobVault
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.scheduler import Scheduler, TrustBundle
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.jobs.service import JobService
from testhide.controlplane.masterkey import RingAnnouncement
from testhide.controlplane.rpc.agent import AgentControlServicer
from testhide.controlplane.rpc.auth import ApiAuthInterceptor
from testhide.controlplane.rpc.auth_service import AuthServicer
from testhide.controlplane.rpc.enrollment import EnrollmentServicer
from testhide.controlplane.rpc.jobs import JobsServicer, SecretsServicer
from testhide.controlplane.store.sqlite import SqliteStore
from testhide.protos.v1 import agent_pb2_grpc, auth_pb2_grpc, enrollment_pb2_grpc, jobs_pb2_grpc

log = structlog.get_logger("testhide.controlplane")

# How often the watcher looks for rotations and revocations made by operator
# commands in other processes: revocation must bite within seconds.
WATCH_INTERVAL = timedelta(seconds=1)


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
        self.certificates: CertificateState | None = None
        self.signing_keys: SigningKeys | None = None
        self.jobs: JobService | None = None
        self._ring: RingAnnouncement | None = None

    async def start(self) -> None:
        directory = DataDir(self.config.data_dir)
        directory.require_initialised()
        master = directory.master_key()
        # Before anything is sealed: a master-key rotation waits on what we hold.
        self._ring = RingAnnouncement(directory, master)
        self._ring.publish()
        self.certificates = certs = CertificateState(directory, master, self.config.dev)
        self._store = store = await SqliteStore.open(directory.db_path, self.config.db_busy_timeout)
        auditor = Auditor(store, await directory.audit_key(master, store))

        self.scheduler = scheduler = Scheduler(store, lease=self.config.job_lease)
        secrets = SecretVault(store, master)
        logs = LogBook(store, master)
        leases = Leases(store, master, scheduler, logs, self.config.job_lease)
        self.jobs = jobs = JobService(
            store, master, scheduler, logs, BlobVault(store, master), secrets, leases
        )
        health = health_aio.HealthServicer()
        ttl = self.config.agent_cert_ttl
        if ttl < timedelta(minutes=5):
            log.warning(
                "agent_certificate_lifetime_short",
                ttl_s=ttl.total_seconds(),
                note="below 5 minutes agents renew very often; meant for tests",
            )

        agent_server = grpc.aio.server(
            options=CHANNEL_OPTIONS
            + [
                # An open connection outlives the certificate that opened it: bound it.
                ("grpc.max_connection_age_ms", int(ttl.total_seconds() * 1000)),
                ("grpc.max_connection_age_grace_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # TLS record buffers per connection: 16 KiB by default, held by every idle agent.
                ("grpc.tsi.max_frame_size", 4096),
            ]
        )
        agent_pb2_grpc.add_AgentControlServicer_to_server(
            AgentControlServicer(store, scheduler, jobs, certs, ttl, auditor, leases.heartbeat_interval),
            agent_server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, agent_server)
        self.agent_port = agent_server.add_secure_port(
            self.config.resolved_agent_listen, certs.credentials(client_auth=True)
        )

        self.signing_keys = keys = SigningKeys(directory, master)
        sessions = Sessions(
            store,
            AccessTokens(keys, issuer_for(certs.current.active_ca.trust_domain)),
            auditor,
            self.config.lockout,
            SpikeDetector(self.config.failure_spike_threshold),
            reuse_grace=self.config.refresh_reuse_grace,
        )
        rate_a, rate_p = self.config.rate_per_address, self.config.rate_per_principal
        api_server = grpc.aio.server(
            interceptors=[
                ApiAuthInterceptor(
                    sessions, RateLimiter(rate_a, int(2 * rate_a)), RateLimiter(rate_p, int(2 * rate_p))
                )
            ],
            options=[
                ("grpc.max_receive_message_length", self.config.max_request_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(jobs), api_server)
        jobs_pb2_grpc.add_SecretsServicer_to_server(SecretsServicer(secrets, auditor), api_server)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
            EnrollmentServicer(Enrollment(store, certs, ttl, auditor), self.agent_port), api_server
        )
        auth_pb2_grpc.add_AuthServicer_to_server(AuthServicer(sessions, keys), api_server)
        health_pb2_grpc.add_HealthServicer_to_server(health, api_server)
        self.api_port = api_server.add_secure_port(self.config.listen, certs.credentials(client_auth=False))

        self._servers = [api_server, agent_server]
        for server in self._servers:
            await server.start()
        self._tasks.append(asyncio.create_task(scheduler.run(), name="scheduler"))
        self._tasks.append(asyncio.create_task(leases.run(), name="leases"))
        self._tasks.append(asyncio.create_task(self._watch(directory, master), name="watcher"))
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "controlplane_started",
            api_port=self.api_port,
            agent_port=self.agent_port,
            data_dir=str(self.config.data_dir),
        )

    async def _watch(self, directory: DataDir, master: MasterKey) -> None:
        assert self.certificates is not None and self._store is not None and self.scheduler is not None
        certs, store, scheduler = self.certificates, self._store, self.scheduler
        revoked_since = datetime.now(UTC)
        while True:
            await asyncio.sleep(WATCH_INTERVAL.total_seconds())
            try:
                if master.reload():
                    assert self._ring is not None
                    self._ring.publish()
                    log.info("master_key_reloaded", key_ids=list(master.key_ids), current=master.current_id)
                if certs.server_certificate_due():
                    cert = await asyncio.to_thread(rotate_server_certificate, directory, master)
                    log.info(
                        "server_certificate_rotated", serial=format(cert.serial_number, "x"), automatic=True
                    )
                changed = certs.reload_if_changed()
                if changed:
                    self._apply_trust(*changed)
                if self.signing_keys is not None and self.signing_keys.reload():
                    log.info("signing_keys_reloaded", active=self.signing_keys.active)
                checked_at = datetime.now(UTC)
                for agent in await store.agents_revoked_since(revoked_since - WATCH_INTERVAL):
                    session = scheduler.session_of(agent.id)
                    if session is not None and session.identity.org == agent.org:
                        session.close("PERMISSION_DENIED", "this agent has been revoked")
                        log.info("agent_session_closed", agent_id=agent.id, reason="revoked")
                revoked_since = checked_at
            except Exception:
                log.exception("watch_failed")

    def _apply_trust(self, old: TlsMaterial, new: TlsMaterial) -> None:
        assert self.scheduler is not None
        if old.bundle_pem != new.bundle_pem:
            for session in self.scheduler.sessions():
                session.send(TrustBundle(new.bundle_pem))
        trusted = new.trusted_fingerprints
        for session in self.scheduler.sessions():
            if session.cert_issuer not in trusted:
                session.close("UNAUTHENTICATED", "the agent certificate's CA has been retired; enroll again")

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
        # Agents' streams never end on their own: close them with a status that
        # makes agents reconnect (to the next instance) and replay what is unacknowledged.
        stopping = [asyncio.create_task(server.stop(grace)) for server in self._servers]
        if self.scheduler is not None:
            for session in self.scheduler.sessions():
                session.close("UNAVAILABLE", "the control plane is shutting down; reconnect")
        await asyncio.gather(*stopping)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._store is not None:
            await self._store.close()
        if self._ring is not None:
            self._ring.withdraw()
        log.info("controlplane_stopped")
        self._stopped.set()
