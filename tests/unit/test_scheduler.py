"""controlplane/jobs/scheduler.py on an in-memory ``QueueStore``: which agent
gets which job, and what a job nobody can take says about why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from testhide.common.identity import AgentIdentity
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs import scheduler as scheduler_module
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, PoolPolicy
from testhide.controlplane.jobs.scheduler import (
    AgentSession,
    Assign,
    AssignDetails,
    Flag,
    LogAck,
    Mailbox,
    Outbound,
    ResultAck,
    Scheduler,
)
from tests.unit.fakes import MemoryJobs

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def agent(
    agent_id: str,
    labels: dict[str, str] | None = None,
    runtimes: frozenset[str] = frozenset({"runc"}),
    max_jobs: int = 1,
) -> AgentSession:
    identity = AgentIdentity("td", "acme", "default", agent_id)
    return AgentSession(identity, 1, START + timedelta(hours=1), "ca", max_jobs, labels or {}, runtimes)


def queue(store: MemoryJobs, job_id: str, labels: dict[str, str] | None = None, runtime: str = "") -> Job:
    spec = JobSpec(image="busybox", command=("true",), labels=labels or {}, runtime=runtime)
    job = store.jobs[job_id] = Job(job_id, "acme", spec, JobStatus.QUEUED, START)
    return job


async def until(condition: Callable[[], bool]) -> None:
    """Let the dispatcher task run until ``condition`` holds (no sleeping)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the dispatcher did not get there")


async def received(session: AgentSession) -> Outbound:
    async with asyncio.timeout(5):
        return await session.outbox.get()


@pytest.fixture
def store() -> MemoryJobs:
    return MemoryJobs()


@pytest.fixture
async def scheduler(store: MemoryJobs) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(store, lease=timedelta(seconds=60))
    dispatcher = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        dispatcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dispatcher


async def test_a_job_goes_to_the_idle_agent_with_its_labels_and_runtime(
    store: MemoryJobs, scheduler: Scheduler
) -> None:
    plain, gpu, gvisor, gvisor_gpu = (
        agent("plain"),
        agent("gpu", {"gpu": "yes"}),
        agent("gvisor", {"gpu": "no"}, frozenset({"runc", "runsc"})),
        agent("gvisor-gpu", {"gpu": "yes"}, frozenset({"runc", "runsc"})),
    )
    for session in (plain, gpu, gvisor, gvisor_gpu):
        scheduler.attach(session)
    queue(store, "j1", {"gpu": "yes"}, runtime="runsc")

    message = await received(gvisor_gpu)

    assert isinstance(message, Assign)
    assert (message.job.id, message.job.agent_id, message.job.epoch) == ("j1", "gvisor-gpu", 1)
    assert message.details == AssignDetails({}, PoolPolicy(), "runc")
    assert store.jobs["j1"].status == JobStatus.ASSIGNED
    assert gvisor_gpu.jobs == {"j1"}
    assert len(plain.outbox) == len(gpu.outbox) == len(gvisor.outbox) == 0


async def test_a_job_nobody_can_take_waits_and_says_why_without_blocking_the_queue(
    store: MemoryJobs, scheduler: Scheduler
) -> None:
    stuck = queue(store, "j1", {"gpu": "yes"})
    queue(store, "j2")
    plain = agent("plain")
    scheduler.attach(plain)

    message = await received(plain)  # the job behind the one it cannot take

    assert isinstance(message, Assign)
    assert message.job.id == "j2"
    assert store.jobs["j1"].status == JobStatus.QUEUED
    assert scheduler.explain_queued(stuck) == (
        "waiting: no connected agent of pool 'default' offers labels gpu=yes and runtime runc"
    )


async def test_explain_queued_without_agents_busy_and_draining(
    store: MemoryJobs, scheduler: Scheduler
) -> None:
    job = queue(store, "j9")
    assert scheduler.explain_queued(job) == "waiting: no agent of pool 'default' is connected"

    busy = agent("busy")
    busy.jobs.add("other")  # its one slot is taken
    scheduler.attach(busy)
    assert scheduler.explain_queued(job) == "waiting for a free agent (1 able, all busy)"

    busy.draining = True
    assert scheduler.explain_queued(job).startswith(
        "waiting: the 1 able agent(s) of pool 'default' take no jobs"
    )
    assert store.jobs["j9"].status == JobStatus.QUEUED


