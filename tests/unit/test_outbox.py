"""agent/outbox.py: reports kept until acknowledged, replayed on reconnect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from testhide.agent.model import JobRefused, JobResult, JobStarted, LogBatch, LogStream, Outcome, Report
from testhide.agent.outbox import Outbox
from testhide.agent.spool import Spool

OUT, ERR = LogStream.STDOUT, LogStream.STDERR


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def attached(spool: Spool, **options: int) -> tuple[Outbox, list[Report]]:
    outbox = Outbox(spool, **options)
    sent: list[Report] = []
    outbox.attach(sent.append)
    return outbox, sent


async def test_reports_emitted_while_attached(spool: Spool) -> None:
    outbox, sent = attached(spool)
    outbox.open("j1", 3)
    assert sent == []
    outbox.started("j1")
    await outbox.log("j1", [(OUT, b"a"), (ERR, b"b")])
    await outbox.log("j1", [(OUT, b"c")])
    outbox.finish("j1", Outcome.EXITED, 2, "")
    assert sent == [
        JobStarted("j1", 3),
        LogBatch("j1", 3, 1, ((OUT, b"a"), (ERR, b"b"))),
        LogBatch("j1", 3, 2, ((OUT, b"c"),)),
        JobResult("j1", 3, 2, Outcome.EXITED, 2, ""),
    ]


async def test_result_without_logs_has_last_seq_zero(spool: Spool) -> None:
    outbox, sent = attached(spool)
    outbox.open("j", 1)
    outbox.finish("j", Outcome.ERROR, -1, "boom")
    assert sent == [JobResult("j", 1, 0, Outcome.ERROR, -1, "boom")]


async def test_log_copies_the_entry_list(spool: Spool) -> None:
    outbox, sent = attached(spool)
    outbox.open("j", 1)
    entries = [(OUT, b"x")]
    await outbox.log("j", entries)
    entries.append((ERR, b"y"))
    assert sent[0] == LogBatch("j", 1, 1, ((OUT, b"x"),))


async def test_detached_reports_are_kept_and_replayed_in_order(spool: Spool) -> None:
    outbox = Outbox(spool)
    outbox.open("j1", 5)
    outbox.started("j1")
    await outbox.log("j1", [(OUT, b"1")])
    await outbox.log("j1", [(OUT, b"2")])
    await outbox.log("j1", [(ERR, b"3")])
    outbox.finish("j1", Outcome.EXITED, 0)
    sent: list[Report] = []
    outbox.attach(sent.append)
    assert sent == [
        JobStarted("j1", 5),
        LogBatch("j1", 5, 1, ((OUT, b"1"),)),
        LogBatch("j1", 5, 2, ((OUT, b"2"),)),
        LogBatch("j1", 5, 3, ((ERR, b"3"),)),
        JobResult("j1", 5, 3, Outcome.EXITED, 0, ""),
    ]
    # Attached now: new reports go straight out.
    outbox.open("j2", 1)
    outbox.started("j2")
    assert sent[-1] == JobStarted("j2", 1)


async def test_detach_stops_sending_and_reattach_replays_all_unacked(spool: Spool) -> None:
    outbox, first = attached(spool)
    outbox.open("j", 1)
    outbox.started("j")
    await outbox.log("j", [(OUT, b"a")])
    outbox.detach()
    await outbox.log("j", [(OUT, b"b")])
    assert len(first) == 2
    second: list[Report] = []
    outbox.attach(second.append)
    assert second == [
        JobStarted("j", 1),
        LogBatch("j", 1, 1, ((OUT, b"a"),)),
        LogBatch("j", 1, 2, ((OUT, b"b"),)),
    ]
    assert len(first) == 2


async def test_replay_skips_acked_batches_and_started(spool: Spool) -> None:
    outbox, _ = attached(spool)
    outbox.open("j", 2)
    outbox.started("j")
    for i in range(1, 6):
        await outbox.log("j", [(OUT, str(i).encode())])
    outbox.ack_log("j", 3)  # cumulative: 1, 2 and 3
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert [r.seq for r in replay if isinstance(r, LogBatch)] == [4, 5]
    assert not any(isinstance(r, JobStarted) for r in replay)


async def test_ack_log_out_of_order_and_unknown_jobs(spool: Spool) -> None:
    outbox, _ = attached(spool)
    outbox.open("j", 1)
    for i in range(4):
        await outbox.log("j", [(OUT, b"x" * (i + 1))])
    assert outbox.unacked_bytes() == 1 + 2 + 3 + 4
    outbox.ack_log("j", 2)
    assert outbox.unacked_bytes() == 3 + 4
    outbox.ack_log("j", 1)  # an older ack changes nothing
    assert outbox.unacked_bytes() == 3 + 4
    outbox.ack_log("j", 10)
    assert outbox.unacked_bytes() == 0
    outbox.ack_log("nope", 1)  # ignored
    # Sequence numbers keep counting after acks.
    await outbox.log("j", [(OUT, b"z")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("j", 1, 5, ((OUT, b"z"),))]


async def test_ack_result_forgets_the_job(spool: Spool) -> None:
    outbox, _ = attached(spool)
    outbox.open("j", 1)
    outbox.started("j")
    await outbox.log("j", [(OUT, b"x")])
    outbox.finish("j", Outcome.EXITED, 0)
    assert outbox.running() == {"j": 1}
    outbox.ack_result("j")
    assert outbox.running() == {}
    assert outbox.unacked_bytes() == 0
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == []
    outbox.ack_result("j")  # twice is harmless


async def test_drop_reports_nothing_more(spool: Spool) -> None:
    outbox = Outbox(spool)
    outbox.open("a", 1)
    await outbox.log("a", [(OUT, b"a")])
    outbox.open("b", 2)
    await outbox.log("b", [(OUT, b"b")])
    outbox.drop("a")
    outbox.drop("missing")
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("b", 2, 1, ((OUT, b"b"),))]
    assert outbox.running() == {"b": 2}


async def test_running_lists_epochs_until_result_acked(spool: Spool) -> None:
    outbox = Outbox(spool)
    assert outbox.running() == {}
    outbox.open("a", 1)
    outbox.open("b", 7)
    outbox.finish("a", Outcome.EXITED, 0)
    assert outbox.running() == {"a": 1, "b": 7}
    outbox.ack_result("a")
    assert outbox.running() == {"b": 7}


async def test_replay_covers_every_job(spool: Spool) -> None:
    outbox = Outbox(spool)
    outbox.open("a", 1)
    await outbox.log("a", [(OUT, b"a1")])
    outbox.open("b", 2)
    outbox.started("b")
    outbox.finish("b", Outcome.CANCELED, 143, "stop")
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert sorted(map(repr, replay)) == sorted(
        map(
            repr,
            [
                LogBatch("a", 1, 1, ((OUT, b"a1"),)),
                JobStarted("b", 2),
                JobResult("b", 2, 0, Outcome.CANCELED, 143, "stop"),
            ],
        )
    )
    # Within a job, order is started, batches, result.
    b_reports = [r for r in replay if r.job_id == "b"]
    assert b_reports == [JobStarted("b", 2), JobResult("b", 2, 0, Outcome.CANCELED, 143, "stop")]


async def test_reopen_with_new_epoch_starts_afresh(spool: Spool) -> None:
    outbox = Outbox(spool)
    outbox.open("j", 1)
    await outbox.log("j", [(OUT, b"old")])
    outbox.open("j", 2)
    await outbox.log("j", [(OUT, b"new")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("j", 2, 1, ((OUT, b"new"),))]


async def test_reopen_of_the_same_assignment_keeps_its_reports(spool: Spool) -> None:
    outbox = Outbox(spool)
    outbox.open("j", 3)
    outbox.started("j")
    await outbox.log("j", [(OUT, b"kept")])
    outbox.open("j", 3)  # e.g. a replayed assignment
    await outbox.log("j", [(OUT, b"more")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [
        JobStarted("j", 3),
        LogBatch("j", 3, 1, ((OUT, b"kept"),)),
        LogBatch("j", 3, 2, ((OUT, b"more"),)),
    ]


# ------------------------------------------------------------ window and disk spool


def data_of(reports: list[Report]) -> bytes:
    return b"".join(d for r in reports if isinstance(r, LogBatch) for _, d in r.entries)


async def logged(spool: Spool, batches: int, **options: int) -> tuple[Outbox, list[Report]]:
    """An attached outbox that has made job j's ``batches`` batches of 4 bytes: AAAA, BBBB..."""
    outbox, sent = attached(spool, **options)
    outbox.open("j", 1)
    for i in range(batches):
        await outbox.log("j", [(OUT, bytes([65 + i]) * 4)])
    return outbox, sent


