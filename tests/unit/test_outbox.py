"""agent/outbox.py: reports kept until acknowledged, replayed on reconnect."""

from __future__ import annotations

from agent.model import JobResult, JobStarted, LogBatch, LogStream, Outcome, Report
from agent.outbox import Outbox

OUT, ERR = LogStream.STDOUT, LogStream.STDERR


def attached() -> tuple[Outbox, list[Report]]:
    outbox, sent = Outbox(), []
    outbox.attach(sent.append)
    return outbox, sent


def test_reports_emitted_while_attached() -> None:
    outbox, sent = attached()
    outbox.open("j1", 3)
    assert sent == []
    outbox.started("j1")
    outbox.log("j1", [(OUT, b"a"), (ERR, b"b")])
    outbox.log("j1", [(OUT, b"c")])
    outbox.finish("j1", Outcome.EXITED, 2, "")
    assert sent == [
        JobStarted("j1", 3),
        LogBatch("j1", 3, 1, ((OUT, b"a"), (ERR, b"b"))),
        LogBatch("j1", 3, 2, ((OUT, b"c"),)),
        JobResult("j1", 3, 2, Outcome.EXITED, 2, ""),
    ]


def test_result_without_logs_has_last_seq_zero() -> None:
    outbox, sent = attached()
    outbox.open("j", 1)
    outbox.finish("j", Outcome.ERROR, -1, "boom")
    assert sent == [JobResult("j", 1, 0, Outcome.ERROR, -1, "boom")]


def test_log_copies_the_entry_list() -> None:
    outbox, sent = attached()
    outbox.open("j", 1)
    entries = [(OUT, b"x")]
    outbox.log("j", entries)
    entries.append((ERR, b"y"))
    assert sent[0] == LogBatch("j", 1, 1, ((OUT, b"x"),))


def test_detached_reports_are_kept_and_replayed_in_order() -> None:
    outbox = Outbox()
    outbox.open("j1", 5)
    outbox.started("j1")
    outbox.log("j1", [(OUT, b"1")])
    outbox.log("j1", [(OUT, b"2")])
    outbox.log("j1", [(ERR, b"3")])
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


def test_detach_stops_sending_and_reattach_replays_all_unacked() -> None:
    outbox, first = attached()
    outbox.open("j", 1)
    outbox.started("j")
    outbox.log("j", [(OUT, b"a")])
    outbox.detach()
    outbox.log("j", [(OUT, b"b")])
    assert len(first) == 2
    second: list[Report] = []
    outbox.attach(second.append)
    assert second == [JobStarted("j", 1), LogBatch("j", 1, 1, ((OUT, b"a"),)),
                      LogBatch("j", 1, 2, ((OUT, b"b"),))]
    assert len(first) == 2


def test_replay_skips_acked_batches_and_started() -> None:
    outbox, _ = attached()
    outbox.open("j", 2)
    outbox.started("j")
    for i in range(1, 6):
        outbox.log("j", [(OUT, str(i).encode())])
    outbox.ack_log("j", 3)  # cumulative: 1, 2 and 3
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert [r.seq for r in replay if isinstance(r, LogBatch)] == [4, 5]
    assert not any(isinstance(r, JobStarted) for r in replay)


def test_ack_log_out_of_order_and_unknown_jobs() -> None:
    outbox, _ = attached()
    outbox.open("j", 1)
    for i in range(4):
        outbox.log("j", [(OUT, b"x" * (i + 1))])
    assert outbox.unacked_bytes() == 1 + 2 + 3 + 4
    outbox.ack_log("j", 2)
    assert outbox.unacked_bytes() == 3 + 4
    outbox.ack_log("j", 1)  # an older ack changes nothing
    assert outbox.unacked_bytes() == 3 + 4
    outbox.ack_log("j", 10)
    assert outbox.unacked_bytes() == 0
    outbox.ack_log("nope", 1)  # ignored
    # Sequence numbers keep counting after acks.
    outbox.log("j", [(OUT, b"z")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("j", 1, 5, ((OUT, b"z"),))]


def test_ack_result_forgets_the_job() -> None:
    outbox, _ = attached()
    outbox.open("j", 1)
    outbox.started("j")
    outbox.log("j", [(OUT, b"x")])
    outbox.finish("j", Outcome.EXITED, 0)
    assert outbox.running() == {"j": 1}
    outbox.ack_result("j")
    assert outbox.running() == {}
    assert outbox.unacked_bytes() == 0
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == []
    outbox.ack_result("j")  # twice is harmless


def test_drop_reports_nothing_more() -> None:
    outbox = Outbox()
    outbox.open("a", 1)
    outbox.log("a", [(OUT, b"a")])
    outbox.open("b", 2)
    outbox.log("b", [(OUT, b"b")])
    outbox.drop("a")
    outbox.drop("missing")
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("b", 2, 1, ((OUT, b"b"),))]
    assert outbox.running() == {"b": 2}


def test_running_lists_epochs_until_result_acked() -> None:
    outbox = Outbox()
    assert outbox.running() == {}
    outbox.open("a", 1)
    outbox.open("b", 7)
    outbox.finish("a", Outcome.EXITED, 0)
    assert outbox.running() == {"a": 1, "b": 7}
    outbox.ack_result("a")
    assert outbox.running() == {"b": 7}


def test_replay_covers_every_job() -> None:
    outbox = Outbox()
    outbox.open("a", 1)
    outbox.log("a", [(OUT, b"a1")])
    outbox.open("b", 2)
    outbox.started("b")
    outbox.finish("b", Outcome.CANCELED, 143, "stop")
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert sorted(map(repr, replay)) == sorted(map(repr, [
        LogBatch("a", 1, 1, ((OUT, b"a1"),)), JobStarted("b", 2),
        JobResult("b", 2, 0, Outcome.CANCELED, 143, "stop"),
    ]))
    # Within a job, order is started, batches, result.
    b_reports = [r for r in replay if r.job_id == "b"]
    assert b_reports == [JobStarted("b", 2), JobResult("b", 2, 0, Outcome.CANCELED, 143, "stop")]


def test_reopen_with_new_epoch_starts_afresh() -> None:
    outbox = Outbox()
    outbox.open("j", 1)
    outbox.log("j", [(OUT, b"old")])
    outbox.open("j", 2)
    outbox.log("j", [(OUT, b"new")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [LogBatch("j", 2, 1, ((OUT, b"new"),))]


def test_reopen_of_the_same_assignment_keeps_its_reports() -> None:
    outbox = Outbox()
    outbox.open("j", 3)
    outbox.started("j")
    outbox.log("j", [(OUT, b"kept")])
    outbox.open("j", 3)  # e.g. a replayed assignment
    outbox.log("j", [(OUT, b"more")])
    replay: list[Report] = []
    outbox.attach(replay.append)
    assert replay == [JobStarted("j", 3), LogBatch("j", 3, 1, ((OUT, b"kept"),)),
                      LogBatch("j", 3, 2, ((OUT, b"more"),))]
