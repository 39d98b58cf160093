"""A full disk under the agent's spool (agent/spool.py, outbox.py, executor.py):
what the disk refuses is held in memory up to the in-flight bound, then the
job's output waits; it resumes when space returns or the control plane is
back, nothing is lost or reordered, and cancel still stops the container. The
disk here refuses writes on cue; tests/integration/test_build_host.py fills a
real one."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from testhide.agent import spool as spool_module
from testhide.agent.config import AgentConfig
from testhide.agent.executor import Executor
from testhide.agent.model import Assignment, JobResult, LogBatch, LogStream, Outcome, Report
from testhide.agent.outbox import Outbox
from testhide.agent.runtime.fake import FakeRuntime, Script
from testhide.agent.spool import Spool

OUT, SYS = LogStream.STDOUT, LogStream.SYSTEM
WAIT = 5.0


class FullDisk(Spool):
    """A spool whose disk refuses every write while ``full``, after taking half
    of it, as a disk filling mid-write does: the next write goes over that."""

    full = False
    refusals = 0

    def _write(self, job: Any, raw: bytes) -> None:
        if self.full:
            self.refusals += 1
            with open(job.path, "ab") as handle:
                handle.write(raw[: len(raw) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super()._write(job, raw)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """For state with no event to await (retries on a timer, a fake container)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture
def spool(tmp_path: Path) -> FullDisk:
    return FullDisk(tmp_path / "spool")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    # A logger of its own: one cached before (another test configured logging) bypasses capture_logs.
    monkeypatch.setattr(spool_module, "log", structlog.get_logger("testhide.agent.spool"))
    with capture_logs() as captured:
        yield captured


def data_of(reports: list[Report]) -> bytes:
    return b"".join(d for r in reports if isinstance(r, LogBatch) for _, d in r.entries)


def drain(outbox: Outbox, sent: list[Report], job_id: str = "j") -> None:
    """Acknowledge every batch as it arrives, until nothing more comes."""
    acked = 0
    while (batches := [r for r in sent if isinstance(r, LogBatch)]) and batches[-1].seq > acked:
        acked = batches[-1].seq
        outbox.ack_log(job_id, acked)


async def test_refused_writes_are_held_in_memory_then_the_job_waits_and_resumes_when_space_returns(
    spool: FullDisk, events: list[MutableMapping[str, Any]]
) -> None:
    outbox = Outbox(spool, window_bytes=8, disk_retry_s=0.01)
    outbox.open("j", 1)
    await outbox.log("j", [(OUT, b"1111")])  # on disk
    spool.full = True
    await outbox.log("j", [(OUT, b"2222")])  # refused: held in memory
    await outbox.log("j", [(OUT, b"3333")])
    assert (spool.size, spool.held) == (12, 8)
    waiting = asyncio.create_task(outbox.log("j", [(OUT, b"4444")]))  # memory holds its bound
    tried = spool.refusals
    await until(lambda: spool.refusals >= tried + 3, "the disk tried again")
    assert not waiting.done()
    assert spool.held == 8
    spool.full = False  # space again
    await asyncio.wait_for(waiting, WAIT)
    await outbox.log("j", [(OUT, b"5555")])
    outbox.finish("j", Outcome.EXITED, 0)
    sent: list[Report] = []
    outbox.attach(sent.append)
    drain(outbox, sent)
    assert data_of(sent) == b"11112222333344445555"
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2, 3, 4, 5]
    assert sent[-1] == JobResult("j", 1, 5, Outcome.EXITED, 0, "")
    assert (spool.size, spool.held) == (0, 0)
    [warning] = [e for e in events if e["event"] == "spool_write_failed"]
    assert (warning["log_level"], warning["errno"], warning["error"]) == (
        "warning",
        "ENOSPC",
        "No space left on device",
    )
    assert warning["path"] == str(spool.directory / "j.spool")
    assert [e["event"] for e in events if e["event"].startswith("spool_")] == [
        "spool_write_failed",
        "spool_writable_again",
        "spool_drained",  # all it held was read back, after the disk took writes again
    ]


