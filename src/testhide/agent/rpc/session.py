"""One connection to one control-plane replica: the Connect stream,
heartbeats, and certificate renewal (on that replica, which has just
answered). Jobs outlive sessions; the outbox replays their reports on the
next one, on whichever replica that is."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import structlog

from testhide import __version__
from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.errors import CredentialsError
from testhide.agent.model import Assignment
from testhide.agent.outbox import Outbox
from testhide.agent.rpc.convert import assignment_from_pb, report_to_pb
from testhide.common.tls import secure_channel
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("testhide.agent.session")

SESSION_ACCEPTED = "testhide-session"
HEARTBEAT_INTERVAL = "testhide-heartbeat-ms"
READS_BATCHES = "testhide-batches"
"""In the control plane's initial metadata: it reads AgentMessage.batch."""
RENEWS = "testhide-renews"
"""In the control plane's initial metadata: it answers AgentMessage.renew on the stream."""
RENEW_TIMEOUT_S = 30
COALESCE_S = 0.002
"""How long a small report waits for others to share its message (a job's start and
its result, results of jobs ending together): fewer, larger messages."""
MAX_BATCH_BYTES = 1024 * 1024
_COALESCED = frozenset({"started", "result", "refused", "fetched"})
MIN_HEARTBEAT_S = 0.1
FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class SessionLost(Exception):
    """The stream ended after it was established; reconnect at once, to the next replica."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
        """The gRPC status code that ended the stream, if one did."""


class CertificateRenewed(SessionLost):
    """The session ended to present a new certificate; reconnect at once, to the same replica."""


@dataclass(frozen=True)
class SessionEvents:
    """What the session hands to the daemon."""

    assign: Callable[[Assignment], str | None]
    """Why the assignment is refused (draining, container engine down), or None to run it."""
    cancel: Callable[[str, str, bool], None]
    """job id, reason, abandon (the job is no longer ours: report nothing more)."""
    renewed: Callable[[Credentials], None]
    trust_bundle: Callable[[bytes], None]
    connected: Callable[[str], None] = lambda endpoint: None
    """The replica at this agent endpoint accepted the stream."""


class Session:
    def __init__(
        self,
        config: AgentConfig,
        credentials: Credentials,
        endpoint: str,
        outbox: Outbox,
        events: SessionEvents,
        runtimes: list[str] | None = None,
        rng: random.Random | None = None,
        accepting: Callable[[], bool] = lambda: True,
        accepting_changed: asyncio.Event | None = None,
    ) -> None:
        self._runtimes = runtimes or ["runc"]
        self._accepting = accepting
        self._accepting_changed = accepting_changed or asyncio.Event()
        self._heartbeat_s = config.heartbeat_interval.total_seconds()
        self._config = config
        self._credentials = credentials
        self._endpoint = endpoint
        self._outbox = outbox
        self._events = events
        self._rng = rng or random.SystemRandom()
        self._renewal: asyncio.Future[agent_pb2.RenewResponse] | None = None
        """The answer to the renewal asked on the stream, while it is awaited."""
        self.established = False

    async def run(self) -> None:
        """Raises AioRpcError before the stream is established, SessionLost
        after, CredentialsError when enrolling again is the only way out."""
        creds = self._credentials
        if creds.expired:
            raise CredentialsError(
                f"the agent certificate expired at {creds.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                "enroll this agent again with a new token"
            )
        async with secure_channel(
            self._endpoint,
            creds.ca_pem,
            client_key_pem=creds.key_pem,
            client_cert_pem=creds.certificate_pem,
        ) as channel:
            stub = agent_pb2_grpc.AgentControlStub(channel)
            call = stub.Connect()
            outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
            hello = agent_pb2.Hello(
                max_jobs=self._config.max_jobs,
                version=__version__,
                labels=self._config.labels,
                runtimes=self._runtimes,
                host=socket.gethostname(),
                reads_batches=True,
                running_jobs=[
                    agent_pb2.RunningJob(job_id=j, epoch=e) for j, e in self._outbox.running().items()
                ],
            )
            outgoing.put_nowait(agent_pb2.AgentMessage(hello=hello))
            try:
                metadata = await self._await_acceptance(call)
                self._heartbeat_s = self._heartbeat_interval(metadata)
                batches = metadata.get(READS_BATCHES) == "1"
                renews_on_stream = metadata.get(RENEWS) == "1"
                self.established = True
                log.info("agent_connected", endpoint=self._endpoint, agent_id=creds.agent_id)
                self._events.connected(self._endpoint)
                self._outbox.attach(lambda report: outgoing.put_nowait(report_to_pb(report)))
                tasks = [
                    asyncio.create_task(self._read(call, outgoing), name="read"),
                    asyncio.create_task(self._write(call, outgoing, batches), name="write"),
                    asyncio.create_task(self._heartbeat(outgoing), name="heartbeat"),
                    asyncio.create_task(self._renew(stub, outgoing, renews_on_stream), name="renew"),
                ]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                error = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
                if error is None:
                    raise SessionLost("the control plane closed the stream", code="OK")
                raise error
            except grpc.aio.AioRpcError as error:
                if error.code() in FATAL:
                    raise CredentialsError(
                        f"the control plane refused this agent: {error.details()}"
                    ) from error
                if self.established:
                    raise SessionLost(
                        f"connection lost: {error.code().name} {error.details()}", code=error.code().name
                    ) from error
                raise
            finally:
                self._outbox.detach()
                call.cancel()

    def _heartbeat_interval(self, metadata: dict[str, str]) -> float:
        """Ours, or shorter if the control plane's leases need it."""
        try:
            asked = int(metadata.get(HEARTBEAT_INTERVAL, "0")) / 1000
        except ValueError:
            asked = 0
        interval = min(self._config.heartbeat_interval.total_seconds(), asked or float("inf"))
        return max(MIN_HEARTBEAT_S, interval)

    @staticmethod
    async def _await_acceptance(
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
    ) -> dict[str, str]:
        """The server sends a marker in its initial metadata once it has
        accepted our identity; anything else is the call's error."""
        metadata = await call.initial_metadata()
        if metadata is not None and any(key == SESSION_ACCEPTED for key, _ in metadata):
            return {key: value for key, value in metadata if isinstance(value, str)}
        code, details = await call.code(), await call.details()
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await call.trailing_metadata(), details)

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
        outgoing: asyncio.Queue[agent_pb2.AgentMessage],
        batches: bool = False,
    ) -> None:
        while True:
            message = await outgoing.get()
            if batches:
                message = await _coalesce(message, outgoing)
            try:
                await call.write(message)
            except asyncio.InvalidStateError:
                # The control plane ended the call (e.g. UNAVAILABLE): its status says why.
                code, details = await call.code(), await call.details()
                raise grpc.aio.AioRpcError(
                    code, grpc.aio.Metadata(), await call.trailing_metadata(), details
                ) from None

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage],
        outgoing: asyncio.Queue[agent_pb2.AgentMessage],
    ) -> None:
        async for message in call:
            if message.WhichOneof("body") == "batch":
                for inner in message.batch.messages:
                    self._on_message(inner, outgoing)
            else:
                self._on_message(message, outgoing)

    def _on_message(
        self, message: agent_pb2.ControlMessage, outgoing: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> None:
        match message.WhichOneof("body"):
            case "assign":
                a = message.assign
                refusal = self._events.assign(assignment_from_pb(a))
                if refusal is not None:
                    outgoing.put_nowait(
                        agent_pb2.AgentMessage(
                            refused=agent_pb2.JobRefused(job_id=a.job_id, epoch=a.epoch, reason=refusal)
                        )
                    )
            case "cancel":
                c = message.cancel
                self._events.cancel(c.job_id, c.reason, c.abandon)
            case "trust_bundle":
                self._events.trust_bundle(message.trust_bundle.ca_bundle_pem)
            case "log_ack":
                self._outbox.ack_log(message.log_ack.job_id, message.log_ack.seq)
            case "result_ack":
                self._outbox.ack_result(message.result_ack.job_id)
            case "renewed":
                if self._renewal is not None and not self._renewal.done():
                    self._renewal.set_result(message.renewed)
            case "renew_refused":
                if self._renewal is not None and not self._renewal.done():
                    refused = message.renew_refused
                    code = grpc.StatusCode.__members__.get(refused.code, grpc.StatusCode.UNKNOWN)
                    self._renewal.set_exception(_rpc_error(code, refused.message))

    async def _heartbeat(self, outgoing: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        """Keeps the leases of our jobs; tells the control plane at once when we
        stop or start taking jobs (draining, container engine down or back)."""
        announced: bool | None = None
        while True:
            if announced == self._accepting():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat_s):
                        await self._accepting_changed.wait()
                self._accepting_changed.clear()
            announced = self._accepting()
            outgoing.put_nowait(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(
                        draining=not announced,
                        running_jobs=[
                            agent_pb2.RunningJob(job_id=j, epoch=e) for j, e in self._outbox.running().items()
                        ],
                    )
                )
            )

    async def _renew(
        self,
        stub: agent_pb2_grpc.AgentControlAsyncStub,
        outgoing: asyncio.Queue[agent_pb2.AgentMessage],
        on_stream: bool,
    ) -> None:
        """At half-life with jitter: a new key, a new certificate (asked on the stream
        where the control plane answers there, else with the Renew RPC), then end this
        session so the next connection presents it. Jobs run on; the outbox replays
        whatever this connection had not acknowledged."""
        jitter = self._rng.uniform(-0.1, 0.1)
        at = self._credentials.renewal_at(jitter)
        serial = format(self._credentials.certificate.serial_number, "x")
        delay_s = max(0.0, (at - datetime.now(UTC)).total_seconds())
        log.debug(
            "agent_certificate_renewal_scheduled",
            endpoint=self._endpoint,
            serial=serial,
            at=at.isoformat(),
            in_s=round(delay_s, 1),
            jitter=round(jitter, 3),
        )
        await asyncio.sleep(delay_s)
        log.debug("agent_certificate_renewal_started", endpoint=self._endpoint, serial=serial)
        started = time.monotonic()
        key_pem, csr_pem = new_key_and_csr()
        try:
            if on_stream:
                response = await self._renew_on_stream(csr_pem, outgoing)
            else:
                response = await stub.Renew(agent_pb2.RenewRequest(csr_pem=csr_pem), timeout=RENEW_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            log.warning(
                "agent_certificate_renewal_failed",
                endpoint=self._endpoint,
                serial=serial,
                code=error.code().name,
                error=error.details(),
            )
            raise
        renewed = self._credentials.with_certificate(
            key_pem, response.certificate_pem, response.ca_bundle_pem or None
        )
        self._events.renewed(renewed)
        certificate = renewed.certificate
        log.info(
            "agent_certificate_renewed",
            agent_id=renewed.agent_id,
            endpoint=self._endpoint,
            old_serial=serial,
            serial=format(certificate.serial_number, "x"),
            not_after=certificate.not_valid_after_utc.isoformat(),
            took_s=round(time.monotonic() - started, 3),
        )
        raise CertificateRenewed("certificate renewed; reconnecting with it")

    async def _renew_on_stream(
        self, csr_pem: bytes, outgoing: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> agent_pb2.RenewResponse:
        """AgentMessage.renew, answered on the stream: the certificate, or the refusal
        raised as the RPC would raise it."""
        answer: asyncio.Future[agent_pb2.RenewResponse] = asyncio.get_running_loop().create_future()
        self._renewal = answer
        outgoing.put_nowait(agent_pb2.AgentMessage(renew=agent_pb2.RenewRequest(csr_pem=csr_pem)))
        try:
            async with asyncio.timeout(RENEW_TIMEOUT_S):
                return await answer
        except TimeoutError:
            why = f"no answer to the renewal within {RENEW_TIMEOUT_S} s"
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, why) from None
        finally:
            self._renewal = None


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def _coalesce(
    first: agent_pb2.AgentMessage, outgoing: asyncio.Queue[agent_pb2.AgentMessage]
) -> agent_pb2.AgentMessage:
    """``first`` with what else is queued (after a moment, for a small report), as one
    batch (or ``first`` alone), past MAX_BATCH_BYTES by one message at most (a log batch
    is at most 2 MiB, the control plane takes 8). Log batches and heartbeats do not
    wait: the log path keeps its pace."""
    kind = first.WhichOneof("body")
    if kind == "hello":
        return first  # alone: the control plane reads it first, before anything else
    if kind in _COALESCED and outgoing.empty():
        await asyncio.sleep(COALESCE_S)
    messages, size = [first], first.ByteSize()
    while size < MAX_BATCH_BYTES and not outgoing.empty():
        messages.append(outgoing.get_nowait())
        size += messages[-1].ByteSize()
    if len(messages) == 1:
        return first
    batch = agent_pb2.AgentMessage()
    for message in messages:  # copied in place (a constructor would copy each message twice)
        batch.batch.messages.add().CopyFrom(message)
    return batch
