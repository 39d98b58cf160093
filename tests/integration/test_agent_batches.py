"""Several messages in one on the agent stream (AgentMessage.batch and
ControlMessage.batch): each message of a batch is taken or refused on its own,
exactly as if sent alone, and the reports in it are written in one store
transaction with each fenced by its epoch. Bare clients on real agent
certificates; no Docker."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format

from testhide.controlplane.errors import NotHeld
from testhide.controlplane.jobs.model import Isolation, Job, JobReport, JobStatus, new_job_id
from testhide.controlplane.rpc.agent import SESSION_ACCEPTED
from testhide.controlplane.store.base import Store
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import RunningControlPlane, control_plane, job
from tests.integration.test_agent_channel import (
    WITHIN,
    enrolled_credentials,
    job_messages,
    log_batch,
    state,
    submit,
)
from tests.integration.test_store import NOW, POSTGRES, SQLITE, assigned, empty_store, populate

Call = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage]


async def connect(cp: RunningControlPlane, tmp: Path, reads_batches: bool) -> tuple[grpc.aio.Channel, Call]:
    credentials = await enrolled_credentials(cp, tmp, "batcher", "default")
    channel = grpc.aio.secure_channel(
        cp.agent_target,
        grpc.ssl_channel_credentials(
            cp.ca_pem, private_key=credentials.key_pem, certificate_chain=credentials.certificate_pem
        ),
    )
    call = agent_pb2_grpc.AgentControlStub(channel).Connect()
    metadata = await asyncio.wait_for(call.initial_metadata(), WITHIN)
    assert ("testhide-batches", "1") in list(metadata)
    assert any(key == SESSION_ACCEPTED for key, _ in metadata)
    hello = agent_pb2.Hello(max_jobs=4, version="batcher", reads_batches=reads_batches)
    await call.write(agent_pb2.AgentMessage(hello=hello))
    return channel, call


async def read_until_fence(call: Call, fence: str) -> tuple[list[agent_pb2.ControlMessage], int]:
    """Every message answered before the fence's cancel (batches opened), and how
    many stream messages carried them."""
    answers: list[agent_pb2.ControlMessage] = []
    carried = 0
    while True:
        message = await asyncio.wait_for(call.read(), WITHIN)
        assert isinstance(message, agent_pb2.ControlMessage), message
        carried += 1
        inner = list(message.batch.messages) if message.WhichOneof("body") == "batch" else [message]
        for answer in inner:
            if answer.WhichOneof("body") == "cancel" and answer.cancel.job_id == fence:
                return answers, carried
            if answer.WhichOneof("body") != "trust_bundle":
                answers.append(answer)


async def assignments(call: Call, count: int) -> dict[str, int]:
    held: dict[str, int] = {}
    while len(held) < count:
        message = await asyncio.wait_for(call.read(), WITHIN)
        assert isinstance(message, agent_pb2.ControlMessage), message
        inner = list(message.batch.messages) if message.WhichOneof("body") == "batch" else [message]
        held.update({m.assign.job_id: m.assign.epoch for m in inner if m.WhichOneof("body") == "assign"})
    return held


def batch(*messages: agent_pb2.AgentMessage) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=messages))


def shown(messages: list[agent_pb2.ControlMessage]) -> list[str]:
    return [text_format.MessageToString(m, as_one_line=True) for m in messages]


async def test_each_report_of_a_batch_is_fenced_on_its_own(tmp_path: Path) -> None:
    async with control_plane(tmp_path, job_lease=timedelta(hours=1)) as cp:
        first, second = await submit(cp, workspace=False), await submit(cp, workspace=False)
        channel, call = await connect(cp, tmp_path, reads_batches=False)
        try:
            held = await assignments(call, 2)
            before = await state(cp, second)
            fence = new_job_id()
            stale = held[second] + 100
            await call.write(
                batch(
                    *job_messages("started", first, held[first]),
                    *job_messages("started", second, stale),
                    *job_messages("result", first, held[first], last_seq=0),
                    *job_messages("result", second, stale, last_seq=0),
                    agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=64)),  # never in a batch
                    log_batch(fence, 1, 1, b"fence"),
                )
            )
            answers, carried = await read_until_fence(call, fence)
        finally:
            call.cancel()
            await channel.close()
        # Answered as if sent one by one, in single messages (this agent did not ask for batches).
        stop = f'cancel {{ job_id: "{second}" reason: "{NotHeld(second)}" abandon: true }}'
        assert sorted(shown(answers)) == sorted([f'result_ack {{ job_id: "{first}" }}', stop, stop])
        assert carried == len(answers) + 1
        done = await job(cp, first)
        assert (done.status, done.exit_code) == (JobStatus.SUCCEEDED, 0)
        assert await state(cp, second) == before  # nothing of the stale reports was written


async def test_an_agent_that_reads_batches_gets_its_acknowledgements_together(tmp_path: Path) -> None:
    async with control_plane(tmp_path, job_lease=timedelta(hours=1)) as cp:
        jobs = [await submit(cp, workspace=False) for _ in range(3)]
        channel, call = await connect(cp, tmp_path, reads_batches=True)
        try:
            held = await assignments(call, 3)
            fence = new_job_id()
            reports = [m for j in jobs for m in job_messages("started", j, held[j])]
            reports += [m for j in jobs for m in job_messages("result", j, held[j], last_seq=0)]
            await call.write(batch(*reports))
            await call.write(log_batch(fence, 1, 1, b"fence"))
            answers, carried = await read_until_fence(call, fence)
        finally:
            call.cancel()
            await channel.close()
        assert sorted(shown(answers)) == sorted(f'result_ack {{ job_id: "{j}" }}' for j in jobs)
        assert carried < len(answers) + 1  # the three acknowledgements shared a message
        for job_id in jobs:
            assert (await job(cp, job_id)).status == JobStatus.SUCCEEDED


@pytest.mark.parametrize("kind", [SQLITE, POSTGRES])
async def test_a_group_of_reports_is_written_with_each_fenced_alone(tmp_path: Path, kind: str) -> None:
    async with empty_store(kind, tmp_path) as store:
        await populate(store)
        one, two = await assigned(store, "j1"), await assigned(store, "j2")
        isolation = Isolation(runtime="runc", user="65534:65534", read_only_root=True)
        outcomes = await store.report_jobs(
            [
                JobReport("acme", "agent-1", "j1", one.epoch, JobStatus.RUNNING, isolation=isolation),
                JobReport("acme", "agent-1", "j2", two.epoch + 1, JobStatus.RUNNING, isolation=isolation),
                JobReport("acme", "agent-2", "j2", two.epoch, JobStatus.SUCCEEDED, exit_code=0, last_seq=0),
                JobReport("acme", "agent-1", "j1", one.epoch, JobStatus.SUCCEEDED, exit_code=0, last_seq=3),
                JobReport("acme", "agent-1", "j1", one.epoch, JobStatus.FAILED, "", 2, last_seq=0),
                JobReport("acme", "agent-1", "j1", one.epoch, JobStatus.SUCCEEDED, exit_code=0, last_seq=0),
            ],
            NOW,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "tuple",
            "NotHeld",
            "NotHeld",
            "FailedPrecondition",
            "tuple",
            "tuple",
        ]
        assert [o[1] for o in outcomes if isinstance(o, tuple)] == [True, True, False]  # the last: past it
        ended = await stored(store, "j1")
        assert (ended.status, ended.exit_code, ended.isolation) == (JobStatus.FAILED, 2, isolation)
        untouched = await stored(store, "j2")
        assert (untouched.status, untouched.isolation) == (JobStatus.ASSIGNED, None)


async def stored(store: Store, job_id: str) -> Job:
    found = await store.get_job("acme", job_id)
    assert found is not None
    return found
