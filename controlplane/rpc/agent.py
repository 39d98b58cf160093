"""The agent port: one long-lived Connect stream per agent, identity taken
from the verified client certificate on every stream and RPC."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import structlog
from cryptography import x509

from common.identity import AgentIdentity, IdentityError
from controlplane.ca.authority import CertificateAuthority
from controlplane.errors import ControlPlaneError, NotFound, PermissionDenied, StaleEpoch, Unauthenticated
from controlplane.jobs.model import JobStatus
from controlplane.jobs.scheduler import AgentSession, Assign, Cancel, LogAck, Outbound, ResultAck, Scheduler
from controlplane.jobs.service import JobService
from controlplane.rpc.convert import spec_to_pb, stream_from_pb
from controlplane.rpc.status import code_for, mapped
from controlplane.store.base import Store
from protos.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("testhide.agents")

# Sent as initial metadata once the agent's identity is accepted.
SESSION_ACCEPTED = "testhide-session"

_OUTCOME = {
    agent_pb2.JOB_OUTCOME_TIMED_OUT: JobStatus.TIMED_OUT,
    agent_pb2.JOB_OUTCOME_CANCELED: JobStatus.CANCELED,
    agent_pb2.JOB_OUTCOME_ERROR: JobStatus.ERROR,
}


def peer_certificate(context: grpc.aio.ServicerContext) -> x509.Certificate:
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("a client certificate is required")
    return x509.load_pem_x509_certificate(pems[0])


async def authenticate_agent(context: grpc.aio.ServicerContext, store: Store) -> tuple[AgentIdentity, int]:
    """Re-checked on every stream and RPC: the handshake alone is not enough,
    because a connection outlives the certificate that opened it."""
    cert = peer_certificate(context)
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise Unauthenticated("the agent certificate has expired; enroll the agent again")
    try:
        identity = AgentIdentity.from_certificate(cert)
    except IdentityError as exc:
        raise Unauthenticated(str(exc)) from exc
    record = await store.get_agent(identity.org, identity.agent_id)
    if record is None or record.pool != identity.pool:
        raise PermissionDenied("unknown agent")
    if record.revoked_at is not None:
        raise PermissionDenied("this agent has been revoked")
    return identity, cert.serial_number


def encode(message: Outbound) -> agent_pb2.ControlMessage:
    match message:
        case Assign(job):
            return agent_pb2.ControlMessage(
                assign=agent_pb2.AssignJob(job_id=job.id, epoch=job.epoch, spec=spec_to_pb(job.spec)))
        case Cancel(job_id, reason):
            return agent_pb2.ControlMessage(cancel=agent_pb2.CancelJob(job_id=job_id, reason=reason))
        case LogAck(job_id, seq):
            return agent_pb2.ControlMessage(log_ack=agent_pb2.LogAck(job_id=job_id, seq=seq))
        case ResultAck(job_id):
            return agent_pb2.ControlMessage(result_ack=agent_pb2.ResultAck(job_id=job_id))
    raise TypeError(f"cannot encode {message!r}")


class AgentControlServicer(agent_pb2_grpc.AgentControlServicer):
    def __init__(self, store: Store, scheduler: Scheduler, jobs: JobService, ca: CertificateAuthority,
                 cert_ttl: timedelta) -> None:
        self._ca = ca
        self._cert_ttl = cert_ttl
        self._store = store
        self._scheduler = scheduler
        self._jobs = jobs

    async def Connect(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        try:
            identity, serial = await authenticate_agent(context, self._store)
        except ControlPlaneError as exc:
            await context.abort(code_for(exc), str(exc))
        await context.send_initial_metadata(((SESSION_ACCEPTED, "1"),))
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        session = AgentSession(identity, serial, max_jobs=max(1, min(first.hello.max_jobs or 1, 64)))
        bound = log.bind(agent_id=identity.agent_id, org=identity.org, pool=identity.pool)
        await self._store.touch_agent(identity.org, identity.agent_id, datetime.now(UTC))
        await self._jobs.on_hello(session, {r.job_id: r.epoch for r in first.hello.running_jobs})
        self._scheduler.attach(session)
        bound.info("agent_connected", max_jobs=session.max_jobs)
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read(session, context))
                writer = tasks.create_task(self._write(session, context))
                await session.closed.wait()
                reader.cancel()
                writer.cancel()
        finally:
            self._scheduler.detach(session)
            bound.info("agent_disconnected")

    async def _write(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            await context.write(encode(await session.outbox.get()))

    async def _read(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                await self._handle(session, message)
        finally:
            session.closed.set()

    async def _handle(self, session: AgentSession, message: agent_pb2.AgentMessage) -> None:
        kind = message.WhichOneof("body")
        try:
            match kind:
                case "heartbeat":
                    await self._store.touch_agent(session.identity.org, session.identity.agent_id,
                                                  datetime.now(UTC))
                case "accepted":
                    pass  # the assignment reached the agent; RUNNING comes with "started"
                case "started":
                    await self._jobs.on_started(session, message.started.job_id, message.started.epoch)
                case "log_batch":
                    b = message.log_batch
                    entries = [(stream_from_pb(e.stream), e.data) for e in b.entries]
                    await self._jobs.on_log_batch(session, b.job_id, b.epoch, b.seq, entries)
                case "result":
                    r = message.result
                    status = _OUTCOME.get(r.outcome) or (JobStatus.SUCCEEDED if r.exit_code == 0
                                                         else JobStatus.FAILED)
                    exit_code = r.exit_code if r.outcome in (agent_pb2.JOB_OUTCOME_EXITED,
                                                             agent_pb2.JOB_OUTCOME_TIMED_OUT,
                                                             agent_pb2.JOB_OUTCOME_CANCELED) else None
                    await self._jobs.on_result(session, r.job_id, r.epoch, r.last_seq, status, exit_code, r.reason)
                case _:
                    log.warning("agent_message_ignored", kind=kind, agent_id=session.identity.agent_id)
        except ControlPlaneError as exc:
            # A message about a job this agent no longer holds: tell it to stop.
            log.warning("agent_message_refused", kind=kind, agent_id=session.identity.agent_id, error=str(exc))
            job_id = getattr(getattr(message, kind), "job_id", "")
            if job_id and isinstance(exc, (StaleEpoch, NotFound)):
                session.send(Cancel(job_id, str(exc)))

    @mapped
    async def Renew(self, request: agent_pb2.RenewRequest, context: grpc.aio.ServicerContext
                    ) -> agent_pb2.RenewResponse:
        """A new certificate for the same identity and a new key, authorised by
        the current, still valid certificate."""
        identity, _ = await authenticate_agent(context, self._store)
        issued = self._ca.issue_agent(request.csr_pem, identity, self._cert_ttl)
        await self._store.record_agent_certificate(identity.org, identity.agent_id, format(issued.serial, "x"),
                                                   issued.not_after)
        log.info("agent_certificate_renewed", agent_id=identity.agent_id, serial=format(issued.serial, "x"),
                 not_after=issued.not_after.isoformat())
        return agent_pb2.RenewResponse(certificate_pem=issued.certificate_pem,
                                       ca_bundle_pem=self._ca.certificate_pem)
