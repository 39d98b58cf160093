"""The follower's reconnect window, on a fake control plane and a fake clock:
a follow of any length rides out a restart, every restart gets the whole
window, a control plane gone for longer than the window ends the follow, and
one that was never reached is reported at once."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from testhide.cli.errors import Disconnected, RpcFailed, Unreachable
from testhide.cli.follow import Reconnect, follow_attempts, stream_log
from testhide.cli.model import Job, JobStatus, LogChunk, LogStream

SERVER = "cp.test:7443"
WINDOW = timedelta(minutes=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def finished_job(
    job_id: str = "j1", status: JobStatus = JobStatus.SUCCEEDED, retried_as: str | None = None
) -> Job:
    return Job(
        id=job_id,
        status=status,
        exit_code=0 if status == JobStatus.SUCCEEDED else None,
        status_reason="",
        image="img",
        command=("true",),
        pool="default",
        agent_id="a1",
        created_at=None,
        started_at=None,
        finished_at=None,
        log_size=0,
        transitions=(),
        attempt=1,
        retries=1,
        retry_of=None,
        retried_as=retried_as,
    )


# One attempt of the follower: what the control plane does, in order. A float
# lets time pass (the stream stays open meanwhile), bytes are a chunk of
# stdout, an exception ends the attempt, a Job ends the follow.
Step = float | bytes | Exception | Job


@dataclass
class FakeControlPlane:
    """Answers each `follow` with the next script; the clock advances as the
    scripts say. ``reached`` is the wire client's ``connected``."""

    clock: FakeClock
    scripts: list[list[Step]]
    reached: bool = True
    offsets: list[int] = field(default_factory=list)
    server: str = SERVER

    @property
    def connected(self) -> bool:
        return self.reached

    async def follow(self, job_id: str, offset: int, follow: bool) -> AsyncIterator[LogChunk | Job]:
        self.offsets.append(offset)
        for step in self.scripts.pop(0):
            if isinstance(step, float):
                self.clock.now += step
            elif isinstance(step, bytes):
                yield LogChunk(offset, LogStream.STDOUT, step)
                offset += len(step)
            elif isinstance(step, Job):
                yield step
                return
            else:
                raise step


def dropped() -> Disconnected:
    return Disconnected(SERVER, "Socket closed")


def refused() -> Unreachable:
    return Unreachable(SERVER, "failed to connect to all addresses; Connection refused")


async def follow(
    plane: FakeControlPlane, clock: FakeClock, notices: list[str] | None = None
) -> tuple[Job, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    sink = notices if notices is not None else []
    job = await follow_attempts(
        plane, "j1", out, err, Reconnect(WINDOW, clock=clock, sleep=clock.sleep), sink.append
    )
    return job, out.getvalue()


async def test_a_restart_after_more_than_the_window_of_following_is_ridden_out() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(
        clock,
        [
            [b"first\n", 400.0, dropped()],  # followed for 6m40s, then the control plane restarts
            [refused()],
            [refused()],
            [b"second\n", finished_job()],
        ],
    )
    notices: list[str] = []
    job, out = await follow(plane, clock, notices)
    assert job.status == JobStatus.SUCCEEDED
    assert out == b"first\nsecond\n"
    assert plane.offsets == [0, 6, 6, 6]  # resumed from the byte it stopped at
    assert len(notices) == 1
    assert "lost the connection to the control plane at cp.test:7443" in notices[0]
    assert "reconnecting for up to 5m" in notices[0]


async def test_every_restart_gets_the_whole_window_even_while_the_job_prints_nothing() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(
        clock,
        [
            [b"started\n", 30.0, dropped()],
            [200.0, refused()],  # down for over 3 minutes
            [240.0, dropped()],  # open for 4 minutes without a byte of log (headers only), dropped again
            [200.0, refused()],  # down for over 3 minutes again: 7 minutes without a byte in all
            [b"done\n", finished_job()],
        ],
    )
    job, out = await follow(plane, clock)
    assert job.status == JobStatus.SUCCEEDED
    assert out == b"started\ndone\n"
    assert plane.offsets == [0, 8, 8, 8, 8]


async def test_an_outage_longer_than_the_window_ends_the_follow_clearly() -> None:
    clock = FakeClock()
    forever: list[list[Step]] = [[refused()] for _ in range(1000)]
    plane = FakeControlPlane(clock, [[b"x\n", 10.0, dropped()], *forever])
    with pytest.raises(Unreachable) as raised:
        await follow(plane, clock)
    assert raised.value.exit_code == 125
    assert "cannot reach the control plane at cp.test:7443" in raised.value.message
    assert "gave up after reconnecting for 5m" in raised.value.message
    # Not a second before the window, and not much after it either.
    assert WINDOW.total_seconds() <= sum(clock.slept) <= WINDOW.total_seconds() + 5


async def test_a_control_plane_never_reached_is_reported_at_once() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(clock, [[refused()]], reached=False)
    with pytest.raises(Unreachable) as raised:
        await follow(plane, clock)
    assert clock.slept == []
    assert "cannot reach the control plane at cp.test:7443" in raised.value.message
    assert "gave up" not in raised.value.message


async def test_a_refusal_is_not_retried() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(clock, [[RpcFailed("NOT_FOUND", "job j1 not found")]])
    with pytest.raises(RpcFailed) as raised:
        await follow(plane, clock)
    assert raised.value.code == "NOT_FOUND"
    assert clock.slept == []


async def test_a_server_answering_unavailable_is_retried_within_the_window() -> None:
    clock = FakeClock()
    locked = RpcFailed("UNAVAILABLE", "database is locked by another process")
    plane = FakeControlPlane(clock, [[b"a\n", locked], [locked], [b"b\n", finished_job()]])
    job, out = await follow(plane, clock)
    assert out == b"a\nb\n"
    assert job.status == JobStatus.SUCCEEDED


async def test_a_lost_job_is_followed_into_its_retry() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(
        clock,
        [
            [b"one\n", finished_job("j1", JobStatus.LOST, retried_as="j2")],
            [b"two\n", finished_job("j2")],
        ],
    )
    notices: list[str] = []
    job, out = await follow(plane, clock, notices)
    assert (job.id, out) == ("j2", b"one\ntwo\n")
    assert "retrying as job j2 (attempt 2 of 2)" in notices[0]


async def test_logs_without_follow_returns_after_the_stored_log() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(clock, [[b"stored\n"]])
    out, err = io.BytesIO(), io.BytesIO()
    assert await stream_log(plane, "j1", False, out, err, Reconnect(clock=clock, sleep=clock.sleep)) is None
    assert out.getvalue() == b"stored\n"
