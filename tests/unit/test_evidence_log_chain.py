"""The log hash chain and its verifier (common/evidence.py): an intact log verifies, and
each way of tampering with stored batches is named precisely, at the first batch it
touches."""

from __future__ import annotations

import hashlib

import pytest

from testhide.common.evidence import (
    PREDATES_LOG_CHAINING,
    LogBatchRecord,
    log_chain_head,
    log_chain_next,
    log_chain_start,
    verify_log_chain,
)

JOB = "j0123"
OUT, ERR, SYSTEM = 1, 2, 3


def entries_of(seq: int) -> list[tuple[int, bytes]]:
    return [(OUT, f"line {seq}\n".encode()), (ERR, f"warning {seq}\n".encode())]


def chained(count: int, job_id: str = JOB) -> list[LogBatchRecord]:
    """``count`` batches as the control plane stores them: each with its link."""
    batches: list[LogBatchRecord] = []
    link = log_chain_start(job_id)
    for seq in range(1, count + 1):
        link = log_chain_next(link, seq, entries_of(seq))
        batches.append((seq, link, entries_of(seq)))
    return batches


def head_of(batches: list[LogBatchRecord], job_id: str = JOB) -> bytes:
    return log_chain_head(job_id, [(seq, entries) for seq, _, entries in batches])


def renumbered(batch: LogBatchRecord, seq: int) -> LogBatchRecord:
    return (seq, batch[1], batch[2])


def test_the_byte_format_is_fixed() -> None:
    """What a verifier written elsewhere must compute: sha256 over the previous link, the seq
    (8 bytes big-endian), then per entry its stream (1 byte), length (8 bytes) and bytes."""
    start = hashlib.sha256(b"testhide log chain v1\x00" + JOB.encode()).digest()
    assert log_chain_start(JOB) == start
    expected = hashlib.sha256(
        start + (1).to_bytes(8, "big") + b"\x01" + (3).to_bytes(8, "big") + b"hi\n"
    ).digest()
    assert log_chain_next(start, 1, [(OUT, b"hi\n")]) == expected


def test_empty_entries_are_not_chained_as_the_control_plane_stores_none() -> None:
    start = log_chain_start(JOB)
    assert log_chain_next(start, 1, [(OUT, b""), (ERR, b"x"), (SYSTEM, b"")]) == log_chain_next(
        start, 1, [(ERR, b"x")]
    )


def test_the_chain_is_bound_to_its_job() -> None:
    batches = chained(3)
    assert verify_log_chain(JOB, head_of(batches), batches) is None
    other = "j9999"
    assert verify_log_chain(other, head_of(batches), batches) == (
        "log batch 1 does not match its chain link (edited)"
    )


def test_an_intact_log_verifies_and_a_log_with_no_batches_too() -> None:
    batches = chained(10)
    assert verify_log_chain(JOB, head_of(batches), batches) is None
    assert verify_log_chain(JOB, log_chain_start(JOB), []) is None


def test_edited_bytes() -> None:
    batches = chained(10)
    head = head_of(batches)
    seq, link, entries = batches[6]
    batches[6] = (seq, link, [(OUT, b"line 7 but nicer\n"), entries[1]])
    assert verify_log_chain(JOB, head, batches) == "log batch 7 does not match its chain link (edited)"


def test_an_entry_moved_to_another_stream_is_an_edit() -> None:
    batches = chained(4)
    head = head_of(batches)
    seq, link, entries = batches[1]
    batches[1] = (seq, link, [(ERR, entries[0][1]), entries[1]])
    assert verify_log_chain(JOB, head, batches) == "log batch 2 does not match its chain link (edited)"


def test_an_entry_removed_from_a_batch_is_an_edit() -> None:
    batches = chained(4)
    head = head_of(batches)
    seq, link, entries = batches[2]
    batches[2] = (seq, link, entries[:1])
    assert verify_log_chain(JOB, head, batches) == "log batch 3 does not match its chain link (edited)"


def test_edited_bytes_with_the_links_recomputed_to_the_end_change_the_head() -> None:
    """Whoever can write the store can recompute every link after an edit (the chain has no
    key): the head the agent signed is what still tells."""
    batches = chained(5)
    signed = head_of(batches)
    forged = [(s, e if s != 3 else [(OUT, b"all tests passed\n")]) for s, _, e in batches]
    link, rebuilt = log_chain_start(JOB), []
    for seq, entries in forged:
        link = log_chain_next(link, seq, entries)
        rebuilt.append((seq, link, entries))
    assert verify_log_chain(JOB, head_of(rebuilt), rebuilt) is None
    assert verify_log_chain(JOB, signed, rebuilt) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )


