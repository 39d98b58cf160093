"""Evidence of what a job did, shared by the three programs: the agent computes it, the
control plane stores and checks it, `testhide verify` recomputes it without trusting the
server it came from.

The log hash chain runs over a job's log batches as stored (after masking, before sealing at
rest), in sequence order: the start value binds the chain to the job, each link binds one
batch's number and entries to everything before it. Editing, removing or reordering a stored
batch changes every link from there on, so the head signed in the job's statement no longer
matches. Streams are the wire enum's numbers (LogStream: stdout 1, stderr 2)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

LOG_CHAIN_DOMAIN = b"testhide log chain v1\x00"


def log_chain_start(job_id: str) -> bytes:
    """The chain's value before the first batch (also the head of a job with no log)."""
    return hashlib.sha256(LOG_CHAIN_DOMAIN + job_id.encode()).digest()


def log_chain_next(previous: bytes, seq: int, entries: Iterable[tuple[int, bytes]]) -> bytes:
    """The link of batch ``seq`` holding ``entries`` (stream number, bytes) after ``previous``."""
    h = hashlib.sha256(previous)
    h.update(seq.to_bytes(8, "big"))
    for stream, data in entries:
        if not data:
            continue  # the control plane stores no empty entry, so no verifier could hash one
        h.update(stream.to_bytes(1, "big"))
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


def log_chain_head(job_id: str, batches: Iterable[tuple[int, Iterable[tuple[int, bytes]]]]) -> bytes:
    """The head after ``batches`` (seq, entries), which must be numbered 1, 2, 3, … in order."""
    value = log_chain_start(job_id)
    for seq, entries in batches:
        value = log_chain_next(value, seq, entries)
    return value


LogBatchRecord = tuple[int, bytes, Sequence[tuple[int, bytes]]]
"""A stored log batch as downloaded: its seq, its stored chain link (empty if it has none),
and its entries (stream number, bytes)."""

PREDATES_LOG_CHAINING = "this job predates log chaining: its log carries no chain to verify"


def verify_log_chain(
    job_id: str, head: bytes, batches: Sequence[LogBatchRecord], head_source: str = "signed"
) -> str | None:
    """None if ``batches`` are exactly the batches the chain ending in ``head`` was made of,
    else the first thing wrong with them, said precisely. ``head_source`` names where
    ``head`` came from, for the message ("signed": the job's statement)."""
    if not head and not any(chain for _, chain, _ in batches):
        return PREDATES_LOG_CHAINING
    previous, last_seq = log_chain_start(job_id), 0
    for position, (seq, chain, entries) in enumerate(batches):
        problem = _sequence_problem(last_seq, seq)
        if problem:
            if seq > last_seq and last_seq + 1 in {s for s, _, _ in batches[position + 1 :]}:
                return f"log batches out of order: {seq} before {last_seq + 1}"
            return problem
        if not chain:
            return f"log batch {seq} has no chain link (stored without one, or its link was removed)"
        if log_chain_next(previous, seq, entries) != chain:
            return _link_problem(previous, batches, position)
        previous, last_seq = chain, seq
    if not head:
        return f"there is no {head_source} log chain head to check the batches against"
    if previous != head:
        return f"log chain head differs from the {head_source} head (batches removed at the end?)"
    return None


def _sequence_problem(last_seq: int, seq: int) -> str:
    """What is wrong with batch ``seq`` coming right after batch ``last_seq`` ("" if nothing)."""
    if seq < 1:
        return f"log batch {seq} has no valid number (batches are numbered from 1)"
    if seq == last_seq:
        return f"log batch {seq} appears twice"
    if seq < last_seq:
        return f"log batches out of order: {last_seq} before {seq}"
    if seq == last_seq + 2:
        return f"log batch {last_seq + 1} is missing (batches jump from {last_seq} to {seq})"
    if seq > last_seq + 2:
        missing = f"log batches {last_seq + 1} to {seq - 1} are missing"
        return f"{missing} (batches jump from {last_seq} to {seq})"
    return ""


def _link_problem(previous: bytes, batches: Sequence[LogBatchRecord], position: int) -> str:
    """Why the batch at ``position`` does not follow ``previous`` (the verified link before it):
    moved (its content and link were made for another place in the chain), or edited."""
    seq = batches[position][0]
    made_as = _places(previous, seq, batches, position).get(position)
    if made_as is not None and made_as != seq:
        return f"log batches out of order: {made_as} before {seq}"
    return f"log batch {seq} does not match its chain link (edited)"


def _places(previous: bytes, seq: int, batches: Sequence[LogBatchRecord], start: int) -> dict[int, int]:
    """For the batches from ``start`` on, the seq each one's link was made for, found by
    following the chain from ``previous`` (batch ``seq`` - 1): at each step the batch whose
    stored link is the next one, the one in that place tried first. Only run once a link
    failed, so the common case (nothing wrong) never pays for the search."""
    remaining = dict.fromkeys(range(start, len(batches)))
    found: dict[int, int] = {}
    while remaining:
        for k in remaining:
            _, chain, entries = batches[k]
            if chain and log_chain_next(previous, seq, entries) == chain:
                break
        else:
            return found
        del remaining[k]
        found[k], previous, seq = seq, chain, seq + 1
    return found