async def test_past_the_window_batches_wait_on_disk_and_follow_acks(spool: Spool) -> None:
    outbox, sent = await logged(spool, 5, window_bytes=10, memory_bytes=0)
    outbox.finish("j", Outcome.EXITED, 0)
    # 4 + 4 fit the window (10 bytes); the rest, and the result behind them, wait on disk.
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2]
    assert spool.size == 12
    assert list(spool.directory.iterdir())
    assert outbox.unacked_bytes() == 20
    outbox.ack_log("j", 2)
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2, 3, 4]
    assert not any(isinstance(r, JobResult) for r in sent)  # batch 5 is still waiting
    outbox.ack_log("j", 4)
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2, 3, 4, 5]
    assert isinstance(sent[-1], JobResult)
    assert sent[-1].last_seq == 5
    assert data_of(sent) == b"AAAABBBBCCCCDDDDEEEE"
    assert spool.size == 0
    assert not list(spool.directory.iterdir())


async def test_connected_past_the_window_batches_wait_in_memory_then_on_disk_in_order(spool: Spool) -> None:
    outbox, sent = await logged(spool, 4, window_bytes=8, memory_bytes=8)
    # A and B in flight, C and D wait in memory: nothing written.
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2]
    assert (spool.size, spool.kept) == (8, 8)
    assert not list(spool.directory.iterdir())
    await outbox.log("j", [(OUT, b"EEEE")])  # memory is full: E goes to disk, behind them
    assert (spool.size, spool.kept) == (12, 8)
    assert list(spool.directory.iterdir())
    outbox.ack_log("j", 2)
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2, 3, 4]
    assert spool.kept == 0
    await outbox.log("j", [(OUT, b"FFFF")])  # behind E, in memory again
    assert (spool.size, spool.kept) == (8, 4)
    outbox.finish("j", Outcome.EXITED, 0)
    outbox.ack_log("j", 4)
    outbox.ack_log("j", 6)
    assert [r.seq for r in sent if isinstance(r, LogBatch)] == [1, 2, 3, 4, 5, 6]
    assert data_of(sent) == b"AAAABBBBCCCCDDDDEEEEFFFF"
    assert isinstance(sent[-1], JobResult)
    assert sent[-1].last_seq == 6
    assert (spool.size, spool.kept) == (0, 0)
    assert not list(spool.directory.iterdir())


