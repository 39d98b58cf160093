"""The agent daemon: keeps one session to one control-plane replica open,
reconnecting (to the next replica, see `agent/endpoints.py`) with capped,
jittered exponential backoff, and runs the jobs it is given.

SIGTERM drains: no new jobs, running ones get ``drain_timeout`` to finish (then
are canceled), their results are delivered, then the agent exits. A second
signal stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from dataclasses import replace
from datetime import timedelta

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from testhide.agent.caches import Caches
from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.egress import EgressProxies
from testhide.agent.endpoints import Endpoints
from testhide.agent.errors import ConfigError, RuntimeUnavailable
from testhide.agent.executor import Executor
from testhide.agent.metrics import AgentMetrics
from testhide.agent.model import Assignment
from testhide.agent.outbox import Outbox
from testhide.agent.rpc.link import ControlPlaneLink
from testhide.agent.rpc.session import CertificateRenewed, Session, SessionEvents, SessionLost
from testhide.agent.runtime.base import ContainerRuntime
from testhide.agent.runtime.docker import DockerRuntime
from testhide.agent.spool import Spool
from testhide.agent.steps import JobFacilities
from testhide.common.identity import AgentIdentity
from testhide.common.sdnotify import Notifier
from testhide.common.tls import fingerprint

log = structlog.get_logger("testhide.agent")

# How long a draining agent tries to deliver its last results before it exits.
RESULT_DELIVERY_TIMEOUT = timedelta(seconds=30)
# How often an agent whose container engine stopped answering asks it again.
RUNTIME_PROBE_INTERVAL = timedelta(seconds=1)


class Agent:
    """``run()`` returns after ``shutdown()``; a CredentialsError ends it too,
    since enrolling again is the only way forward."""

    def __init__(self, config: AgentConfig, runtime: ContainerRuntime) -> None:
        self.config = config
        self._credentials = Credentials.load(config.data_dir)
        self.endpoints = Endpoints(self._credentials.agent_endpoints)
        """The replicas' agent ports; the session and the transfers go to the one last reached."""
        self.outbox = Outbox(Spool(config.spool_dir), config.spool_max_bytes)
        self._runtime = runtime
        self._executor = Executor(
            config,
            runtime,
            self.outbox,
            ControlPlaneLink(lambda: self._credentials, self.endpoints),
            owner=self._credentials.agent_id,
            on_runtime_unavailable=self._runtime_unavailable,
            facilities=self._job_facilities(runtime),
            credentials=lambda: self._credentials,  # signs each job's statement
        )
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self.draining = asyncio.Event()
        """Set on the first SIGTERM: no new jobs."""
        self.runtime_down = False
        """The container engine stopped answering: no new jobs until it does again."""
        self.accepting_changed = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self.credentials_changed = asyncio.Condition()
        self._announcements: set[asyncio.Task[None]] = set()
        """Held until done: the event loop keeps only weak references to tasks."""
        self.notifier = Notifier.from_environment()
        """systemd's Type=notify: READY once running (connected or not), STOPPING, watchdog pings."""
        self.metrics = AgentMetrics() if config.metrics_listen else None
        """Prometheus metrics and /healthz on ``metrics_listen``, when set."""
        self.metrics_port = 0
        self.running = False
        """``run()`` is connecting, connected or draining."""
        self.connected = False
        """A stream to a control plane is open."""
        self._ended: tuple[str, str] | None = None
        """Why the last connection attempt or stream ended (gRPC status code, details), for the log."""

    def _job_facilities(self, runtime: ContainerRuntime) -> JobFacilities | None:
        """The fetch step's egress proxies and the caches: Docker's only."""
        if not isinstance(runtime, DockerRuntime):
            return None
        owner = self._credentials.agent_id
        return JobFacilities(
            EgressProxies(runtime.client, self.config.egress_network, owner),
            Caches(
                runtime.client,
                self.config.caches_index,
                self.config.cache_max_bytes,
                owner,
                self.config.job_user,
            ),
            self._org_and_pool,
        )

    def _org_and_pool(self) -> tuple[str, str]:
        identity = AgentIdentity.from_certificate(self._credentials.certificate)
        return identity.org, identity.pool

    @property
    def agent_id(self) -> str:
        return self._credentials.agent_id

    def _assign(self, job: Assignment) -> str | None:
        """Why the job is refused (the control plane requeues it), or None once it runs."""
        if job.job_id in self._jobs:
            return None  # a replayed assignment of a job already running
        if not self.accepting():
            reason = (
                "the agent is shutting down"
                if self.draining.is_set()
                else "the agent's container engine is not answering"
            )
            log.info("job_refused", job_id=job.job_id, reason=reason)
            return reason
        # Open before the task runs: a hello sent in between must list the job.
        self.outbox.open(job.job_id, job.epoch)
        task = asyncio.create_task(self._executor.run(job), name=f"job-{job.job_id}")
        self._jobs[job.job_id] = task
        task.add_done_callback(lambda _: self._jobs.pop(job.job_id, None))
        log.info("job_received", job_id=job.job_id, epoch=job.epoch, image=job.image)
        return None

    def _cancel(self, job_id: str, reason: str, abandon: bool) -> None:
        if abandon:
            # No longer ours (lease lapsed, reassigned): stop it, say nothing more about it.
            self.outbox.drop(job_id)
            log.warning("job_abandoned", job_id=job_id, reason=reason)
        if not self._executor.cancel(job_id, reason, abandon=abandon):
            self.outbox.drop(job_id)

    def accepting(self) -> bool:
        return not self.draining.is_set() and not self.runtime_down

    def _runtime_unavailable(self) -> None:
        if self.metrics is not None:
            self.metrics.engine_error()
        if self.runtime_down:
            return
        self.runtime_down = True
        self.accepting_changed.set()
        log.warning("container_engine_unavailable", note="taking no jobs until it answers again")
        self._probe = asyncio.create_task(self._wait_for_runtime(), name="runtime-probe")

    async def _wait_for_runtime(self) -> None:
        while True:
            if await self._runtime.ping():
                try:
                    # Containers whose removal failed while the engine was away go now.
                    removed = await self._runtime.remove_leftovers(self.agent_id, keep=frozenset(self._jobs))
                    break
                except RuntimeUnavailable:
                    pass  # gone again
            await asyncio.sleep(RUNTIME_PROBE_INTERVAL.total_seconds())
        self.runtime_down = False
        self.accepting_changed.set()
        log.info("container_engine_available", leftovers_removed=removed)

    def executing(self) -> list[str]:
        """Jobs whose container this agent is running (or setting up, or cleaning up)."""
        return list(self._jobs)

    async def job_done(self, job_id: str) -> None:
        """Until the agent is done with the job's container (at once if it has none)."""
        task = self._jobs.get(job_id)
        if task is not None:
            await asyncio.wait({task})

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    def _update_credentials(self, credentials: Credentials) -> None:
        try:
            credentials.save(self.config.data_dir)
        except OSError as exc:  # a full disk: run on them; the next renewal saves again
            log.warning(
                "credentials_not_saved",
                path=str(self.config.data_dir),
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                error=exc.strerror or str(exc),
                note="running on the new certificate in memory; free space before the agent restarts",
            )
        self._credentials = credentials
        announcement = asyncio.ensure_future(self._announce_credentials())
        self._announcements.add(announcement)
        announcement.add_done_callback(self._announcements.discard)

    async def _announce_credentials(self) -> None:
        async with self.credentials_changed:
            self.credentials_changed.notify_all()

    def check_credentials(self) -> None:
        """SIGHUP: read the credentials files again. A later certificate of this
        agent is used from the next connection on; anything else is reported
        and the credentials in memory stay."""
        try:
            found = Credentials.load(self.config.data_dir)
            expires = found.certificate.not_valid_after_utc
        except (ConfigError, ValueError, OSError) as exc:
            log.error("credentials_unreadable", error=str(exc), note="running on the credentials in memory")
            return
        if found.agent_id != self.agent_id:
            log.error(
                "credentials_of_another_agent",
                found=found.agent_id,
                running_as=self.agent_id,
                note="restart the agent to run as the other one",
            )
            return
        newer = expires > self._credentials.certificate.not_valid_after_utc
        if newer:
            self._credentials = found
            announcement = asyncio.ensure_future(self._announce_credentials())
            self._announcements.add(announcement)
            announcement.add_done_callback(self._announcements.discard)
        expires_at = self._credentials.expires_at
        log.info("credentials_checked", agent_id=self.agent_id, expires_at=expires_at, newer=newer)

    def _trust_bundle(self, bundle_pem: bytes) -> None:
        """Sent on every connection; saved when it differs (a CA rotated in or out)."""
        if bundle_pem == self._credentials.ca_pem:
            log.debug("trust_bundle_unchanged", certificates=bundle_pem.count(b"BEGIN CERTIFICATE"))
            return
        self._update_credentials(replace(self._credentials, ca_pem=bundle_pem))
        log.info(
            "trust_bundle_updated",
            certificates=bundle_pem.count(b"BEGIN CERTIFICATE"),
            fingerprints=bundle_fingerprints(bundle_pem),
        )

    async def _one_session(self, endpoint: str) -> None:
        runtimes = await asyncio.to_thread(self._runtime.runtimes)  # checked once, then cached
        session = Session(
            self.config,
            self._credentials,
            endpoint,
            self.outbox,
            SessionEvents(
                assign=self._assign,
                cancel=self._cancel,
                renewed=self._renewed,
                trust_bundle=self._trust_bundle,
                connected=self._connected,
            ),
            runtimes=runtimes,
            accepting=self.accepting,
            accepting_changed=self.accepting_changed,
        )
        try:
            await session.run()
        finally:
            self.connected = False

    def _renewed(self, credentials: Credentials) -> None:
        if self.metrics is not None:
            self.metrics.certificate_renewed()
        self._update_credentials(credentials)

    def _connected(self, endpoint: str) -> None:
        self.connected = True
        self.endpoints.reached(endpoint)
        self.notifier.status(f"connected to {endpoint}")

    async def run(self) -> None:
        """Until ``shutdown()``, with the metrics port (if any) open throughout."""
        listener = await self.metrics.listen(self) if self.metrics is not None else None
        self.metrics_port = listener.port if listener is not None else 0
        self.running = True
        try:
            await self._run()
        finally:
            self.running = False
            if listener is not None:
                await listener.stop()

    async def _run(self) -> None:
        try:
            removed = await self._runtime.remove_leftovers(self.agent_id)
        except RuntimeUnavailable:
            removed = 0
            self._runtime_unavailable()  # no jobs until it answers; then the leftovers go
        if removed:
            log.warning(
                "leftover_containers_removed",
                count=removed,
                note="jobs of an earlier run of this agent; the control plane has marked them LOST",
            )
        # Which runtimes enforce seccomp, checked before the first hello (they are probed once).
        log.info("runtimes_offered", runtimes=await asyncio.to_thread(self._runtime.runtimes))
        stopper = asyncio.create_task(self._stopping.wait())
        watchdog = asyncio.create_task(self.notifier.keep_watchdog(), name="watchdog")
        # Ready while still trying: a build host boots whether or not the control plane answers.
        self.notifier.ready(f"connecting to {self.endpoints.preferred}")
        try:
            while not self._stopping.is_set():
                runner = asyncio.create_task(self._connect_with_backoff())
                done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if runner not in done:
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                    break
                runner.result()  # CredentialsError ends the agent
        finally:
            stopper.cancel()
            watchdog.cancel()
            await self._stop_jobs()

    async def _connect_with_backoff(self) -> None:
        """Returns when an established session was lost: the next series of
        attempts starts at once again, at the next replica (the same one
        after a certificate renewal)."""
        rotation = self.endpoints.attempts()
        tried: list[str] = []

        def moved_on(state: RetryCallState) -> None:
            rotation.failed()
            self._ended = ended_by(state.outcome.exception() if state.outcome else None)
            if rotation.target != tried[-1]:
                self._failover(tried[-1], rotation.target)

        def before_sleep(state: RetryCallState) -> None:
            code, error = self._ended or ("", "")
            log.warning(
                "controlplane_unreachable",
                endpoint=tried[-1],
                attempt=state.attempt_number,
                next_endpoint=rotation.target,
                retry_in_s=round(state.upcoming_sleep, 2),
                code=code,
                error=error,
            )
            self.notifier.status(f"control plane unreachable; retrying {rotation.target}")

        retrying = AsyncRetrying(
            wait=lambda state: rotation.wait_s(self.config.max_backoff.total_seconds()),
            retry=retry_if_exception_type(grpc.aio.AioRpcError),
            after=moved_on,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    tried.append(rotation.target)
                    code, error = self._ended or ("", "")
                    log.debug(
                        "controlplane_connecting",
                        endpoint=tried[-1],
                        attempt=len(tried),
                        previous_code=code,
                        previous_error=error,
                    )
                    await self._one_session(rotation.target)
        except CertificateRenewed as exc:
            self._ended = (exc.code, str(exc))
            log.info("controlplane_reconnecting", endpoint=tried[-1], reason=str(exc))
        except SessionLost as exc:
            self._ended = (exc.code, str(exc))
            self.endpoints.left(tried[-1])
            log.warning(
                "controlplane_connection_lost",
                endpoint=tried[-1],
                next_endpoint=self.endpoints.preferred,
                code=exc.code,
                error=str(exc),
            )
            if self.endpoints.preferred != tried[-1]:
                self._failover(tried[-1], self.endpoints.preferred)

    def _failover(self, left: str, next_endpoint: str) -> None:
        code, error = self._ended or ("", "")
        log.debug("controlplane_failover", endpoint=left, next_endpoint=next_endpoint, code=code, error=error)

    async def _stop_jobs(self) -> None:
        for task in list(self._jobs.values()):
            task.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    def shutdown(self) -> None:
        """Stop now: running jobs are stopped unreported (they turn LOST when their lease lapses)."""
        self.notifier.stopping()
        self._stopping.set()

    async def drain(self) -> None:
        """Take no new jobs, let running ones finish (up to ``drain_timeout``,
        then cancel them), deliver their results, then stop."""
        if self.draining.is_set():
            return
        self.draining.set()
        self.accepting_changed.set()
        running = list(self._jobs.values())
        self.notifier.stopping(f"draining, jobs running: {len(running)}")
        log.info("agent_draining", jobs=len(running), timeout_s=self.config.drain_timeout.total_seconds())
        if running:
            _, late = await asyncio.wait(running, timeout=self.config.drain_timeout.total_seconds())
            for job_id in self._executor.running():
                self._executor.cancel(job_id, "the agent is shutting down")
            if late:
                await asyncio.wait(late)
        try:
            async with asyncio.timeout(RESULT_DELIVERY_TIMEOUT.total_seconds()):
                await self.outbox.wait_empty()
        except TimeoutError:
            log.warning("agent_drain_undelivered", jobs=list(self.outbox.running()))
        self.shutdown()


def ended_by(error: BaseException | None) -> tuple[str, str]:
    """Why a connection attempt failed, for the log: the gRPC status code and its details."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name, error.details() or ""
    return type(error).__name__, str(error)


def bundle_fingerprints(bundle_pem: bytes) -> list[str]:
    """The bundle's CA certificates by SHA-256 fingerprint, the form the control plane records issuers in."""
    try:
        certificates = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return []
    return [fingerprint(c.public_bytes(Encoding.DER)) for c in certificates]
