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

    def follow(self, job_id: str, offset: int, follow: bool) -> grpc.aio.UnaryStreamCall:
        return self._stub.FollowLogs(jobs_pb2.FollowLogsRequest(job_id=job_id, from_offset=offset, follow=follow),
                                     metadata=self._metadata)


@asynccontextmanager
async def connect(login: Login) -> AsyncIterator[JobsApi]:
    credentials = grpc.ssl_channel_credentials(root_certificates=login.ca_pem.encode() if login.ca_pem else None)
    async with grpc.aio.secure_channel(login.server, credentials, options=CHANNEL_OPTIONS) as channel:
        try:
            yield JobsApi(jobs_pb2_grpc.JobsStub(channel), login.api_key)
        except grpc.aio.AioRpcError as error:
            raise RpcFailed(error) from None
