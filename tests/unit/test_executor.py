"""agent/executor.py on the scripted FakeRuntime: batching, outcomes, cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from testhide.agent.config import AgentConfig
from testhide.agent.executor import Executor
from testhide.agent.model import Assignment, JobResult, JobStarted, LogBatch, LogStream, Outcome, Report
from testhide.agent.outbox import Outbox
from testhide.agent.runtime.fake import FakeRuntime, Script
from testhide.agent.spool import Spool

OUT, ERR, SYS = LogStream.STDOUT, LogStream.STDERR, LogStream.SYSTEM
WAIT = 5.0  # generous upper bound for anything that should happen at once


class Harness:
    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.config = AgentConfig(data_dir=tmp_path, **config)  # type: ignore[arg-type]
        self.runtime = FakeRuntime()
        self.outbox = Outbox(Spool(tmp_path / "spool"))
        self.reports: list[Report] = []
        self._watchers: list[tuple[Callable[[Report], bool], asyncio.Event]] = []
        self.outbox.attach(self._send)
        self.executor = Executor(self.config, self.runtime, self.outbox)

    def _send(self, report: Report) -> None:
        self.reports.append(report)
        for predicate, event in self._watchers:
            if predicate(report):
                event.set()

    def when(self, predicate: Callable[[Report], bool]) -> asyncio.Event:
        event = asyncio.Event()
        self._watchers.append((predicate, event))
        return event

    def batches(self) -> list[LogBatch]:
        return [r for r in self.reports if isinstance(r, LogBatch)]

    def result(self) -> JobResult:
        results = [r for r in self.reports if isinstance(r, JobResult)]
        assert len(results) == 1, self.reports
        return results[0]

    def output(self) -> list[tuple[LogStream, bytes]]:
        joined: list[tuple[LogStream, bytes]] = []
        for batch in self.batches():
            for stream, data in batch.entries:
                if joined and joined[-1][0] == stream:
                    joined[-1] = (stream, joined[-1][1] + data)
                else:
                    joined.append((stream, data))
        return joined

    async def run(self, job: Assignment) -> None:
        await asyncio.wait_for(self.executor.run(job), WAIT)


def job(job_id: str = "j1", epoch: int = 1, **changes: object) -> Assignment:
    return Assignment(job_id, epoch, "alpine:3", ("sh", "-c", "true"), **changes)  # type: ignore[arg-type]


async def test_output_then_result(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    output = [(OUT, b"hello\n"), (ERR, b"oops\n"), (OUT, b"bye\n")]
    h.runtime.scripts["j1"] = Script(output=output, exit_code=3)
    await h.run(job(epoch=7))
    assert h.reports == [
        JobStarted("j1", 7),
        LogBatch("j1", 7, 1, ((OUT, b"hello\n"), (ERR, b"oops\n"), (OUT, b"bye\n"))),
        JobResult("j1", 7, 1, Outcome.EXITED, 3, ""),
    ]
    assert h.runtime.started["j1"].removed
    assert h.runtime.started["j1"].stopped_with_grace is None


async def test_no_output_means_no_batches(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.run(job())
    assert h.reports == [JobStarted("j1", 1), JobResult("j1", 1, 0, Outcome.EXITED, 0, "")]
    assert h.runtime.started["j1"].removed


async def test_container_spec_from_assignment_and_config(tmp_path: Path) -> None:
    h = Harness(tmp_path, job_user="1000:1000", runtime="runsc")
    assignment = job(env={"A": "1"}, workdir="/src", cpus=0.5, memory_bytes=64 * 1024**2, pids=99)
    await h.run(assignment)
    spec = h.runtime.specs["j1"]
    assert (spec.job_id, spec.image, spec.command) == ("j1", "alpine:3", ("sh", "-c", "true"))
    assert (spec.env, spec.workdir, spec.cpus, spec.memory_bytes, spec.pids) == (
        {"A": "1"},
        "/src",
        0.5,
        64 * 1024**2,
        99,
    )
    assert (spec.user, spec.runtime) == ("1000:1000", "runsc")


async def test_size_triggered_flush(tmp_path: Path) -> None:
    h = Harness(tmp_path, log_batch_bytes=1024)
    chunks = [(OUT, bytes([65 + i % 26]) * 100) for i in range(50)]  # 5000 bytes
    h.runtime.scripts["j1"] = Script(output=chunks)
    await h.run(job())
    batches = h.batches()
    assert len(batches) >= 4
    sizes = [sum(len(d) for _, d in b.entries) for b in batches]
    assert all(size >= 1024 for size in sizes[:-1]), sizes
    assert sum(sizes) == 5000
    assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
    assert h.output() == [(OUT, b"".join(d for _, d in chunks))]
    assert all(len(b.entries) == 1 for b in batches)  # same-stream chunks merged
    assert h.result().last_seq == len(batches)


async def test_size_flush_keeps_streams_in_order(tmp_path: Path) -> None:
    h = Harness(tmp_path, log_batch_bytes=1024)
    chunks = [((OUT, ERR)[i % 3 == 0], f"{i:04d}".encode() * 50) for i in range(40)]
    h.runtime.scripts["j1"] = Script(output=chunks, exit_code=1)
    await h.run(job())
    assert len(h.batches()) > 1
    expected: list[tuple[LogStream, bytes]] = []
    for stream, data in chunks:
        if expected and expected[-1][0] == stream:
            expected[-1] = (stream, expected[-1][1] + data)
        else:
            expected.append((stream, data))
    assert h.output() == expected
    assert h.result() == JobResult("j1", 1, len(h.batches()), Outcome.EXITED, 1, "")


async def test_time_triggered_flush_while_running(tmp_path: Path) -> None:
    h = Harness(tmp_path, log_batch_interval=timedelta(milliseconds=20))
    h.runtime.scripts["j1"] = Script(output=[(OUT, b"tick\n"), (ERR, b"tock\n")], hold=True)
    flushed = h.when(lambda r: isinstance(r, LogBatch))
    task = asyncio.create_task(h.executor.run(job(timeout=timedelta(seconds=30))))
    await asyncio.wait_for(flushed.wait(), WAIT)
    container = h.runtime.started["j1"]
    assert not task.done()
    assert container.stopped_with_grace is None
    assert not container.removed
    assert h.batches() == [LogBatch("j1", 1, 1, ((OUT, b"tick\n"), (ERR, b"tock\n")))]
    assert h.executor.cancel("j1", "done watching")
    await asyncio.wait_for(task, WAIT)
    assert h.result().last_seq == 1
    assert container.removed


async def test_cancel(tmp_path: Path) -> None:
    h = Harness(tmp_path, stop_grace=timedelta(seconds=7))
    h.runtime.scripts["j1"] = Script(output=[(OUT, b"working\n")], hold=True)
    started = h.when(lambda r: isinstance(r, JobStarted))
    task = asyncio.create_task(h.executor.run(job(timeout=timedelta(seconds=30))))
    await asyncio.wait_for(started.wait(), WAIT)
    assert not h.executor.cancel("other-job", "x")
    assert h.executor.cancel("j1", "canceled by alice")
    await asyncio.wait_for(task, WAIT)
    container = h.runtime.started["j1"]
    assert container.stopped_with_grace == 7.0
    assert container.removed
    assert h.output() == [(OUT, b"working\n")]
    assert h.result() == JobResult("j1", 1, 1, Outcome.CANCELED, 143, "canceled by alice")
    assert not h.executor.cancel("j1", "again")  # the job is over


async def test_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, stop_grace=timedelta(seconds=2))
    h.runtime.scripts["j1"] = Script(hold=True)
    await h.run(job(timeout=timedelta(milliseconds=50)))
    result = h.result()
    assert result.outcome == Outcome.TIMED_OUT
    assert "timed out" in result.reason
    assert result.exit_code == 143
    container = h.runtime.started["j1"]
    assert container.stopped_with_grace == 2.0
    assert container.removed


async def test_setup_error(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.runtime.scripts["j1"] = Script(setup_error="image 'nope:1' is not present on this agent's host")
    await h.run(job(epoch=4))
    assert h.reports == [
        LogBatch("j1", 4, 1, ((SYS, b"testhide: image 'nope:1' is not present on this agent's host\n"),)),
        JobResult("j1", 4, 1, Outcome.ERROR, -1, "image 'nope:1' is not present on this agent's host"),
    ]
    assert "j1" not in h.runtime.started
    assert not h.executor.cancel("j1", "late")


async def test_an_unexpected_start_failure_still_ends_the_job(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def broken_start(*_: object) -> None:
        raise RuntimeError("disk on fire")

    h.runtime.start = broken_start  # type: ignore[method-assign, assignment]
    await h.run(job(epoch=2))
    result = h.result()
    assert (result.outcome, result.exit_code) == (Outcome.ERROR, -1)
    assert "disk on fire" in result.reason
    assert h.outbox.running() == {"j1": 2}  # reported, waiting for the control plane's ack
    h.outbox.ack_result("j1")
    assert h.outbox.running() == {}
    assert not h.executor.cancel("j1", "late")  # nothing left behind


async def test_oom(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.runtime.scripts["j1"] = Script(output=[(ERR, b"Killed\n")], exit_code=137, oom_killed=True)
    await h.run(job())
    result = h.result()
    assert (result.outcome, result.exit_code) == (Outcome.EXITED, 137)
    assert "out of memory" in result.reason
    assert h.runtime.started["j1"].removed


async def test_agent_shutdown_cancels_the_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, stop_grace=timedelta(seconds=9))
    h.runtime.scripts["j1"] = Script(output=[(OUT, b"x")], hold=True)
    started = h.when(lambda r: isinstance(r, JobStarted))
    task = asyncio.create_task(h.executor.run(job(timeout=timedelta(seconds=30))))
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    container = h.runtime.started["j1"]
    assert container.stopped_with_grace == 0
    assert container.removed
    assert not any(isinstance(r, JobResult) for r in h.reports)
    assert not h.executor.cancel("j1", "gone")


async def test_jobs_run_independently(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.runtime.scripts["a"] = Script(output=[(OUT, b"a")], hold=True)
    h.runtime.scripts["b"] = Script(output=[(OUT, b"b")], exit_code=5)
    started = h.when(lambda r: isinstance(r, JobStarted) and r.job_id == "a")
    task_a = asyncio.create_task(h.executor.run(job("a", timeout=timedelta(seconds=30))))
    await asyncio.wait_for(started.wait(), WAIT)
    await h.run(job("b", epoch=2))
    b_result = [r for r in h.reports if isinstance(r, JobResult) and r.job_id == "b"]
    assert b_result == [JobResult("b", 2, 1, Outcome.EXITED, 5, "")]
    assert not task_a.done()
    assert h.executor.cancel("a", "stop")
    await asyncio.wait_for(task_a, WAIT)
    a_results = [r for r in h.reports if isinstance(r, JobResult) and r.job_id == "a"]
    assert [r.outcome for r in a_results] == [Outcome.CANCELED]
