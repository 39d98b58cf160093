"""The engineers' Jobs service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.errors import FailedPrecondition
from testhide.controlplane.jobs.model import Job, JobUpdate, SecretInfo
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.jobs.service import JobService
from testhide.controlplane.jobs.validation import in_range
from testhide.controlplane.rpc.auth import current_principal
from testhide.controlplane.rpc.convert import (
    artifact_path_from_pb,
    chunk_response_to_pb,
    job_id_from_pb,
    job_to_pb,
    log_batch_to_pb,
    page_from_pb,
    pool_to_pb,
    spec_from_pb,
    test_results_to_pb,
    timestamp,
)
from testhide.controlplane.rpc.evidence import evidence_to_pb
from testhide.controlplane.rpc.status import mapped
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc

if TYPE_CHECKING:
    from testhide.controlplane.jobs.statements import Evidence
    from testhide.controlplane.operations.agents import PoolView


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(
        self,
        jobs: JobService,
        pools: Callable[[str], Awaitable[list[PoolView]]] | None = None,
        evidence: Callable[[str, str], Awaitable[Evidence]] | None = None,
        provenance: Callable[[str, str], Awaitable[bytes]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._evidence = evidence
        """A job's signed statement and its certificates, by org and job id (`GetEvidence`)."""
        self._provenance = provenance
        """A job's SLSA provenance (a DSSE JSON envelope), by org and job id (`GetEvidence`, `in_toto`)."""
        self._pools = pools
        """An organisation's pools with their state (`ListPools`)."""

    @mapped
    async def ListPools(
        self,
        request: jobs_pb2.ListPoolsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListPoolsRequest, jobs_pb2.ListPoolsResponse],
    ) -> jobs_pb2.ListPoolsResponse:
        if self._pools is None:
            raise FailedPrecondition("this control plane does not list pools")
        return jobs_pb2.ListPoolsResponse(
            pools=[pool_to_pb(p) for p in await self._pools(current_principal().org)]
        )

    @mapped
    async def Submit(
        self,
        request: jobs_pb2.SubmitJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.SubmitJobRequest, jobs_pb2.SubmitJobResponse],
    ) -> jobs_pb2.SubmitJobResponse:
        job = await self._jobs.submit(current_principal().org, spec_from_pb(request.spec))
        return jobs_pb2.SubmitJobResponse(job=job_to_pb(job))

    @mapped
    async def Get(
        self,
        request: jobs_pb2.GetJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetJobRequest, jobs_pb2.Job],
    ) -> jobs_pb2.Job:
        return job_to_pb(await self._jobs.get(current_principal().org, job_id_from_pb(request.job_id)))

    @mapped
    async def List(
        self,
        request: jobs_pb2.ListJobsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListJobsRequest, jobs_pb2.ListJobsResponse],
    ) -> jobs_pb2.ListJobsResponse:
        jobs, token = await self._jobs.list(current_principal().org, *page_from_pb(request))
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    @mapped
    async def Cancel(
        self,
        request: jobs_pb2.CancelJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.CancelJobRequest, jobs_pb2.Job],
    ) -> jobs_pb2.Job:
        return job_to_pb(await self._jobs.cancel(current_principal().org, job_id_from_pb(request.job_id)))

    @mapped
    async def FollowLogs(
        self,
        request: jobs_pb2.FollowLogsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.FollowLogsRequest, jobs_pb2.FollowLogsResponse],
    ) -> AsyncIterator[jobs_pb2.FollowLogsResponse]:
        job_id_from_pb(request.job_id)
        in_range("from_offset", request.from_offset, 0)
        org = current_principal().org
        # Headers at once: a follower knows its stream is open even while the job
        # prints nothing, and so tells a broken stream from a failed reconnect.
        await context.send_initial_metadata(())
        items = self._jobs.follow_with_updates(org, request.job_id, request.from_offset, request.follow)
        async for item in items:
            if isinstance(item, JobUpdate):
                yield jobs_pb2.FollowLogsResponse(update=job_to_pb(item.job))
            elif isinstance(item, Job):
                yield jobs_pb2.FollowLogsResponse(finished=job_to_pb(item))
            else:
                yield chunk_response_to_pb(item)

    @mapped
    async def UploadWorkspace(
        self,
        request_iterator: AsyncIterator[jobs_pb2.DataChunk],
        context: grpc.aio.ServicerContext[jobs_pb2.DataChunk, jobs_pb2.UploadWorkspaceResponse],
    ) -> jobs_pb2.UploadWorkspaceResponse:
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                yield chunk.data

        info = await self._jobs.upload_workspace(current_principal().org, chunks())
        return jobs_pb2.UploadWorkspaceResponse(workspace_id=info.id, size=info.size, sha256=info.sha256)

    @mapped
    async def ListArtifacts(
        self,
        request: jobs_pb2.JobRef,
        context: grpc.aio.ServicerContext[jobs_pb2.JobRef, jobs_pb2.ListArtifactsResponse],
    ) -> jobs_pb2.ListArtifactsResponse:
        found = await self._jobs.artifacts(current_principal().org, job_id_from_pb(request.job_id))
        return jobs_pb2.ListArtifactsResponse(
            artifacts=[jobs_pb2.Artifact(path=a.path, size=a.size, sha256=a.sha256) for a in found]
        )

    @mapped
    async def DownloadArtifact(
        self,
        request: jobs_pb2.DownloadArtifactRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.DownloadArtifactRequest, jobs_pb2.DataChunk],
    ) -> AsyncIterator[jobs_pb2.DataChunk]:
        job_id, path = job_id_from_pb(request.job_id), artifact_path_from_pb(request.path)
        async for chunk in self._jobs.artifact(current_principal().org, job_id, path):
            yield jobs_pb2.DataChunk(data=chunk)

    @mapped
    async def GetTestResults(
        self,
        request: jobs_pb2.JobRef,
        context: grpc.aio.ServicerContext[jobs_pb2.JobRef, jobs_pb2.TestResults],
    ) -> jobs_pb2.TestResults:
        job_id = job_id_from_pb(request.job_id)
        return test_results_to_pb(*await self._jobs.test_results(current_principal().org, job_id))

    @mapped
    async def GetEvidence(
        self,
        request: jobs_pb2.GetEvidenceRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetEvidenceRequest, jobs_pb2.Evidence],
    ) -> jobs_pb2.Evidence:
        if self._evidence is None:
            raise FailedPrecondition("this control plane keeps no signed statements")
        job_id = job_id_from_pb(request.job_id)
        org = current_principal().org
        envelope = b""
        if request.in_toto:
            if self._provenance is None:
                raise FailedPrecondition("this control plane does not export provenance")
            # First: a signing key it makes is then among the evidence's certificates.
            envelope = await self._provenance(org, job_id)
        evidence = evidence_to_pb(await self._evidence(org, job_id))
        evidence.in_toto_envelope = envelope
        return evidence

    @mapped
    async def GetLogBatches(
        self,
        request: jobs_pb2.GetLogBatchesRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetLogBatchesRequest, jobs_pb2.LogBatchRecord],
    ) -> AsyncIterator[jobs_pb2.LogBatchRecord]:
        job_id = job_id_from_pb(request.job_id)
        async for batch in self._jobs.log_batches(current_principal().org, job_id):
            yield log_batch_to_pb(batch)


