"""The agent's side of the log hash chain (agent/outbox.py): the head in the result is the
chain over the batches exactly as they went out, whether straight away, replayed after a
reconnect, or read back from the spool; SYSTEM lines and masked output included."""

from __future__ import annotations

from pathlib import Path

import pytest

from testhide.agent.model import JobResult, LogBatch, LogStream, Outcome, Report
from testhide.agent.outbox import Outbox
from testhide.agent.spool import Spool
from testhide.common.evidence import log_chain_head, log_chain_start

OUT, ERR, SYSTEM = LogStream.STDOUT, LogStream.STDERR, LogStream.SYSTEM


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def head_over(job_id: str, sent: list[Report]) -> bytes:
    """What the control plane computes: the chain over the batches it received, each once."""
    batches = {r.seq: r for r in sent if isinstance(r, LogBatch) and r.job_id == job_id}
    return log_chain_head(
        job_id, [(seq, [(int(s), d) for s, d in batches[seq].entries]) for seq in sorted(batches)]
    )


def result_of(sent: list[Report]) -> JobResult:
    results = [r for r in sent if isinstance(r, JobResult)]
    assert len(results) == 1
    return results[0]


async def test_the_result_carries_the_head_over_the_batches_sent(spool: Spool) -> None:
    outbox = Outbox(spool)
    sent: list[Report] = []
    outbox.attach(sent.append)
    outbox.open("j1", 1)
    assert outbox.log_chain_head("j1") == log_chain_start("j1")
    await outbox.log("j1", [(OUT, b"hello ***\n"), (ERR, b"warn\n")])
    await outbox.log("j1", [(SYSTEM, b"testhide: job timed out\n")])
    head = outbox.log_chain_head("j1")
    outbox.finish("j1", Outcome.TIMED_OUT, -1, "timed out")
    assert result_of(sent).log_chain_head == head == head_over("j1", sent)
    assert head != log_chain_start("j1")


async def test_a_job_with_no_log_has_the_chains_start_as_its_head(spool: Spool) -> None:
    outbox = Outbox(spool)
    sent: list[Report] = []
    outbox.attach(sent.append)
    outbox.open("j1", 1)
    outbox.finish("j1", Outcome.ERROR, -1, "image missing")
    assert result_of(sent).log_chain_head == log_chain_start("j1")
    assert outbox.log_chain_head("unknown") == b""


async def test_batches_spooled_while_cut_off_and_replayed_make_the_same_head(spool: Spool) -> None:
    """Made while no control plane listens (spooled on disk), the head is known when the job
    ends; once replayed, what went out hashes to it."""
    outbox = Outbox(spool, window_bytes=8)
    outbox.open("j1", 1)
    for i in range(20):
        await outbox.log("j1", [(OUT, f"line {i}\n".encode()), (ERR, b""), (SYSTEM, b"note\n")])
    head = outbox.log_chain_head("j1")
    outbox.finish("j1", Outcome.EXITED, 0)
    sent: list[Report] = []
    outbox.attach(sent.append)
    while not any(isinstance(r, JobResult) for r in sent):
        last = max(r.seq for r in sent if isinstance(r, LogBatch))
        outbox.ack_log("j1", last)  # acknowledgements make room in the window
    assert result_of(sent).log_chain_head == head == head_over("j1", sent)
    assert max(r.seq for r in sent if isinstance(r, LogBatch)) == 20


async def test_a_reconnect_resends_batches_without_changing_the_head(spool: Spool) -> None:
    outbox = Outbox(spool)
    first: list[Report] = []
    outbox.attach(first.append)
    outbox.open("j1", 1)
    await outbox.log("j1", [(OUT, b"a\n")])
    await outbox.log("j1", [(OUT, b"b\n")])
    outbox.detach()
    await outbox.log("j1", [(OUT, b"c\n")])
    outbox.finish("j1", Outcome.EXITED, 0)
    second: list[Report] = []
    outbox.attach(second.append)
    assert [r.seq for r in second if isinstance(r, LogBatch)] == [1, 2, 3]
    assert result_of(second).log_chain_head == head_over("j1", second) == head_over("j1", first + second)


async def test_a_spooled_batch_lost_on_disk_goes_out_as_a_note_and_the_heads_then_differ(
    spool: Spool,
) -> None:
    """Its bytes are gone: the control plane's chain (over the note) cannot match the head
    the agent made over the output, and verifying the job's log fails, as it must."""
    outbox = Outbox(spool)
    outbox.open("j", 1)
    await outbox.log("j", [(OUT, b"lost\n")])
    outbox.finish("j", Outcome.EXITED, 0)
    (spool.directory / "j.spool").unlink()
    sent: list[Report] = []
    outbox.attach(sent.append)
    batch = next(r for r in sent if isinstance(r, LogBatch))
    assert batch.entries[0][0] == SYSTEM
    assert result_of(sent).log_chain_head != head_over("j", sent)
