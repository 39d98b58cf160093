"""The agent channel answers an agent only about the jobs it holds, at the
epoch it holds them. An agent of another pool that knows a job's id, or the
job's own former holder, gets exactly the answer a job id that does not exist
gets: the job is unchanged, its holder's log arrives whole, and no answer
names the job's current epoch. FakeRuntime agents and bare clients on real
agent certificates; no Docker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import tarfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import cast

import grpc
import pytest
from google.protobuf import text_format

from testhide.agent.credentials import Credentials
from testhide.agent.model import LogStream
from testhide.agent.runtime.base import ContainerSpec, OutputQueue
from testhide.agent.runtime.fake import FakeContainer, FakeRuntime, Script
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogChunk, new_job_id
from testhide.controlplane.rpc.agent import SESSION_ACCEPTED
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2
from tests.harness import JOB_IMAGE, RunningControlPlane, control_plane, enrolled, job, running_agent

ORG = "default"
OTHER_POOL = "other"
FIRST, SECOND = b"first line of the holder\n", b"second line of the holder\n"
WITHIN = 30


class Puppet(FakeRuntime):
    """Every job prints FIRST, then runs until the test makes it print its
    last words and exit."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, OutputQueue] = {}

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> FakeContainer:
        self.scripts[spec.job_id] = Script(output=[(LogStream.STDOUT, FIRST)], hold=True)
        self.outputs[spec.job_id] = output
        return await super().start(spec, output)

    async def finish(self, job_id: str, last_words: bytes) -> None:
        self.outputs[job_id].put_nowait((LogStream.STDOUT, last_words))
        await self.started[job_id].stop(0)  # exits 143


class BareAgent:
    """An enrolled agent's certificate on a bare channel: what it sends, and
    exactly what it is answered."""

    def __init__(self, cp: RunningControlPlane, credentials: Credentials) -> None:
        self._target = cp.agent_target
        self._credentials = grpc.ssl_channel_credentials(
            cp.ca_pem, private_key=credentials.key_pem, certificate_chain=credentials.certificate_pem
        )
        self._call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage] | None = None

    async def __aenter__(self) -> BareAgent:
        self._channel = grpc.aio.secure_channel(self._target, self._credentials)
        self.stub = agent_pb2_grpc.AgentControlStub(self._channel)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._channel.close()

    async def connect(self, running: dict[str, int] | None = None) -> list[agent_pb2.ControlMessage]:
        """A new Connect stream (ending the previous one); what the hello is answered."""
        if self._call is not None:
            self._call.cancel()
        self._call = call = self.stub.Connect()
        # Nothing is written before the server accepts the stream (grpc/grpc#36066).
        metadata = await asyncio.wait_for(call.initial_metadata(), WITHIN)
        assert any(key == SESSION_ACCEPTED for key, _ in metadata), await call.details()
        jobs = [agent_pb2.RunningJob(job_id=j, epoch=e) for j, e in (running or {}).items()]
        hello = agent_pb2.Hello(max_jobs=1, version="bare", running_jobs=jobs)
        return await self.exchange([agent_pb2.AgentMessage(hello=hello)])

    async def read(self) -> agent_pb2.ControlMessage:
        assert self._call is not None
        message = await asyncio.wait_for(self._call.read(), WITHIN)
        assert isinstance(message, agent_pb2.ControlMessage), message
        return message

    async def exchange(self, messages: list[agent_pb2.AgentMessage]) -> list[agent_pb2.ControlMessage]:
        """Send ``messages``, then a fence (a log batch of a job that does not
        exist), and return everything answered before the fence's answer: the
        stream is handled in order, so that is all ``messages`` got."""
        assert self._call is not None
        fence = new_job_id()
        for message in [*messages, log_batch(fence, 1, 1, b"fence")]:
            await self._call.write(message)
        answers: list[agent_pb2.ControlMessage] = []
        while True:
            answer = await self.read()
            if answer.WhichOneof("body") == "cancel" and answer.cancel.job_id == fence:
                return answers
            answers.append(answer)

    async def fetch_workspace(self, job_id: str, epoch: int) -> tuple[grpc.StatusCode, str]:
        try:
            size = 0
            async for chunk in self.stub.FetchWorkspace(
                agent_pb2.JobLease(job_id=job_id, epoch=epoch), timeout=WITHIN
            ):
                size += len(chunk.data)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, f"{size} bytes of workspace"

    async def upload_artifact(self, job_id: str, epoch: int) -> tuple[grpc.StatusCode, str]:
        data = b"forged artifact\n"
        header = agent_pb2.ArtifactHeader(
            job_id=job_id,
            epoch=epoch,
            path="forged.txt",
            kind=agent_pb2.ARTIFACT_KIND_FILE,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

        async def parts() -> AsyncIterator[agent_pb2.ArtifactUpload]:
            yield agent_pb2.ArtifactUpload(header=header)
            yield agent_pb2.ArtifactUpload(data=data)

        try:
            stored = await self.stub.UploadArtifact(parts(), timeout=WITHIN)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, f"stored {stored.path}"


def log_batch(job_id: str, epoch: int, seq: int, data: bytes) -> agent_pb2.AgentMessage:
    entry = agent_pb2.LogEntry(stream=jobs_pb2.LOG_STREAM_STDOUT, data=data)
    return agent_pb2.AgentMessage(
        log_batch=agent_pb2.LogBatch(job_id=job_id, epoch=epoch, seq=seq, entries=[entry])
    )


def job_messages(kind: str, job_id: str, epoch: int, last_seq: int = 1) -> list[agent_pb2.AgentMessage]:
    """What an agent can say about a job on its stream, of one kind (a result
    after ``last_seq`` log batches)."""
    held = [agent_pb2.RunningJob(job_id=job_id, epoch=epoch)]
    match kind:
        case "log_batch":  # the sequence numbers the holder sends next
            return [log_batch(job_id, epoch, seq, b"forged line\n") for seq in (1, 2, 3, 4)]
        case "started":
            return [agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=job_id, epoch=epoch))]
        case "fetched":
            fetch = jobs_pb2.FetchStep(cache="miss", exit_code=0)
            return [
                agent_pb2.AgentMessage(fetched=agent_pb2.JobFetched(job_id=job_id, epoch=epoch, fetch=fetch))
            ]
        case "result":
            result = agent_pb2.JobResult(
                job_id=job_id,
                epoch=epoch,
                last_seq=last_seq,
                outcome=agent_pb2.JOB_OUTCOME_EXITED,
                exit_code=0,
            )
            return [agent_pb2.AgentMessage(result=result)]
        case "refused":
            refusal = agent_pb2.JobRefused(job_id=job_id, epoch=epoch, reason="shutting down")
            return [agent_pb2.AgentMessage(refused=refusal)]
        case "heartbeat":
            return [agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(running_jobs=held))]
    raise AssertionError(kind)


