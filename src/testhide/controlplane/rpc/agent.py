"""The agent port: one long-lived Connect stream per agent, identity taken
from the verified client certificate on every stream and RPC."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from testhide.common.identity import AgentIdentity
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.ca.renewal import Renewals, Renewed
from testhide.controlplane.ca.signer import Signer
from testhide.controlplane.ca.store import AgentHello, AgentStore
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.errors import (
    ControlPlaneError,
    InvalidArgument,
    NotHeld,
    PermissionDenied,
    StorageUnavailable,
    Unauthenticated,
)
from testhide.controlplane.jobs.model import JobReport
from testhide.controlplane.jobs.scheduler import (
    AgentSession,
    Cancel,
    RenewAnswer,
    Scheduler,
    TrustBundle,
)
from testhide.controlplane.jobs.service import JobService
from testhide.controlplane.rpc.agent_auth import (
    EXPIRED,
    UNTRUSTED_CA,
    VerifiedAgent,
    authenticate_agent,
    read_message,
)
from testhide.controlplane.rpc.agent_wire import ARTIFACT_KINDS, announced_version, batched, encode, report_of
from testhide.controlplane.rpc.convert import (
    check_agent_message,
    check_artifact_header,
    check_lease,
    fetch_from_pb,
    stream_from_pb,
)
from testhide.controlplane.rpc.guard import INTERNAL_ERROR
from testhide.controlplane.rpc.status import code_for, mapped
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2

if TYPE_CHECKING:
    from testhide.controlplane.metrics import ControlPlaneMetrics

log = structlog.get_logger("testhide.agents")

# Sent as initial metadata once the agent's identity is accepted, with the
# heartbeat interval that keeps its job leases alive.
SESSION_ACCEPTED = "testhide-session"
HEARTBEAT_INTERVAL = "testhide-heartbeat-ms"
# Tells the agent that this control plane reads AgentMessage.batch (an older one would drop it).
READS_BATCHES = "testhide-batches"
# Tells the agent that this control plane answers AgentMessage.renew (an older one would drop it).
RENEWS = "testhide-renews"


def _stream_fields(session: AgentSession, peer: str) -> dict[str, str]:
    """What the log says of every stream's connect and disconnect (made for each line, not
    held by ten thousand idle streams as a bound logger)."""
    identity = session.identity
    return {
        "agent_id": identity.agent_id,
        "org": identity.org,
        "pool": identity.pool,
        "serial": format(session.cert_serial, "x"),
        "peer": peer,
    }


_RUNTIME_SETS: dict[frozenset[str], frozenset[str]] = {}
"""One frozenset (200 bytes and more) per set of runtimes agents offer, not one per stream."""
MAX_RUNTIME_SETS = 256


def _shared_runtimes(runtimes: frozenset[str]) -> frozenset[str]:
    shared = _RUNTIME_SETS.get(runtimes)
    if shared is None:
        if len(_RUNTIME_SETS) >= MAX_RUNTIME_SETS:
            return runtimes
        shared = _RUNTIME_SETS[runtimes] = runtimes
    return shared


class AgentControlServicer(agent_pb2_grpc.AgentControlServicer):
    def __init__(
        self,
        store: AgentStore,
        scheduler: Scheduler,
        jobs: JobService,
        certs: CertificateState,
        cert_ttl: timedelta,
        auditor: Auditor,
        heartbeat_interval: timedelta,
        metrics: ControlPlaneMetrics | None = None,
        signer: Signer | None = None,
    ) -> None:
        self._heartbeat_ms = str(int(heartbeat_interval.total_seconds() * 1000))
        self._metrics = metrics
        self._store = store
        self._scheduler = scheduler
        self._jobs = jobs
        self._certs = certs
        self._renewals = Renewals(store, certs, cert_ttl, auditor, signer)
        self._pending: set[asyncio.Future[None]] = set()
        """Detaching streams and renewals asked on streams, held until done: the event
        loop keeps only weak references to tasks."""

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> VerifiedAgent:
        try:
            return await authenticate_agent(context, self._store, self._certs)
        except (Unauthenticated, PermissionDenied) as exc:
            if self._metrics is not None:
                self._metrics.agent_refused()
            log.warning("agent_refused", reason=str(exc), peer=context.peer())
            raise

    # grpc.aio also serves a stream as a coroutine that reads and writes through its context, which
    # mypy-protobuf's stub (iterators only) cannot express.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
    ) -> None:
        try:
            agent = await self._authenticate(context)
        except ControlPlaneError as exc:
            await context.abort(code_for(exc), str(exc))
        await context.send_initial_metadata(
            (
                (SESSION_ACCEPTED, "1"),
                (HEARTBEAT_INTERVAL, self._heartbeat_ms),
                (READS_BATCHES, "1"),
                (RENEWS, "1"),
            )
        )
        first = await read_message(context)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        identity = agent.identity
        hello = first.hello
        running = {r.job_id: r.epoch for r in hello.running_jobs}
        version = announced_version(hello.version)
        host = hello.host
        session = AgentSession(
            identity,
            agent.certificate.serial_number,
            agent.certificate.not_valid_after_utc,
            agent.issuer,
            max_jobs=max(1, min(hello.max_jobs or 1, 64)),
            labels=dict(list(hello.labels.items())[:64]),
            runtimes=_shared_runtimes(frozenset(hello.runtimes or ["runc"])),
            reads_batches=hello.reads_batches,
        )
        # This frame lives as long as the stream: keep what the session needs, not the
        # parsed certificate and hello (a few KiB each, times ten thousand streams).
        del agent, first, hello
        peer = context.peer()
        try:
            offer = AgentHello.shown(version, session.labels, list(session.runtimes), session.max_jobs, host)
            await self._store.touch_agent(identity.org, identity.agent_id, datetime.now(UTC), offer)
            await self._jobs.on_hello(session, running)
        except ControlPlaneError as exc:
            await context.abort(code_for(exc), str(exc))
        session.send(TrustBundle(self._certs.current.bundle_pem))
        self._scheduler.attach(session)
        log.info(
            "agent_connected",
            **_stream_fields(session, peer),
            max_jobs=session.max_jobs,
            version=version,
            running_jobs=len(running),
            not_after=session.cert_not_after.isoformat(),
        )
        del running, offer, version, host  # the frame lives as long as the stream
        opened = time.monotonic()
        try:
            # Other replicas forward cancels for this agent's jobs here.
            await self._scheduler.cluster.agent_attached(identity.org, identity.agent_id)
            await self._serve(session, context)
        finally:
            self._scheduler.detach(session)
            # Logged first: the cancellation below may end this handler before anything after it.
            code, reason = session.close_reason or ("", self._why_ended(session))
            connected_s = round(time.monotonic() - opened, 1)
            fields = _stream_fields(session, peer)
            log.info("agent_disconnected", **fields, code=code, reason=reason, connected_s=connected_s)
            if self._scheduler.session_of(identity.agent_id) is None:  # not replaced by a newer stream
                # grpc cancels this handler once the call has ended, maybe while these writes are
                # under way: they finish all the same (a stale mark would show it connected).
                detached = self._hold(self._stream_ended(identity))
                await asyncio.shield(detached)
        if session.close_reason:
            code, message = session.close_reason
            await context.abort(grpc.StatusCode[code], message)

    def _hold(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """``work`` as a task of its own, kept until it ends."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def _why_ended(self, session: AgentSession) -> str:
        """For the log, when the control plane gave no status of its own."""
        if self._scheduler.session_of(session.identity.agent_id) not in (None, session):
            return "replaced by a newer stream of the same agent"
        return "the stream ended: the agent closed it or the connection broke"

    async def _stream_ended(self, identity: AgentIdentity) -> None:
        """The agent's last stream here ended: other replicas stop forwarding its
        cancels here, and ``agents list`` shows it disconnected."""
        with contextlib.suppress(ControlPlaneError):
            await self._scheduler.cluster.agent_detached(identity.agent_id)
        with contextlib.suppress(ControlPlaneError):
            await self._store.agent_disconnected(identity.org, identity.agent_id, datetime.now(UTC))

    async def _serve(
        self,
        session: AgentSession,
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
    ) -> None:
        """Reads in the handler's own task, writes in one more; the session's
        interrupt (revocation, a newer stream, a failed write) and a timer for
        the certificate's end stop it. Ten thousand idle streams each hold
        only what they need."""
        reading = asyncio.current_task()
        assert reading is not None
        # An open stream must not outlive the certificate it was opened with.
        remaining = (session.cert_not_after - datetime.now(UTC)).total_seconds()
        expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), self._expired, session)
        writer = asyncio.create_task(self._write(session, context))
        writer.add_done_callback(functools.partial(self._writer_done, session))
        session.interrupt = reading.cancel
        try:
            if not session.closed.is_set():
                await self._read(session, context)
        except asyncio.CancelledError:
            if not session.closed.is_set():
                raise  # the call itself was cancelled
            reading.uncancel()  # we stopped it: end the stream with the session's status
        finally:
            session.interrupt = None
            expiry.cancel()
            writer.cancel()

    @staticmethod
    def _expired(session: AgentSession) -> None:
        session.close("UNAUTHENTICATED", "the agent certificate has expired; reconnect with a renewed one")
        log.info(
            "agent_session_closed",
            agent_id=session.identity.agent_id,
            reason="certificate_expired",
            serial=format(session.cert_serial, "x"),
        )

    @staticmethod
    def _writer_done(session: AgentSession, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.info(
                "agent_stream_write_failed", agent_id=session.identity.agent_id, error=str(task.exception())
            )
        session.end()

    async def _write(
        self,
        session: AgentSession,
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
    ) -> None:
        outbox = session.outbox
        while True:
            taken = outbox.take()
            if taken is None:
                await outbox.arrival()
                continue
            message = encode(taken)
            if session.reads_batches and len(outbox):
                message = batched(message, session)
            await context.write(message)

    async def _read(
        self,
        session: AgentSession,
        context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
    ) -> None:
        try:
            while True:
                # Not read_message: one coroutine less held by each idle stream.
                message: object = await context.read()
                if not isinstance(message, agent_pb2.AgentMessage):
                    return  # grpc.aio.EOF: the agent closed its side
                await self._handle(session, message, context)
        finally:
            session.closed.set()

    async def _handle(
        self,
        session: AgentSession,
        message: agent_pb2.AgentMessage,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        kind = message.WhichOneof("body")
        try:
            check_agent_message(message)
            match kind:
                case "batch":
                    await self._handle_batch(session, message.batch.messages, context)
                case "heartbeat":
                    h = message.heartbeat
                    await self._store.touch_agent(
                        session.identity.org, session.identity.agent_id, datetime.now(UTC)
                    )
                    await self._jobs.on_heartbeat(
                        session, {r.job_id: r.epoch for r in h.running_jobs}, h.draining
                    )
                case "refused":
                    refusal = message.refused
                    await self._jobs.on_refused(session, refusal.job_id, refusal.epoch, refusal.reason)
                case "accepted":
                    pass  # the assignment reached the agent; RUNNING comes with "started"
                case "fetched":
                    f = message.fetched
                    await self._jobs.on_fetched(session, f.job_id, f.epoch, fetch_from_pb(f.fetch))
                case "started" | "result":
                    await self._reports(session, [(kind, report_of(session, message))])
                case "log_batch":
                    b = message.log_batch
                    entries = [(stream_from_pb(e.stream), e.data) for e in b.entries]
                    await self._jobs.on_log_batch(session, b.job_id, b.epoch, b.seq, entries)
                case "renew":
                    self._renew_on_stream(session, message.renew.csr_pem, context.peer())
                case _:
                    log.warning("agent_message_ignored", kind=kind, agent_id=session.identity.agent_id)
        except ControlPlaneError as exc:
            _refuse(session, kind, exc)

    async def _handle_batch(
        self,
        session: AgentSession,
        messages: Iterable[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """In order, as if sent one by one; consecutive RUNNING and result reports are
        written together (one transaction with other streams' reports)."""
        reports: list[tuple[str, JobReport]] = []
        for message in messages:
            if session.closed.is_set():
                return  # the stream ends (the store is unavailable): the agent replays the rest
            kind = message.WhichOneof("body")
            if kind in ("started", "result"):
                try:
                    check_agent_message(message)
                    reports.append((str(kind), report_of(session, message)))
                except ControlPlaneError as exc:
                    _refuse(session, kind, exc)
                continue
            await self._reports(session, reports)
            reports = []
            if kind in ("hello", "batch"):
                log.warning("agent_message_ignored", kind=kind, agent_id=session.identity.agent_id)
            elif not session.closed.is_set():
                await self._handle(session, message, context)
        await self._reports(session, reports)

    async def _reports(self, session: AgentSession, reports: list[tuple[str, JobReport]]) -> None:
        if not reports:
            return
        try:
            refusals = await self._jobs.on_reports(session, [report for _, report in reports])
        except ControlPlaneError as exc:
            _refuse(session, "batch", exc)
            return
        for (kind, _), refusal in zip(reports, refusals, strict=True):
            if refusal is not None:
                _refuse(session, kind, refusal)

    @mapped
    async def Renew(
        self,
        request: agent_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[agent_pb2.RenewRequest, agent_pb2.RenewResponse],
    ) -> agent_pb2.RenewResponse:
        """A new certificate for the same identity and a new key, authorised by
        the current, still valid certificate."""
        agent = await self._authenticate(context)
        renewed = await self._renewals.renew(agent.identity, request.csr_pem, context.peer())
        self._renewed(agent.identity, agent.certificate.serial_number, renewed, context.peer(), "rpc")
        return agent_pb2.RenewResponse(
            certificate_pem=renewed.certificate_pem, ca_bundle_pem=renewed.ca_bundle_pem
        )

    def _renew_on_stream(self, session: AgentSession, csr_pem: bytes, peer: str) -> None:
        """AgentMessage.renew: what Renew does, answered on the stream, without a call to set
        up and a certificate to check again (~0.9 ms of the event loop's time a call, more
        than the CA's signing: benchmarks/notes.py). The stream was opened with a certificate
        checked then and is ended at once when it expires, its agent is revoked or its CA
        retired; the renewal's transaction checks the agent's row again. One at a time per
        stream; it runs beside the stream's other messages, which do not wait for it."""
        if session.renewing:
            why = "a renewal of this agent is under way on this stream: wait for its answer"
            session.send(RenewAnswer(refused=(grpc.StatusCode.RESOURCE_EXHAUSTED.name, why)))
            return
        session.renewing = True
        self._hold(self._renew_for(session, csr_pem, peer))

    async def _renew_for(self, session: AgentSession, csr_pem: bytes, peer: str) -> None:
        identity = session.identity
        try:
            if session.cert_not_after <= datetime.now(UTC):
                raise Unauthenticated(EXPIRED)
            if session.cert_issuer not in self._certs.current.trusted_fingerprints:
                raise Unauthenticated(UNTRUSTED_CA)
            renewed = await self._renewals.renew(identity, csr_pem, peer)
        except ControlPlaneError as exc:
            log.warning("agent_renewal_refused", agent_id=identity.agent_id, error=str(exc), peer=peer)
            session.send(RenewAnswer(refused=(code_for(exc).name, str(exc))))
            return
        except Exception:
            log.exception("agent_renewal_failed", agent_id=identity.agent_id, peer=peer)
            session.send(RenewAnswer(refused=(grpc.StatusCode.INTERNAL.name, INTERNAL_ERROR)))
            return
        finally:
            session.renewing = False
        self._renewed(identity, session.cert_serial, renewed, peer, "stream")
        session.send(RenewAnswer(renewed.certificate_pem, renewed.ca_bundle_pem))

    def _renewed(
        self, identity: AgentIdentity, old_serial: int, renewed: Renewed, peer: str, via: str
    ) -> None:
        log.info(
            "agent_certificate_renewed",
            agent_id=identity.agent_id,
            org=identity.org,
            old_serial=format(old_serial, "x"),
            serial=renewed.serial,
            not_after=renewed.not_after.isoformat(),
            peer=peer,
            via=via,
        )
        if self._metrics is not None:
            self._metrics.certificate_renewed()

    @mapped
    async def FetchWorkspace(
        self,
        request: agent_pb2.JobLease,
        context: grpc.aio.ServicerContext[agent_pb2.JobLease, jobs_pb2.DataChunk],
    ) -> AsyncIterator[jobs_pb2.DataChunk]:
        agent = await self._authenticate(context)
        check_lease(request.job_id, request.epoch)
        async for chunk in self._jobs.workspace_for(agent.identity, request.job_id, request.epoch):
            yield jobs_pb2.DataChunk(data=chunk)

    @mapped
    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[agent_pb2.ArtifactUpload],
        context: grpc.aio.ServicerContext[agent_pb2.ArtifactUpload, agent_pb2.ArtifactStored],
    ) -> agent_pb2.ArtifactStored:
        agent = await self._authenticate(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("an artifact upload starts with its header")
        header = first.header
        check_artifact_header(header)
        if header.kind not in ARTIFACT_KINDS:
            raise InvalidArgument("unknown artifact kind")

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                yield message.data

        info = await self._jobs.store_artifact(
            agent.identity,
            header.job_id,
            header.epoch,
            header.path,
            ARTIFACT_KINDS[header.kind],
            header.sha256,
            chunks(),
        )
        return agent_pb2.ArtifactStored(path=info.path)


def _refuse(session: AgentSession, kind: str | None, exc: ControlPlaneError) -> None:
    """What an agent message that was not taken does to the stream."""
    if isinstance(exc, StorageUnavailable):
        # Nothing was stored or acknowledged: the agent reconnects (with backoff) and replays.
        log.warning("agent_session_deferred", agent_id=session.identity.agent_id, error=str(exc))
        session.close("UNAVAILABLE", str(exc))
    elif isinstance(exc, NotHeld):
        # Not this agent's job at that epoch (another's, taken back, or none at all): one
        # answer for each. A stale holder stops it and reports nothing more.
        log.warning("agent_message_refused", kind=kind, agent_id=session.identity.agent_id, job_id=exc.job_id)
        session.jobs.discard(exc.job_id)
        session.send(Cancel(exc.job_id, str(exc), abandon=True))
    else:
        log.warning("agent_message_refused", kind=kind, agent_id=session.identity.agent_id, error=str(exc))
