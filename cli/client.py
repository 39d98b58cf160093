"""Talking to the control plane: one channel, bearer credentials, and the one
place where gRPC errors become one-line messages with an exit code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import click
import grpc

from cli.config import Login
from common.tls import CHANNEL_OPTIONS
from protos.v1 import jobs_pb2, jobs_pb2_grpc

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "run 'testhide login' again",
    grpc.StatusCode.UNAVAILABLE: "is the control plane running and reachable?",
}


class RpcFailed(click.ClickException):
    """A refused or failed RPC, as one line and a non-zero exit code."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        hint = _HINTS.get(error.code())
        message = f"{error.details() or error.code().name} ({error.code().name.lower()})"
        super().__init__(f"{message}; {hint}" if hint else message)


class JobsApi:
    def __init__(self, stub: jobs_pb2_grpc.JobsStub, api_key: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    async def submit(self, spec: jobs_pb2.JobSpec) -> jobs_pb2.Job:
        response = await self._stub.Submit(jobs_pb2.SubmitJobRequest(spec=spec), metadata=self._metadata,
                                           timeout=60)
        return response.job

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return await self._stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=self._metadata, timeout=30)

    async def list(self, page_size: int, page_token: str = "") -> jobs_pb2.ListJobsResponse:
        return await self._stub.List(jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token),
                                     metadata=self._metadata, timeout=30)

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        return await self._stub.Cancel(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=self._metadata,
                                       timeout=30)

    async def upload_workspace(self, chunks: AsyncIterator[bytes]) -> jobs_pb2.UploadWorkspaceResponse:
        async def messages() -> AsyncIterator[jobs_pb2.DataChunk]:
            async for chunk in chunks:
                yield jobs_pb2.DataChunk(data=chunk)

        return await self._stub.UploadWorkspace(messages(), metadata=self._metadata, timeout=3600)

    async def artifacts(self, job_id: str) -> list[jobs_pb2.Artifact]:
        response = await self._stub.ListArtifacts(jobs_pb2.JobRef(job_id=job_id), metadata=self._metadata,
                                                  timeout=30)
        return list(response.artifacts)

    def download(self, job_id: str, path: str) -> grpc.aio.UnaryStreamCall:
        return self._stub.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(job_id=job_id, path=path),
                                           metadata=self._metadata)

    async def test_results(self, job_id: str) -> jobs_pb2.TestResults:
        return await self._stub.GetTestResults(jobs_pb2.JobRef(job_id=job_id), metadata=self._metadata, timeout=30)

    def follow(self, job_id: str, offset: int, follow: bool) -> grpc.aio.UnaryStreamCall:
        return self._stub.FollowLogs(jobs_pb2.FollowLogsRequest(job_id=job_id, from_offset=offset, follow=follow),
                                     metadata=self._metadata)


@asynccontextmanager
async def _channel(login: Login) -> AsyncIterator[grpc.aio.Channel]:
    credentials = grpc.ssl_channel_credentials(root_certificates=login.ca_pem.encode() if login.ca_pem else None)
    async with grpc.aio.secure_channel(login.server, credentials, options=CHANNEL_OPTIONS) as channel:
        try:
            yield channel
        except grpc.aio.AioRpcError as error:
            raise RpcFailed(error) from None


@asynccontextmanager
async def connect(login: Login) -> AsyncIterator[JobsApi]:
    async with _channel(login) as channel:
        yield JobsApi(jobs_pb2_grpc.JobsStub(channel), login.api_key)


class SecretsApi:
    def __init__(self, stub: jobs_pb2_grpc.SecretsStub, api_key: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    async def set(self, name: str, value: bytes) -> jobs_pb2.Secret:
        return await self._stub.Set(jobs_pb2.SetSecretRequest(name=name, value=value), metadata=self._metadata,
                                    timeout=30)

    async def list(self) -> list[jobs_pb2.Secret]:
        return list((await self._stub.List(jobs_pb2.ListSecretsRequest(), metadata=self._metadata,
                                           timeout=30)).secrets)

    async def delete(self, name: str) -> jobs_pb2.Secret:
        return await self._stub.Delete(jobs_pb2.DeleteSecretRequest(name=name), metadata=self._metadata, timeout=30)


@asynccontextmanager
async def connect_secrets(login: Login) -> AsyncIterator[SecretsApi]:
    async with _channel(login) as channel:
        yield SecretsApi(jobs_pb2_grpc.SecretsStub(channel), login.api_key)
