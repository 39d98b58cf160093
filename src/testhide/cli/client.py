"""Talking to the control plane: one channel, bearer credentials, and the one
place where gRPC errors become one-line messages with an exit code."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import click
import grpc

from testhide.cli.config import Login
from testhide.common.tls import CHANNEL_OPTIONS
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc

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


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class JobsApi:
    def __init__(self, stub: jobs_pb2_grpc.JobsStub, access_token: str) -> None:
        self._stub = stub
        self._metadata = _bearer(access_token)

    async def submit(self, spec: jobs_pb2.JobSpec) -> jobs_pb2.Job:
        response = await self._stub.Submit(
            jobs_pb2.SubmitJobRequest(spec=spec), metadata=self._metadata, timeout=60
        )
        return response.job

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return await self._stub.Get(
            jobs_pb2.GetJobRequest(job_id=job_id), metadata=self._metadata, timeout=30
        )

    async def list(self, page_size: int, page_token: str = "") -> jobs_pb2.ListJobsResponse:
        return await self._stub.List(
            jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token),
            metadata=self._metadata,
            timeout=30,
        )

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        return await self._stub.Cancel(
            jobs_pb2.CancelJobRequest(job_id=job_id), metadata=self._metadata, timeout=30
        )

    async def upload_workspace(self, chunks: AsyncIterator[bytes]) -> jobs_pb2.UploadWorkspaceResponse:
        async def messages() -> AsyncIterator[jobs_pb2.DataChunk]:
            async for chunk in chunks:
                yield jobs_pb2.DataChunk(data=chunk)

        return await self._stub.UploadWorkspace(messages(), metadata=self._metadata, timeout=3600)

    async def artifacts(self, job_id: str) -> list[jobs_pb2.Artifact]:
        response = await self._stub.ListArtifacts(
            jobs_pb2.JobRef(job_id=job_id), metadata=self._metadata, timeout=30
        )
        return list(response.artifacts)

    def download(self, job_id: str, path: str) -> grpc.aio.UnaryStreamCall:
        return self._stub.DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(job_id=job_id, path=path), metadata=self._metadata
        )

    async def test_results(self, job_id: str) -> jobs_pb2.TestResults:
        return await self._stub.GetTestResults(
            jobs_pb2.JobRef(job_id=job_id), metadata=self._metadata, timeout=30
        )

    def follow(self, job_id: str, offset: int, follow: bool) -> grpc.aio.UnaryStreamCall:
        return self._stub.FollowLogs(
            jobs_pb2.FollowLogsRequest(job_id=job_id, from_offset=offset, follow=follow),
            metadata=self._metadata,
        )


@asynccontextmanager
async def _channel(login: Login) -> AsyncIterator[grpc.aio.Channel]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=login.ca_pem.encode() if login.ca_pem else None
    )
    async with grpc.aio.secure_channel(login.server, credentials, options=CHANNEL_OPTIONS) as channel:
        try:
            yield channel
        except grpc.aio.AioRpcError as error:
            raise RpcFailed(error) from None


# Refresh this long before the access token expires, so a call never races it.
REFRESH_MARGIN_S = 60


def _stored(pair: auth_pb2.TokenPair, login: Login) -> Login:
    return replace(
        login,
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        access_expires_at=time.time() + pair.access_expires_in_s,
    )


async def log_in(login: Login, request: auth_pb2.LoginRequest) -> Login:
    """Trade a password or API key for tokens; nothing is stored here."""
    async with _channel(login) as channel:
        pair = await auth_pb2_grpc.AuthStub(channel).Login(request, timeout=30)
    return _stored(pair, login)


async def fresh(login: Login, channel: grpc.aio.Channel) -> Login:
    """The stored session with a usable access token, refreshed (and the
    rotated refresh token saved) when it is about to expire."""
    if login.access_expires_at - time.time() > REFRESH_MARGIN_S:
        return login
    pair = await auth_pb2_grpc.AuthStub(channel).Refresh(
        auth_pb2.RefreshRequest(refresh_token=login.refresh_token), timeout=30
    )
    renewed = _stored(pair, login)
    renewed.save()
    return renewed


@asynccontextmanager
async def connect(login: Login) -> AsyncIterator[JobsApi]:
    async with _channel(login) as channel:
        current = await fresh(login, channel)
        yield JobsApi(jobs_pb2_grpc.JobsStub(channel), current.access_token)


class SecretsApi:
    def __init__(self, stub: jobs_pb2_grpc.SecretsStub, access_token: str) -> None:
        self._stub = stub
        self._metadata = _bearer(access_token)

    async def set(self, name: str, value: bytes) -> jobs_pb2.Secret:
        return await self._stub.Set(
            jobs_pb2.SetSecretRequest(name=name, value=value), metadata=self._metadata, timeout=30
        )

    async def list(self) -> list[jobs_pb2.Secret]:
        return list(
            (
                await self._stub.List(jobs_pb2.ListSecretsRequest(), metadata=self._metadata, timeout=30)
            ).secrets
        )

    async def delete(self, name: str) -> jobs_pb2.Secret:
        return await self._stub.Delete(
            jobs_pb2.DeleteSecretRequest(name=name), metadata=self._metadata, timeout=30
        )


@asynccontextmanager
async def connect_secrets(login: Login) -> AsyncIterator[SecretsApi]:
    async with _channel(login) as channel:
        current = await fresh(login, channel)
        yield SecretsApi(jobs_pb2_grpc.SecretsStub(channel), current.access_token)
