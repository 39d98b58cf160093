"""One connection to the control plane: the Connect stream, heartbeats, and
certificate renewal. Jobs outlive sessions; the outbox replays their reports
on the next one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import structlog

from agent.config import AgentConfig
from agent.credentials import Credentials, new_key_and_csr
from agent.errors import CredentialsError
from agent.model import Assignment
from agent.outbox import Outbox
from agent.rpc.convert import assignment_from_pb, report_to_pb
from common.tls import secure_channel
from protos.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("testhide.agent.session")

SESSION_ACCEPTED = "testhide-session"
FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class SessionLost(Exception):
    """The stream ended after it was established; reconnect at once."""


def renewal_delay(credentials: Credentials, now: datetime, rng: random.Random) -> float:
    """Seconds until renewal: half the lifetime, +-10% of it as jitter."""
    cert = credentials.certificate
    lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    at = cert.not_valid_before_utc.timestamp() + lifetime * (0.5 + rng.uniform(-0.1, 0.1))
    return max(0.0, at - now.timestamp())


class Session:
    def __init__(self, config: AgentConfig, credentials: Credentials, outbox: Outbox,
                 on_assign: Callable[[Assignment], None], on_cancel: Callable[[str, str], None],
                 on_renewed: Callable[[Credentials], None]) -> None:
        self._on_renewed = on_renewed
        self._config = config
        self._credentials = credentials
        self._outbox = outbox
        self._on_assign = on_assign
        self._on_cancel = on_cancel
        self.established = False

    async def run(self) -> None:
        """Raises AioRpcError before the stream is established, SessionLost
        after, CredentialsError when enrolling again is the only way out."""
        creds = self._credentials
        if creds.expired:
            raise CredentialsError(
                f"the agent certificate expired at {creds.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; "
                "enroll this agent again with a new token")
        async with secure_channel(creds.agent_endpoint, creds.ca_pem, client_key_pem=creds.key_pem,
                                  client_cert_pem=creds.certificate_pem) as channel:
            stub = agent_pb2_grpc.AgentControlStub(channel)
            call = stub.Connect()
            outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
            hello = agent_pb2.Hello(max_jobs=self._config.max_jobs, version="0.1.0", running_jobs=[
                agent_pb2.RunningJob(job_id=j, epoch=e) for j, e in self._outbox.running().items()])
            outgoing.put_nowait(agent_pb2.AgentMessage(hello=hello))
            try:
                await self._await_acceptance(call)
                self.established = True
                log.info("agent_connected", endpoint=creds.agent_endpoint, agent_id=creds.agent_id)
                self._outbox.attach(lambda report: outgoing.put_nowait(report_to_pb(report)))
                tasks = [asyncio.create_task(self._read(call), name="read"),
                         asyncio.create_task(self._write(call, outgoing), name="write"),
                         asyncio.create_task(self._heartbeat(outgoing), name="heartbeat"),
                         asyncio.create_task(self._renew(stub), name="renew")]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                error = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
                if error is None:
                    raise SessionLost("the control plane closed the stream")
                raise error
            except grpc.aio.AioRpcError as error:
                if error.code() in FATAL:
                    raise CredentialsError(f"the control plane refused this agent: {error.details()}") from error
                if self.established:
                    raise SessionLost(f"connection lost: {error.code().name} {error.details()}") from error
                raise
            finally:
                self._outbox.detach()
                call.cancel()

    @staticmethod
    async def _await_acceptance(call: grpc.aio.StreamStreamCall) -> None:
        """The server sends a marker in its initial metadata once it has
        accepted our identity; anything else is the call's error."""
        metadata = await call.initial_metadata()
        if metadata is not None and any(key == SESSION_ACCEPTED for key, _ in metadata):
            return
        code, details = await call.code(), await call.details()
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await call.trailing_metadata(), details)

    async def _write(self, call: grpc.aio.StreamStreamCall, outgoing: asyncio.Queue[agent_pb2.AgentMessage]
                     ) -> None:
        while True:
            await call.write(await outgoing.get())

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        async for message in call:
            match message.WhichOneof("body"):
                case "assign":
                    self._on_assign(assignment_from_pb(message.assign))
                case "cancel":
                    self._on_cancel(message.cancel.job_id, message.cancel.reason)
                case "log_ack":
                    self._outbox.ack_log(message.log_ack.job_id, message.log_ack.seq)
                case "result_ack":
                    self._outbox.ack_result(message.result_ack.job_id)

    async def _heartbeat(self, outgoing: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval.total_seconds())
            outgoing.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(running_jobs=[
                agent_pb2.RunningJob(job_id=j, epoch=e) for j, e in self._outbox.running().items()])))

    async def _renew(self, stub: agent_pb2_grpc.AgentControlStub) -> None:
        """Renew at half-life with a new key. The open stream keeps its
        connection; the next connection presents the new certificate."""
        rng = random.Random()
        while True:
            await asyncio.sleep(renewal_delay(self._credentials, datetime.now(UTC), rng))
            key_pem, csr_pem = new_key_and_csr()
            response = await stub.Renew(agent_pb2.RenewRequest(csr_pem=csr_pem), timeout=30)
            old = self._credentials
            self._credentials = Credentials(old.agent_id, old.api_endpoint, old.agent_endpoint, key_pem,
                                            response.certificate_pem, response.ca_bundle_pem or old.ca_pem)
            self._on_renewed(self._credentials)
            log.info("agent_certificate_renewed", agent_id=old.agent_id,
                     not_after=self._credentials.certificate.not_valid_after_utc.isoformat())
