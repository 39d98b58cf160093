"""Bulk transfers between the agent and the control plane, beside the Connect
stream: a job's workspace in, its artifacts and reports out. Each transfer
opens its own channel with the agent's current certificate and retries while
the control plane is unreachable."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from testhide.agent.credentials import Credentials
from testhide.agent.errors import JobSetupError
from testhide.common.tls import secure_channel
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc

CHUNK = 1024 * 1024
_KIND = {"artifact": agent_pb2.ARTIFACT_KIND_FILE, "junit": agent_pb2.ARTIFACT_KIND_JUNIT}


def _transient(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class ControlPlaneLink:
    def __init__(self, credentials: Callable[[], Credentials], patience_s: float = 300) -> None:
        self._credentials = credentials
        self._patience_s = patience_s

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            reraise=True,
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=stop_after_delay(self._patience_s),
        )

    def _channel(self) -> grpc.aio.Channel:
        c = self._credentials()
        return secure_channel(
            c.agent_endpoint, c.ca_pem, client_key_pem=c.key_pem, client_cert_pem=c.certificate_pem
        )

    async def fetch_workspace(self, job_id: str, epoch: int, dest: BinaryIO, max_bytes: int) -> None:
        try:
            async for attempt in self._retrying():
                with attempt:
                    dest.seek(0)
                    dest.truncate()
                    size = 0
                    async with self._channel() as channel:
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

        async for attempt in self._retrying():
            with attempt:
                async with self._channel() as channel:
                    await agent_pb2_grpc.AgentControlStub(channel).UploadArtifact(messages(), timeout=600)
