"""What `testhide run` says about its waiting job (cli/follow.py WaitNotices) and
what Ctrl-C does (cli/interrupt.py), on a real event loop with real SIGINTs
sent to this process; no control plane (tests/integration/test_job_explain.py
runs the command itself)."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

from testhide.cli.errors import RpcFailed
from testhide.cli.follow import WaitNotices
from testhide.cli.interrupt import Interrupts
from testhide.cli.model import Job, JobAgent, JobStatus


def job(status: JobStatus, reason: str = "", job_id: str = "j1") -> Job:
    return Job(
        id=job_id,
        status=status,
        exit_code=None,
        status_reason=reason,
        image="busybox",
        command=("true",),
        pool="default",
        agent_id=None,
        created_at=None,
        started_at=None,
        finished_at=None,
        log_size=0,
        transitions=(),
        attempt=1,
        retries=0,
        retry_of=None,
        retried_as=None,
    )


def test_why_a_job_waits_is_said_once_per_reason_then_where_it_runs() -> None:
    said: list[str] = []
    notices = WaitNotices(said.append)
    nobody = "waiting: no agent of pool 'default' is connected"
    busy = "waiting for a free agent (1 able, all busy)"
    for update in (
        job(JobStatus.QUEUED, nobody),
        job(JobStatus.QUEUED, nobody),
        job(JobStatus.QUEUED, busy),
        job(JobStatus.QUEUED, busy),
        job(JobStatus.ASSIGNED, ""),
    ):
        notices.update(update)
    running = replace(job(JobStatus.RUNNING), agent=JobAgent("a1", "box-1", "build-7", "1.0", "default"))
    notices.update(running)
    notices.update(running)
    assert said == [
        f"job j1 queued: {nobody}",
        f"job j1 queued: {busy}",
        "job j1 running on box-1 (build-7)",
    ]
    notices.update(job(JobStatus.QUEUED, nobody, job_id="j2"))  # a retry is a job of its own
    assert said[-1] == f"job j2 queued: {nobody}"
    assert notices.job_id == "j2"


class Follower:
    """The follow of a job that ends when the test says (as a CANCELED job would)."""

    def __init__(self) -> None:
        self.canceled: list[str] = []
        self.end = asyncio.Event()

    async def follow(self) -> str:
        await self.end.wait()
        return "CANCELED"

    async def cancel(self, job_id: str) -> None:
        self.canceled.append(job_id)
        self.end.set()


class Said(list[str]):
    """The notices, and an event for the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.heard = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.append(line)
        self.heard.set()


async def ctrl_c(said: Said) -> None:
    """SIGINT to this process; returns once its handler (run by the loop) said something."""
    said.heard.clear()
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(said.heard.wait(), 5)


async def test_the_first_ctrl_c_cancels_and_keeps_following() -> None:
    said = Said()
    source = Follower()
    interrupts = Interrupts(lambda: "j1", source.cancel, said)
    follower = asyncio.ensure_future(source.follow())
    with interrupts.installed(follower):
        await ctrl_c(said)
        assert await follower == "CANCELED"
    await interrupts.settle()
    assert source.canceled == ["j1"]
    assert said == ["testhide: canceling job j1 (press Ctrl-C again to detach)"]
    assert not interrupts.detached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


async def test_a_second_ctrl_c_detaches_and_the_cancel_still_goes_out() -> None:
    said = Said()
    arrived = asyncio.Event()

    async def slow_cancel(job_id: str) -> None:
        await asyncio.sleep(0.05)  # a cancel still on its way when the second press comes
        arrived.set()

    interrupts = Interrupts(lambda: "j1", slow_cancel, said)
    follower = asyncio.ensure_future(asyncio.Event().wait())
    with interrupts.installed(follower):
        await ctrl_c(said)
        await ctrl_c(said)
        assert follower.cancelled()
    await interrupts.settle()
    assert arrived.is_set()
    assert interrupts.detached
    assert said == [
        "testhide: canceling job j1 (press Ctrl-C again to detach)",
        "testhide: detached; job j1 is being canceled (it stops within the agent's grace period): "
        "follow with 'testhide logs -f j1'",
    ]


async def test_detach_at_once_cancels_nothing() -> None:
    said = Said()
    canceled: list[str] = []

    async def cancel(job_id: str) -> None:
        canceled.append(job_id)

    interrupts = Interrupts(lambda: "j1", cancel, said, detach_at_once=True)
    follower = asyncio.ensure_future(asyncio.Event().wait())
    with interrupts.installed(follower):
        await ctrl_c(said)
    await interrupts.settle()
    assert follower.cancelled()
    assert interrupts.detached
    assert canceled == []
    assert said == [
        "testhide: detached; job j1 continues: follow with 'testhide logs -f j1', "
        "cancel with 'testhide cancel j1'"
    ]


async def test_a_refused_cancel_is_said_and_the_follow_goes_on() -> None:
    said = Said()

    async def refused(job_id: str) -> None:
        raise RpcFailed("FAILED_PRECONDITION", "job j1 has already ended (SUCCEEDED)")

    interrupts = Interrupts(lambda: "j1", refused, said)
    follower = asyncio.ensure_future(asyncio.sleep(0.05, "SUCCEEDED"))
    with interrupts.installed(follower):
        await ctrl_c(said)
        assert await follower == "SUCCEEDED"
    await interrupts.settle()
    assert said[1].startswith("testhide: could not cancel job j1: ")
    assert "already ended" in said[1]
