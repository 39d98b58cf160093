"""Bulk transfers between the agent and the control plane, beside the Connect
stream: a job's workspace in, its artifacts and reports out. Each transfer
opens its own channel with the agent's current certificate, to the replica
the agent last reached, and while that cannot be reached moves on to the next
replica (waiting only after a full round, as the session does) until its
patience runs out."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay

from testhide.agent.credentials import Credentials
from testhide.agent.endpoints import Endpoints, Rotation
from testhide.agent.errors import JobSetupError
from testhide.common.tls import secure_channel
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc

CHUNK = 1024 * 1024
MAX_BACKOFF_S = 15
_KIND = {
    "artifact": agent_pb2.ARTIFACT_KIND_FILE,
    "junit": agent_pb2.ARTIFACT_KIND_JUNIT,
    "service_log": agent_pb2.ARTIFACT_KIND_SERVICE_LOG,
}


def _transient(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class ControlPlaneLink:
    def __init__(
        self, credentials: Callable[[], Credentials], endpoints: Endpoints, patience_s: float = 300
    ) -> None:
        self._credentials = credentials
        self._endpoints = endpoints
        self._patience_s = patience_s

    def _retrying(self, rotation: Rotation) -> AsyncRetrying:
        def moved_on(state: RetryCallState) -> None:
            rotation.failed()  # only transient failures are retried: the next attempt goes elsewhere

        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            reraise=True,
            after=moved_on,
            wait=lambda state: rotation.wait_s(MAX_BACKOFF_S),
            stop=stop_after_delay(self._patience_s),
        )

    def _channel(self, target: str) -> grpc.aio.Channel:
        c = self._credentials()
        return secure_channel(target, c.ca_pem, client_key_pem=c.key_pem, client_cert_pem=c.certificate_pem)

    async def fetch_workspace(self, job_id: str, epoch: int, dest: BinaryIO, max_bytes: int) -> None:
        rotation = self._endpoints.attempts()
        try:
            async for attempt in self._retrying(rotation):
                with attempt:
                    dest.seek(0)
                    dest.truncate()
                    size = 0
                    async with self._channel(rotation.target) as channel:
                        stub = agent_pb2_grpc.AgentControlStub(channel)
                        async for chunk in stub.FetchWorkspace(
                            agent_pb2.JobLease(job_id=job_id, epoch=epoch)
                        ):
                            size += len(chunk.data)
                            if size > max_bytes:
                                raise JobSetupError(f"workspace larger than {max_bytes} bytes")
                            dest.write(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise JobSetupError(f"could not fetch the workspace: {exc.details()}") from exc
        dest.seek(0)

    async def upload(self, job_id: str, epoch: int, path: str, kind: str, data: bytes) -> None:
        header = agent_pb2.ArtifactHeader(
            job_id=job_id,
            epoch=epoch,
            path=path,
            kind=_KIND[kind],
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

        async def messages() -> AsyncIterator[agent_pb2.ArtifactUpload]:
            yield agent_pb2.ArtifactUpload(header=header)
            for start in range(0, len(data), CHUNK):
                yield agent_pb2.ArtifactUpload(data=data[start : start + CHUNK])

        rotation = self._endpoints.attempts()
        async for attempt in self._retrying(rotation):
            with attempt:
                async with self._channel(rotation.target) as channel:
                    await agent_pb2_grpc.AgentControlStub(channel).UploadArtifact(messages(), timeout=600)