def test_a_batch_removed_from_the_middle() -> None:
    batches = chained(8)
    head = head_of(batches)
    del batches[4]
    assert verify_log_chain(JOB, head, batches) == "log batch 5 is missing (batches jump from 4 to 6)"


def test_several_batches_removed_from_the_middle() -> None:
    batches = chained(8)
    head = head_of(batches)
    del batches[2:5]
    assert verify_log_chain(JOB, head, batches) == (
        "log batches 3 to 5 are missing (batches jump from 2 to 6)"
    )


def test_the_first_batch_removed() -> None:
    batches = chained(3)
    head = head_of(batches)
    assert verify_log_chain(JOB, head, batches[1:]) == "log batch 1 is missing (batches jump from 0 to 2)"


def test_batches_removed_at_the_end() -> None:
    batches = chained(8)
    head = head_of(batches)
    assert verify_log_chain(JOB, head, batches[:6]) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )
    assert verify_log_chain(JOB, head, []) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )


def test_batches_delivered_out_of_order() -> None:
    batches = chained(8)
    head = head_of(batches)
    batches[4], batches[5] = batches[5], batches[4]
    assert verify_log_chain(JOB, head, batches) == "log batches out of order: 6 before 5"


def test_two_batches_swapped_by_renumbering_them() -> None:
    """Batch 5's content and link stored as batch 6 and the other way round (the seq column
    swapped): the numbers run 1, 2, 3, ... but the links tell."""
    batches = chained(8)
    head = head_of(batches)
    five, six = batches[4], batches[5]
    batches[4], batches[5] = renumbered(six, 5), renumbered(five, 6)
    assert verify_log_chain(JOB, head, batches) == "log batches out of order: 6 before 5"


def test_distant_batches_swapped_by_renumbering_them() -> None:
    batches = chained(9)
    head = head_of(batches)
    three, seven = batches[2], batches[6]
    batches[2], batches[6] = renumbered(seven, 3), renumbered(three, 7)
    assert verify_log_chain(JOB, head, batches) == "log batches out of order: 7 before 3"


def test_a_batch_removed_and_the_rest_renumbered_to_close_the_gap() -> None:
    batches = chained(6)
    head = head_of(batches)
    closed = batches[:2] + [renumbered(b, b[0] - 1) for b in batches[3:]]
    assert verify_log_chain(JOB, head, closed) == "log batch 3 does not match its chain link (edited)"


def test_a_batch_given_twice() -> None:
    batches = chained(4)
    head = head_of(batches)
    assert verify_log_chain(JOB, head, [*batches[:3], batches[2], batches[3]]) == (
        "log batch 3 appears twice"
    )


def test_a_batch_whose_link_is_gone() -> None:
    batches = chained(4)
    head = head_of(batches)
    seq, _, entries = batches[1]
    batches[1] = (seq, b"", entries)
    assert verify_log_chain(JOB, head, batches) == (
        "log batch 2 has no chain link (stored without one, or its link was removed)"
    )


def test_a_batch_whose_link_was_replaced() -> None:
    batches = chained(4)
    head = head_of(batches)
    seq, _, entries = batches[1]
    batches[1] = (seq, bytes(32), entries)
    assert verify_log_chain(JOB, head, batches) == "log batch 2 does not match its chain link (edited)"


def test_a_batch_numbered_zero() -> None:
    batches = chained(2)
    assert verify_log_chain(JOB, head_of(batches), [renumbered(batches[0], 0)]) == (
        "log batch 0 has no valid number (batches are numbered from 1)"
    )


@pytest.mark.parametrize("batches", [[], [(1, b"", [(OUT, b"old\n")]), (2, b"", [(OUT, b"log\n")])]])
def test_a_job_from_before_log_chaining(batches: list[LogBatchRecord]) -> None:
    assert verify_log_chain(JOB, b"", batches) == PREDATES_LOG_CHAINING
    assert "predates log chaining" in PREDATES_LOG_CHAINING


def test_chained_batches_without_a_head_to_check_them_against() -> None:
    """An agent older than the chain reports no head: the links alone prove nothing
    (anyone can compute them), so this is no pass."""
    batches = chained(2)
    assert verify_log_chain(JOB, b"", batches, head_source="agent's") == (
        "there is no agent's log chain head to check the batches against"
    )


def test_the_head_source_is_named() -> None:
    batches = chained(3)
    assert verify_log_chain(JOB, bytes(32), batches, head_source="stored") == (
        "log chain head differs from the stored head (batches removed at the end?)"
    )
