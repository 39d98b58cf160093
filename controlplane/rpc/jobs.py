"""The engineers' Jobs service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controlplane.jobs.model import Job
from controlplane.jobs.service import JobService
from controlplane.rpc.auth import current_principal
from controlplane.rpc.convert import chunk_to_pb, job_to_pb, spec_from_pb
from controlplane.rpc.status import mapped
from protos.v1 import jobs_pb2, jobs_pb2_grpc


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    @mapped
    async def Submit(self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
                     ) -> jobs_pb2.SubmitJobResponse:
        job = await self._jobs.submit(current_principal().org, spec_from_pb(request.spec))
        return jobs_pb2.SubmitJobResponse(job=job_to_pb(job))

    @mapped
    async def Get(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return job_to_pb(await self._jobs.get(current_principal().org, request.job_id))

    @mapped
    async def List(self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
                   ) -> jobs_pb2.ListJobsResponse:
        jobs, token = await self._jobs.list(current_principal().org, request.page_size, request.page_token)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    @mapped
    async def Cancel(self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return job_to_pb(await self._jobs.cancel(current_principal().org, request.job_id))

    @mapped
    async def FollowLogs(self, request: jobs_pb2.FollowLogsRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[jobs_pb2.FollowLogsResponse]:
        org = current_principal().org
        async for item in self._jobs.follow(org, request.job_id, request.from_offset, request.follow):
            if isinstance(item, Job):
                yield jobs_pb2.FollowLogsResponse(finished=job_to_pb(item))
            else:
                yield jobs_pb2.FollowLogsResponse(chunk=chunk_to_pb(item))
