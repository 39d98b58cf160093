"""The control plane daemon: two listeners, the scheduler, the store, and a
watcher that applies rotations and revocations made by operator commands.

Lifecycle only: ``start()`` binds and starts the supervised background tasks,
``run()`` waits until the daemon stops, ``shutdown()`` stops it. The background
tasks never end on their own: the first one that does (an exception, or a
return) is logged with its cause and stops the whole daemon, and ``run()`` then
raises ``BackgroundTaskFailed`` so that ``serve`` exits non-zero instead of
serving on without a scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from testhide.common.sdnotify import Notifier
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.limits import rate_limiter, spike_detector
from testhide.controlplane.auth.mfa import SecondFactors
from testhide.controlplane.auth.passwords import PasswordChecks
from testhide.controlplane.auth.sessions import Sessions
from testhide.controlplane.auth.tokens import AccessTokens, SigningKeys, issuer_for
from testhide.controlplane.backup_schedule import backup_schedule, check_data_dir
from testhide.controlplane.ca.enrollment import Enrollment
from testhide.controlplane.ca.rotation import rotate_server_certificate
from testhide.controlplane.ca.signer import Signer
from testhide.controlplane.ca.statement_keys import StatementKeys
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.cluster import Cluster, LocalCluster, PgCluster
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.datadir import DataDir, TlsMaterial
from testhide.controlplane.errors import BackgroundTaskFailed
from testhide.controlplane.jobs.blobs import BlobVault
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.provenance import ProvenanceExporter
from testhide.controlplane.jobs.scheduler import Scheduler, TrustBundle
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.jobs.service import JobService
from testhide.controlplane.jobs.statements import StatementRecorder
from testhide.controlplane.masterkey import RingAnnouncement
from testhide.controlplane.operations.agents import stream_holders
from testhide.controlplane.rpc import server
from testhide.controlplane.rpc.admin import AdminServicer
from testhide.controlplane.rpc.admin_agents import org_pools
from testhide.controlplane.rpc.admin_context import AdminContext
from testhide.controlplane.rpc.agent import AgentControlServicer
from testhide.controlplane.rpc.auth import ApiAuthInterceptor
from testhide.controlplane.rpc.auth_service import AuthServicer
from testhide.controlplane.rpc.enrollment import EnrollmentServicer
from testhide.controlplane.rpc.evidence import spec_digest_of, spec_json_of
from testhide.controlplane.rpc.health import StoreHealth
from testhide.controlplane.rpc.jobs import JobsServicer, SecretsServicer
from testhide.controlplane.rpc.session import SessionServicer
from testhide.controlplane.shared import SharedFiles
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store_timing import time_store_calls

if TYPE_CHECKING:
    from testhide.common.metrics_http import MetricsListener
    from testhide.controlplane.metrics import ControlPlaneMetrics


def _metrics() -> ControlPlaneMetrics:
    """Imported only when metrics are on: prometheus_client and its HTTP server are 4 MiB a
    control plane without them does without."""
    from testhide.controlplane.metrics import ControlPlaneMetrics

    return ControlPlaneMetrics()


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
        self._failure: BaseException | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._servers: list[grpc.aio.Server] = []
        self._store: Store | None = None
        self.scheduler: Scheduler | None = None
        self.cluster: Cluster | None = None
        self.certificates: CertificateState | None = None
        self.signing_keys: SigningKeys | None = None
        self.jobs: JobService | None = None
        self._ring: RingAnnouncement | None = None
        self._shared: SharedFiles | None = None
        self.password_checks: PasswordChecks | None = None
        self.signer: Signer | None = None
        self.metrics = _metrics() if config.metrics_listen else None
        """Prometheus metrics on ``metrics_listen``, when set."""
        self.metrics_port = 0
        self._metrics_listener: MetricsListener | None = None
        self.health: StoreHealth | None = None
        self.notifier = Notifier.from_environment()
        """systemd's Type=notify: READY once serving, STOPPING, watchdog pings; a no-op outside systemd."""
        self._look_now = asyncio.Event()

    async def start(self) -> None:
        directory = DataDir(self.config.data_dir, self.config.master_key)
        directory.require_initialised()
        if self.config.backup_every is not None:
            check_data_dir(directory)  # PostgreSQL: refused before anything opens
        master = directory.master_key()
        # Before anything is sealed: a master-key rotation waits on what we hold.
        self._ring = RingAnnouncement(directory, master)
        self._ring.publish()
        self._store = store = await directory.open_store(
            self.config.db_busy_timeout, migrate=False, require_current=False
        )
        await _migrate_schema(directory, master, store, self.config.resolved_backup_dir)
        time_store_calls(store, self.metrics)  # slow calls are logged, metrics or not
        if isinstance(store, PgStore):
            # A copy of the data dir on another machine may be behind a rotation made elsewhere.
            self._shared = SharedFiles(directory, master, store)
            await self._shared.start()
        self.certificates = certs = CertificateState(directory, master, self.config.dev)
        auditor = Auditor(store, await directory.audit_key(master, store))

        self.cluster = cluster = (
            PgCluster(store, key_ids=lambda: master.key_ids) if isinstance(store, PgStore) else LocalCluster()
        )
        self.scheduler = scheduler = Scheduler(
            store, lease=self.config.job_lease, cluster=cluster, metrics=self.metrics
        )
        secrets = SecretVault(store, master)
        logs = LogBook(store, master)
        leases = Leases(store, master, scheduler, logs, self.config.job_lease)
        # Countersigns jobs' statements; its first key is made when first needed (a job's end, an export).
        self.statement_keys = statement_keys = StatementKeys(store, master, lambda: certs.current.active_ca)
        statements = StatementRecorder(
            store, statement_keys, lambda: certs.current.trusted, auditor, spec_digest_of
        )
        self.jobs = jobs = JobService(
            store,
            master,
            scheduler,
            logs,
            BlobVault(store, master),
            secrets,
            leases,
            metrics=self.metrics,
            auditor=auditor,
            statements=statements,
        )
        self.health = health = StoreHealth(store)
        ttl = self.config.agent_cert_ttl
        if ttl < timedelta(minutes=5):
            log.warning(
                "agent_certificate_lifetime_short",
                ttl_s=ttl.total_seconds(),
                note="below 5 minutes agents renew very often; meant for tests",
            )

        self.signer = Signer(self.config.signing_processes)
        agent_server = server.agent_server(
            AgentControlServicer(
                store,
                scheduler,
                jobs,
                certs,
                ttl,
                auditor,
                leases.heartbeat_interval,
                metrics=self.metrics,
                signer=self.signer,
            ),
            await health.servicer(server.AGENT_SERVICES),
            ttl,
        )
        # The agent port is bound first (enrollment answers with it), but the API port is the one an
        # operator names: a host that is not this one's is reported against --listen.
        server.check_bindable(self.config.listen, server.API_PORT)
        self.agent_port = server.bind(
            agent_server,
            self.config.resolved_agent_listen,
            certs.credentials(client_auth=True),
            server.AGENT_PORT,
        )

        self.signing_keys = keys = SigningKeys(directory, master)
        self.password_checks = PasswordChecks(self.config.password_workers, self.config.password_queue)
        access_tokens = AccessTokens(keys, issuer_for(certs.current.active_ca.trust_domain))
        sessions = Sessions(
            store,
            access_tokens,
            auditor,
            self.config.lockout,
            spike_detector(store, self.config.failure_spike_threshold),  # shared by replicas on PostgreSQL
            reuse_grace=self.config.refresh_reuse_grace,
            address_lockout=self.config.address_lockout,
            passwords=self.password_checks,
            factors=SecondFactors(store, master),
        )
        rate_a, rate_p = self.config.rate_per_address, self.config.rate_per_principal
        admin = AdminContext(
            store,
            auditor,
            scheduler=scheduler,
            certificates=certs,
            stream_holders=lambda: stream_holders(store, {f"pid:{os.getpid()}"}),
            passwords=self.password_checks,
            logs=logs,
        )
        api_server = server.api_server(
            server.ApiServicers(
                jobs=JobsServicer(
                    jobs,
                    pools=lambda org: org_pools(admin, org),
                    evidence=statements.evidence,
                    provenance=ProvenanceExporter(
                        store, statement_keys, lambda: certs.current.active_ca.trust_domain, spec_json_of
                    ).envelope,
                ),
                secrets=SecretsServicer(secrets, auditor),
                enrollment=EnrollmentServicer(
                    Enrollment(store, certs, ttl, auditor, self.signer), self.agent_port
                ),
                auth=AuthServicer(sessions, keys),
                session=SessionServicer(access_tokens, store),
                health=await health.servicer(server.API_SERVICES),
                admin=AdminServicer(admin),
            ),
            ApiAuthInterceptor(  # budgets shared by replicas on PostgreSQL
                sessions,
                rate_limiter(store, "address", rate_a, int(2 * rate_a)),
                rate_limiter(store, "principal", rate_p, int(2 * rate_p)),
                metrics=self.metrics,
            ),
            self.config.max_request_bytes,
        )
        self.api_port = server.bind(
            api_server, self.config.listen, certs.credentials(client_auth=False), server.API_PORT
        )

        if self.metrics is not None:
            self._metrics_listener = await self.metrics.listen(self.config, scheduler, store, certs)
            self.metrics_port = self._metrics_listener.port
        self._servers = [api_server, agent_server]
        for listener in self._servers:
            await listener.start()
        if isinstance(cluster, PgCluster):
            cluster.set_addresses(
                f"{_host(self.config.listen)}:{self.api_port}",
                f"{_host(self.config.resolved_agent_listen)}:{self.agent_port}",
            )
        self._supervise(cluster.run(_ClusterHandlers(scheduler, jobs)), "cluster")
        self._supervise(scheduler.run(), "scheduler")
        self._supervise(leases.run(), "leases")
        self._supervise(self._watch(directory, master), "watcher")
        self._supervise(self.notifier.keep_watchdog(), "watchdog")
        await health.probe()  # every health name answers from the first call on
        self._supervise(health.run(), "health")
        if self.config.backup_every is not None:  # a failed backup is logged and retried, never fatal
            backups = backup_schedule(self.config, directory, master, store, auditor, self.metrics)
            self._supervise(backups.run(), "backups")
        log.info(
            "controlplane_started",
            api_port=self.api_port,
            agent_port=self.agent_port,
            data_dir=str(self.config.data_dir),
        )
        self.notifier.ready(f"serving: API port {self.api_port}, agent port {self.agent_port}")

    def _supervise(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._shutdown_started:
            return
        error = task.exception()
        # The first failure wins; the daemon stops rather than serve without this task.
        self._failure = error or RuntimeError(f"the {task.get_name()} task returned")
        log.error("background_task_failed", task=task.get_name(), exc_info=self._failure)
        self._stopping = asyncio.ensure_future(self.shutdown())

    async def _watch(self, directory: DataDir, master: MasterKey) -> None:
        assert self.certificates is not None
        assert self._store is not None
        assert self.scheduler is not None
        certs, store, scheduler = self.certificates, self._store, self.scheduler
        revoked_since = datetime.now(UTC)
        while True:
            with contextlib.suppress(TimeoutError):  # reload() cuts the wait short
                await asyncio.wait_for(self._look_now.wait(), WATCH_INTERVAL.total_seconds())
            self._look_now.clear()
            try:
                if self._shared is not None:
                    await self._shared.follow()  # rotated elsewhere: the reloads below pick it up
                if master.reload():
                    assert self._ring is not None
                    self._ring.publish()
                    log.info("master_key_reloaded", key_ids=list(master.key_ids), current=master.current_id)
                if certs.server_certificate_due():
                    cert = await asyncio.to_thread(rotate_server_certificate, directory, master)
                    if self._shared is not None:
                        await self._shared.publish()
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
                # Resumed by an operator's command in another process: dispatch what waited.
                for org, pool in await store.pools_resumed_since(revoked_since - WATCH_INTERVAL):
                    scheduler.kick(org, pool)
                revoked_since = checked_at
            except Exception:
                log.exception("watch_failed")

    def reload(self) -> None:
        """SIGHUP: look for rotated certificates, keys and revocations now, not at the next tick."""
        self._look_now.set()

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
        """Serve until ``shutdown()``; raise ``BackgroundTaskFailed`` if a background task stopped it."""
        if not self._servers:
            await self.start()
        await self._stopped.wait()
        if self._failure is not None:
            raise BackgroundTaskFailed(
                f"the control plane stopped: a background task failed: {self._failure!r}"
            ) from self._failure

    async def shutdown(self) -> None:
        """Stop serving, end the background tasks, close the store. Idempotent; always completes."""
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        self.notifier.stopping()
        try:
            await self._stop_serving()
        finally:
            for task in self._tasks:
                task.cancel()
            # A task that failed has its exception recorded already; never re-raise it here.
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._metrics_listener is not None:
                await self._metrics_listener.stop()
            if self.password_checks is not None:
                self.password_checks.close()
            if self.signer is not None:
                await self.signer.close()
            try:
                if self.cluster is not None:
                    await self.cluster.close()
                if self._store is not None:
                    await self._store.close()
            finally:
                if self._ring is not None:
                    self._ring.withdraw()
                log.info("controlplane_stopped")
                self._stopped.set()

    async def _stop_serving(self) -> None:
        grace = self.config.shutdown_grace.total_seconds()
        if self.health is not None:
            await self.health.shutting_down()  # health checks send new work elsewhere first
        # Agents' streams never end on their own: close them with a status that
        # makes agents reconnect (to the next instance) and replay what is unacknowledged.
        stopping = [asyncio.create_task(listener.stop(grace)) for listener in self._servers]
        if self.scheduler is not None:
            for session in self.scheduler.sessions():
                session.close("UNAVAILABLE", "the control plane is shutting down; reconnect")
        await asyncio.gather(*stopping)


async def _migrate_schema(directory: DataDir, master: MasterKey, store: Store, backup_dir: Path) -> None:
    """Pending schema versions are applied here and by ``migrate`` alone, each
    time after a backup into ``backup_dir`` (``--backup-dir``; ``commands/migrate.py``)."""
    from testhide.controlplane.commands.migrate import migrate_schema

    migration = await migrate_schema(directory, master, store, backup_dir, "system")
    if migration is not None:
        log.info(
            "schema_migrated",
            from_version=migration.from_version,
            to_version=migration.to_version,
            backup=str(migration.backup),
        )


def _host(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


class _ClusterHandlers:
    """What this replica does with what the others tell it."""

    def __init__(self, scheduler: Scheduler, jobs: JobService) -> None:
        self._scheduler, self._jobs = scheduler, jobs

    def queued(self, org: str, pool: str) -> None:
        self._scheduler.kick(org, pool)

    async def cancel(self, org: str, job_id: str) -> None:
        await self._jobs.cancel_held_elsewhere(org, job_id)

    def resync(self) -> None:
        self._scheduler.resync()