async def test_cut_off_agent_spools_then_replays_everything_in_order(spool: Spool) -> None:
    outbox = Outbox(spool, window_bytes=8)
    outbox.open("j", 2)
    outbox.started("j")
    lines = [f"{n}\n".encode() for n in range(1, 200)]
    for line in lines:
        await outbox.log("j", [(OUT, line)])
    outbox.finish("j", Outcome.EXITED, 0)
    replay: list[Report] = []
    outbox.attach(replay.append)
    while (sent := [r for r in replay if isinstance(r, LogBatch)]) and not isinstance(replay[-1], JobResult):
        outbox.ack_log("j", sent[-1].seq)
    assert replay[0] == JobStarted("j", 2)
    assert [r.seq for r in replay if isinstance(r, LogBatch)] == list(range(1, 200))
    assert data_of(replay) == b"".join(lines)
    assert replay[-1] == JobResult("j", 2, 199, Outcome.EXITED, 0, "")


async def test_full_spool_makes_the_job_wait_not_drop(spool: Spool) -> None:
    outbox = Outbox(spool, max_spool_bytes=8, window_bytes=4)
    outbox.open("j", 1)
    await outbox.log("j", [(OUT, b"1234")])
    await outbox.log("j", [(OUT, b"5678")])
    blocked = asyncio.create_task(outbox.log("j", [(OUT, b"9abc")]))
    await asyncio.sleep(0)  # let it reach its wait
    assert not blocked.done()
    assert spool.size == 8
    sent: list[Report] = []
    outbox.attach(sent.append)  # connected again: the spool drains into the window
    outbox.ack_log("j", 1)
    await asyncio.wait_for(blocked, 5)
    outbox.ack_log("j", 2)
    outbox.ack_log("j", 3)
    assert data_of(sent) == b"123456789abc"


async def test_abandoned_job_reports_nothing_even_if_reopened(spool: Spool) -> None:
    outbox, sent = attached(spool)
    outbox.open("j", 4)
    outbox.started("j")
    outbox.drop("j")
    outbox.open("j", 4)  # the executor reopens the same assignment: still abandoned
    await outbox.log("j", [(OUT, b"late")])
    outbox.started("j")
    outbox.finish("j", Outcome.EXITED, 0)
    assert sent == [JobStarted("j", 4)]
    assert outbox.running() == {}
    outbox.open("j", 5)  # a new assignment of the same job is ours again
    assert outbox.running() == {"j": 5}


async def test_wait_empty_until_results_are_acknowledged(spool: Spool) -> None:
    outbox, _ = attached(spool)
    await asyncio.wait_for(outbox.wait_empty(), 1)
    outbox.open("j", 1)
    outbox.finish("j", Outcome.EXITED, 0)
    waiting = asyncio.create_task(outbox.wait_empty())
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.ack_result("j")
    await asyncio.wait_for(waiting, 1)


def test_spool_starts_empty_and_private(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "old.spool").write_bytes(b"from a run that died")
    spool = Spool(directory)
    assert list(directory.iterdir()) == []
    assert spool.size == 0
    assert directory.stat().st_mode & 0o777 == 0o700
    spool.put(LogBatch("j", 1, 1, ((OUT, b"a"), (ERR, b""), (LogStream.SYSTEM, b"\x00\xff"))))
    assert (directory / "j.spool").stat().st_mode & 0o777 == 0o600
    assert spool.take("j") == LogBatch("j", 1, 1, ((OUT, b"a"), (ERR, b""), (LogStream.SYSTEM, b"\x00\xff")))


async def test_a_refused_assignment_is_given_back_once_and_then_silent(spool: Spool) -> None:
    outbox, sent = attached(spool)
    outbox.open("j", 3)
    outbox.refuse("j", "the container engine is not answering")
    outbox.started("j")
    await outbox.log("j", [(OUT, b"never")])
    outbox.finish("j", Outcome.ERROR, -1)
    assert sent == [JobRefused("j", 3, "the container engine is not answering")]
    assert outbox.running() == {}