STREAM_KINDS = ["log_batch", "started", "fetched", "result", "refused", "heartbeat"]
ALL_KINDS = [*STREAM_KINDS, "hello", "workspace_fetch", "artifact_upload"]


async def answer(agent: BareAgent, kind: str, job_id: str, epoch: int, last_seq: int = 1) -> list[str]:
    """What ``agent`` is answered for one kind of message about ``job_id``,
    with that id (which the agent sent) blanked out."""
    match kind:
        case "hello":
            answers = await agent.connect({job_id: epoch})
        case "workspace_fetch":
            code, details = await agent.fetch_workspace(job_id, epoch)
            return [f"{code.name}: {details}".replace(job_id, "<job>")]
        case "artifact_upload":
            code, details = await agent.upload_artifact(job_id, epoch)
            return [f"{code.name}: {details}".replace(job_id, "<job>")]
        case _:
            answers = await agent.exchange(job_messages(kind, job_id, epoch, last_seq))
    return [text_format.MessageToString(a, as_one_line=True).replace(job_id, "<job>") for a in answers]


def told_to_stop(answers: list[str]) -> bool:
    return any(a.startswith("cancel {") and "abandon: true" in a for a in answers)


async def enrolled_credentials(cp: RunningControlPlane, tmp: Path, name: str, pool: str) -> Credentials:
    return Credentials.load(await enrolled(cp, tmp, name, ORG, pool))


async def state(cp: RunningControlPlane, job_id: str) -> tuple[object, ...]:
    """Everything an agent's message could change about a job."""
    assert cp.daemon.jobs is not None
    found = await job(cp, job_id)
    artifacts = await cp.daemon.jobs.artifacts(ORG, job_id)
    return (
        found.status,
        found.epoch,
        found.agent_id,
        found.log_size,
        found.last_seq,
        found.lease_expires_at,
        found.exit_code,
        found.status_reason,
        len(found.transitions),
        artifacts,
        found.fetch,
    )


async def read_log(cp: RunningControlPlane, job_id: str, until: Callable[[bytes, Job | None], bool]) -> bytes:
    """The job's log as its followers see it, until ``until(log, ended job or None)``."""
    assert cp.daemon.jobs is not None
    log = b""
    follow = cast(AsyncGenerator[LogChunk | Job, None], cp.daemon.jobs.follow(ORG, job_id, 0, True))
    async with aclosing(follow) as items:
        async for item in items:
            if isinstance(item, Job):
                assert until(log, item), f"job ended as {item.status}: {item.status_reason}"
                return log
            log += item.data
            if until(log, None):
                return log
    raise AssertionError("the log ended without its job")


def workspace_archive() -> bytes:
    data = b"only for the holder\n"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        member = tarfile.TarInfo("notes.txt")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return out.getvalue()