async def test_the_control_plane_back_drains_what_a_full_disk_left_in_memory(spool: FullDisk) -> None:
    outbox = Outbox(spool, window_bytes=8, disk_retry_s=0.01)
    outbox.open("j", 1)
    spool.full = True  # and it stays full
    await outbox.log("j", [(OUT, b"aaaa")])
    await outbox.log("j", [(OUT, b"bbbb")])
    waiting = asyncio.create_task(outbox.log("j", [(OUT, b"cccc")]))
    await until(lambda: spool.refusals >= 4, "the disk tried again")
    assert not waiting.done()
    sent: list[Report] = []
    outbox.attach(sent.append)
    drain(outbox, sent)
    await asyncio.wait_for(waiting, WAIT)
    await outbox.log("j", [(OUT, b"dddd")])  # connected: straight out, no disk needed
    outbox.finish("j", Outcome.CANCELED, 143, "canceled by alice")
    drain(outbox, sent)
    assert data_of(sent) == b"aaaabbbbccccdddd"
    assert sent[-1] == JobResult("j", 1, 4, Outcome.CANCELED, 143, "canceled by alice")


async def test_a_dropped_job_stops_waiting_for_a_full_disk(spool: FullDisk) -> None:
    outbox = Outbox(spool, window_bytes=4, disk_retry_s=0.01)
    outbox.open("j", 1)
    spool.full = True
    await outbox.log("j", [(OUT, b"held")])
    waiting = asyncio.create_task(outbox.log("j", [(OUT, b"more")]))
    await until(lambda: spool.refusals >= 2, "the disk tried again")
    outbox.drop("j")  # the control plane gave the job to another agent
    await asyncio.wait_for(waiting, WAIT)
    assert (spool.size, spool.held) == (0, 0)


async def test_a_spool_record_that_cannot_be_read_back_becomes_a_line_saying_so(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outbox = Outbox(spool)
    outbox.open("j", 1)
    await outbox.log("j", [(OUT, b"first")])
    await outbox.log("j", [(OUT, b"second")])
    (spool.directory / "j.spool").unlink()  # an operator cleaning up, a failing disk
    sent: list[Report] = []
    outbox.attach(sent.append)
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2]
    assert data_of(sent).count(b"bytes of output lost") == 2


async def test_cancel_stops_the_container_while_its_output_can_go_nowhere(spool: FullDisk) -> None:
    """The agent is cut off and its disk is full: the job's output waits, but
    cancel (or a timeout) still stops the container; the result follows the
    log once there is somewhere for it to go."""
    config = AgentConfig(
        data_dir=spool.directory.parent, stop_grace=timedelta(seconds=3), log_batch_bytes=1024
    )
    runtime = FakeRuntime()
    runtime.scripts["j1"] = Script(output=[(OUT, b"x" * 3000)] * 10, hold=True)
    outbox = Outbox(spool, window_bytes=4096, disk_retry_s=0.01)
    executor = Executor(config, runtime, outbox)
    spool.full = True
    task = asyncio.create_task(
        executor.run(Assignment("j1", 1, "alpine:3", ("sh",), timeout=timedelta(minutes=5)))
    )
    await until(lambda: spool.refusals >= 3, "the job's output waiting")  # memory is full
    assert executor.cancel("j1", "canceled by alice")
    await until(lambda: runtime.started["j1"].stopped_with_grace is not None, "the container stopped")
    assert runtime.started["j1"].stopped_with_grace == 3.0
    assert not task.done()  # its output still waits
    sent: list[Report] = []
    outbox.attach(sent.append)  # the control plane is back

    def delivered() -> bool:
        drain(outbox, sent, "j1")
        return task.done()

    await until(delivered, "the result")
    await task
    drain(outbox, sent, "j1")
    assert data_of(sent) == b"x" * 30000
    result = sent[-1]
    assert isinstance(result, JobResult)
    assert (result.outcome, result.reason) == (Outcome.CANCELED, "canceled by alice")
    assert runtime.started["j1"].removed