def secret_to_pb(secret: SecretInfo) -> jobs_pb2.Secret:
    """Name and times; the value never leaves the vault but for an agent's assignment."""
    message = jobs_pb2.Secret(
        name=secret.name, updated_at=timestamp(secret.updated_at), last_used_by_job=secret.last_used_by_job
    )
    if secret.last_used_at is not None:
        message.last_used_at.CopyFrom(timestamp(secret.last_used_at))
    return message


class SecretsServicer(jobs_pb2_grpc.SecretsServicer):
    def __init__(self, vault: SecretVault, auditor: Auditor) -> None:
        self._vault = vault
        self._auditor = auditor

    @mapped
    async def Set(
        self,
        request: jobs_pb2.SetSecretRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.SetSecretRequest, jobs_pb2.Secret],
    ) -> jobs_pb2.Secret:
        principal = current_principal()
        updated = await self._vault.set(principal.org, request.name, request.value)
        await self._auditor.record(
            "secret_written",
            f"{principal.kind}:{principal.id}",
            org=principal.org,
            target=request.name,
            source_ip=context.peer(),
        )
        return jobs_pb2.Secret(name=request.name, updated_at=timestamp(updated))

    @mapped
    async def List(
        self,
        request: jobs_pb2.ListSecretsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListSecretsRequest, jobs_pb2.ListSecretsResponse],
    ) -> jobs_pb2.ListSecretsResponse:
        found = await self._vault.list(current_principal().org)
        return jobs_pb2.ListSecretsResponse(secrets=[secret_to_pb(s) for s in found])

    @mapped
    async def Delete(
        self,
        request: jobs_pb2.DeleteSecretRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.DeleteSecretRequest, jobs_pb2.Secret],
    ) -> jobs_pb2.Secret:
        principal = current_principal()
        updated = await self._vault.delete(principal.org, request.name)
        await self._auditor.record(
            "secret_deleted",
            f"{principal.kind}:{principal.id}",
            org=principal.org,
            target=request.name,
            source_ip=context.peer(),
        )
        return jobs_pb2.Secret(name=request.name, updated_at=timestamp(updated))