async def submit(cp: RunningControlPlane, workspace: bool = True) -> str:
    assert cp.daemon.jobs is not None
    workspace_id = ""
    if workspace:

        async def chunks() -> AsyncIterator[bytes]:
            yield workspace_archive()

        workspace_id = (await cp.daemon.jobs.upload_workspace(ORG, chunks())).id
    spec = JobSpec(image=JOB_IMAGE, command=("true",), workspace_id=workspace_id)
    return (await cp.daemon.jobs.submit(ORG, spec)).id


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_an_agent_of_another_pool_cannot_write_into_a_job_it_does_not_hold(
    tmp_path: Path, kind: str
) -> None:
    # Leases as long as allowed: the holder's own heartbeats (a third of a lease apart) cannot
    # change the job while the intruder tries to.
    async with control_plane(tmp_path, job_lease=timedelta(hours=1)) as cp:
        assert cp.daemon._store is not None
        assert cp.daemon.scheduler is not None
        assert cp.daemon.jobs is not None
        await cp.daemon._store.create_pool(ORG, OTHER_POOL, datetime.now(UTC))
        puppet = Puppet()
        async with (
            running_agent(cp, tmp_path, puppet, name="holder") as holder,
            BareAgent(cp, await enrolled_credentials(cp, tmp_path, "intruder", OTHER_POOL)) as intruder,
        ):
            job_id = await submit(cp)
            await asyncio.wait_for(read_log(cp, job_id, lambda log, _: log == FIRST), WITHIN)
            epoch = (await job(cp, job_id)).epoch
            before = await state(cp, job_id)
            await intruder.connect()

            foreign = await answer(intruder, kind, job_id, epoch)
            nonexistent = await answer(intruder, kind, new_job_id(), epoch)

            assert foreign == nonexistent
            assert await state(cp, job_id) == before
            session = cp.daemon.scheduler.session_of(holder.agent_id)
            assert session is not None
            assert job_id in session.jobs
            await puppet.finish(job_id, SECOND)
            log = await asyncio.wait_for(read_log(cp, job_id, lambda _, ended: ended is not None), WITHIN)
        assert log == FIRST + SECOND  # whole, and nothing else
        final = await job(cp, job_id)
        assert (final.status, final.exit_code) == (JobStatus.FAILED, 143)  # what the holder reported
        assert await cp.daemon.jobs.artifacts(ORG, job_id) == []


def no_number_in(answers: list[str]) -> bool:
    """Job ids are blanked out; what is left must not carry an epoch."""
    return not any(re.search(r"\d", a) for a in answers)


async def test_a_stale_epoch_is_refused_without_revealing_the_current_epoch(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        credentials = await enrolled_credentials(cp, tmp_path, "holder", "default")
        async with BareAgent(cp, credentials) as agent:
            await agent.connect()
            job_id = await submit(cp, workspace=False)
            assign = (await agent.read()).assign
            assert assign.job_id == job_id
            held = assign.epoch
            assert await agent.exchange(job_messages("started", job_id, held)) == []

            # Held at one epoch, spoken about at another (the audit's "is at epoch 1, not 101").
            before = await state(cp, job_id)
            wrong = await answer(agent, "log_batch", job_id, held + 100)
            assert told_to_stop(wrong)
            assert wrong == await answer(agent, "log_batch", new_job_id(), held + 100)
            assert no_number_in(wrong)
            assert await state(cp, job_id) == before

            # Taken back from it (it came back without the job): LOST, at a new epoch.
            await agent.connect(running={})
            lost = await job(cp, job_id)
            assert lost.status == JobStatus.LOST
            assert lost.epoch > held
            before = await state(cp, job_id)
            for epoch in (held, lost.epoch, held + 100):
                for kind in ("log_batch", "started", "fetched", "result", "refused", "workspace_fetch"):
                    stale = await answer(agent, kind, job_id, epoch)
                    assert stale == await answer(agent, kind, new_job_id(), epoch), (kind, epoch)
                    assert no_number_in(stale), (kind, epoch, stale)
                    if kind != "workspace_fetch":
                        assert told_to_stop(stale), (kind, epoch, stale)
            assert await state(cp, job_id) == before


async def test_a_former_holder_cannot_report_on_its_requeued_job(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        credentials = await enrolled_credentials(cp, tmp_path, "holder", "default")
        async with BareAgent(cp, credentials) as agent:
            await agent.connect()
            job_id = await submit(cp, workspace=False)
            held = (await agent.read()).assign.epoch
            # It takes no more jobs, then gives this one back: queued again, at a new epoch.
            draining = agent_pb2.Heartbeat(
                draining=True, running_jobs=[agent_pb2.RunningJob(job_id=job_id, epoch=held)]
            )
            assert await agent.exchange([agent_pb2.AgentMessage(heartbeat=draining)]) == []
            assert await agent.exchange(job_messages("refused", job_id, held)) == []
            queued = await job(cp, job_id)
            assert queued.status == JobStatus.QUEUED
            before = await state(cp, job_id)
            for kind in ("started", "log_batch", "result"):  # at the epoch that follows its own
                stale = await answer(agent, kind, job_id, queued.epoch, last_seq=0)
                assert stale == await answer(agent, kind, new_job_id(), queued.epoch, last_seq=0), kind
                assert told_to_stop(stale), (kind, stale)
            assert await state(cp, job_id) == before