async def test_an_agent_takes_as_many_jobs_as_it_has_slots(store: MemoryJobs, scheduler: Scheduler) -> None:
    for job_id in ("j1", "j2", "j3"):
        queue(store, job_id)
    two = agent("two", max_jobs=2)
    scheduler.attach(two)

    first, second = await received(two), await received(two)

    assert isinstance(first, Assign)
    assert isinstance(second, Assign)
    assert {first.job.id, second.job.id} == {"j1", "j2"}
    assert store.jobs["j3"].status == JobStatus.QUEUED
    assert two.free_slots == 0


async def test_a_job_whose_assignment_cannot_be_prepared_ends_as_error(
    store: MemoryJobs, scheduler: Scheduler
) -> None:
    async def prepare(job: Job) -> AssignDetails:
        raise InvalidArgument(f"secrets not found: {job.id}-token")

    scheduler.prepare = prepare
    queue(store, "j1")
    session = agent("a1")
    scheduler.attach(session)

    await until(lambda: store.jobs["j1"].status == JobStatus.ERROR)

    assert store.jobs["j1"].status_reason == "secrets not found: j1-token"
    assert len(session.outbox) == 0
    assert session.jobs == set()


async def test_a_newer_stream_of_the_same_agent_replaces_the_older(scheduler: Scheduler) -> None:
    older, newer = agent("a1"), agent("a1")
    scheduler.attach(older)
    scheduler.attach(newer)

    assert older.closed.is_set()
    assert scheduler.session_of("a1") is newer
    scheduler.detach(older)  # the old stream ending later does not remove the new one
    assert scheduler.session_of("a1") is newer


async def test_each_dispatch_round_leaves_a_debug_line_an_operator_can_read(
    store: MemoryJobs, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A logger of its own: one cached before (another test configured logging) bypasses capture_logs.
    monkeypatch.setattr(scheduler_module, "log", structlog.get_logger("testhide.scheduler"))
    queue(store, "j1", {"gpu": "yes"})
    queue(store, "j2")
    plain = agent("plain")
    with capture_logs() as events:
        scheduler.attach(plain)
        await received(plain)
        await until(lambda: any(e["event"] == "dispatch_round" for e in events))
    rounds = [e for e in events if e["event"] == "dispatch_round"]
    assert rounds[0]["log_level"] == "debug"
    assert {k: rounds[0][k] for k in ("org", "pool", "queued_seen", "assigned", "passed_over")} == {
        "org": "acme",
        "pool": "default",
        "queued_seen": 2,
        "assigned": 1,
        "passed_over": 1,
    }


async def test_a_round_reads_about_as_many_queued_jobs_as_there_are_free_slots(
    store: MemoryJobs, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits: list[int] = []
    read = store.queued_jobs

    async def counted(org: str, pool: str, limit: int) -> list[Job]:
        limits.append(limit)
        return await read(org, pool, limit)

    monkeypatch.setattr(store, "queued_jobs", counted)
    for n in range(500):  # a deep queue, one agent freeing up at a time
        queue(store, f"j{n:03}")
    session = agent("a1")
    scheduler.attach(session)

    assert isinstance(await received(session), Assign)
    assert limits == [4]  # not a wide window for one free slot


async def test_a_full_head_of_jobs_no_idle_agent_can_take_does_not_block_the_queue(
    store: MemoryJobs, scheduler: Scheduler
) -> None:
    for n in range(10):  # more than a one-slot round first reads
        queue(store, f"j{n}", {"gpu": "yes"})
    queue(store, "plain-job")
    session = agent("plain")
    scheduler.attach(session)

    message = await received(session)
    assert isinstance(message, Assign)
    assert message.job.id == "plain-job"


async def test_a_mailbox_hands_messages_over_in_order_and_holds_no_deque_once_drained() -> None:
    box = Mailbox()
    assert (len(box), box.take()) == (0, None)
    waiting = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)  # the writer waits
    box.put_nowait(ResultAck("j1"))
    box.put_nowait(LogAck("j1", 1))
    assert await asyncio.wait_for(waiting, 5) == ResultAck("j1")
    assert len(box) == 1
    assert box.take() == LogAck("j1", 1)
    assert (len(box), box.take(), box._items) == (0, None, None)  # an idle stream's empty mailbox


async def test_a_flag_wakes_its_waiters_once_set() -> None:
    flag = Flag()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not flag.is_set()
    assert not any(w.done() for w in waiters)
    flag.set()
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert flag.is_set()
    await asyncio.wait_for(flag.wait(), 5)  # set already: returns at once
