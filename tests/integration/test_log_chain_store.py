"""The log hash chain in the store, on both backends: each batch stored with its link in the
transaction that stores it, replays linking nothing, the head on the job, the agent's head
kept beside it, batches read back org-scoped; then the database tampered with directly
(an entry re-sealed with other bytes, a batch deleted, two batches swapped) and the verifier
naming each precisely. A job whose log began before the chain reads as such."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from testhide.common.evidence import (
    PREDATES_LOG_CHAINING,
    log_chain_head,
    log_chain_start,
    verify_log_chain,
)
from testhide.controlplane.atrest import MasterKey, seal
from testhide.controlplane.errors import IntegrityError, NotFound
from testhide.controlplane.jobs.logs import LogBook, entry_aad
from testhide.controlplane.jobs.model import JobReport, JobStatus, LogBatchRecord, LogStream
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore
from tests.integration.test_store import NOW, POSTGRES, SQLITE, empty_store, make_job, populate

OUT, ERR, SYSTEM = LogStream.STDOUT, LogStream.STDERR, LogStream.SYSTEM
LEASE = timedelta(seconds=60)
JOB = "jchain1"
AGENT = "agent-1"


class Chained:
    """A store with a job assigned to AGENT at epoch 1, the log book that writes its batches,
    and the master key that seals them."""

    def __init__(self, store: Store, master: MasterKey) -> None:
        self.store = store
        self.master = master
        self.logs = LogBook(store, master)

    async def append(self, seq: int, entries: list[tuple[LogStream, bytes]], job_id: str = JOB) -> int:
        return await self.logs.append("acme", AGENT, job_id, 1, seq, entries)

    async def batches(self, org: str = "acme", job_id: str = JOB) -> list[LogBatchRecord]:
        return [b async for b in self.logs.batches(org, job_id)]

    async def verify(self, head: bytes, job_id: str = JOB) -> str | None:
        downloaded = await self.batches(job_id=job_id)
        return verify_log_chain(
            job_id, head, [(b.seq, b.chain, [(int(s), d) for s, d in b.entries]) for b in downloaded]
        )

    async def execute(self, sql: str, *args: object) -> None:
        """Raw SQL on the database, as someone with write access to it would run it."""
        if isinstance(self.store, SqliteStore):
            await self.store._tx(lambda c: c.execute(sql, args))
            return
        assert isinstance(self.store, PgStore)
        numbered = sql
        for n in range(1, len(args) + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        await self.store._tx(lambda c: c.execute(numbered, *args))

    async def reseal(self, seq: int, index: int, plaintext: bytes, as_seq: int | None = None) -> None:
        """Replace an entry's stored bytes, sealed as the control plane seals them (by someone
        holding the master key), bound to batch ``as_seq`` (default: its own)."""
        wrapped = await self.store.get_job_data_key("acme", JOB)
        key = self.master.unwrap_data_key(wrapped, aad=JOB.encode())
        sealed = seal(key, plaintext, entry_aad(JOB, seq if as_seq is None else as_seq, index))
        await self.execute(
            "UPDATE log_entries SET data = ? WHERE job_id = ? AND seq = ? AND idx = ?",
            sealed,
            JOB,
            seq,
            index,
        )


@pytest.fixture(params=[SQLITE, POSTGRES])
async def chained(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Chained]:
    async with empty_store(request.param, tmp_path) as store:
        await populate(store)
        master = MasterKey.generate()
        for job_id in (JOB, "jother"):
            _, wrapped = master.new_data_key(aad=job_id.encode())
            await store.create_job(make_job(job_id), wrapped)
            assert await store.assign_job("acme", job_id, AGENT, NOW, NOW + LEASE) is not None
        yield Chained(store, master)


def entries_of(seq: int) -> list[tuple[LogStream, bytes]]:
    return [(OUT, f"out {seq}\n".encode()), (ERR, f"err {seq}\n".encode())]


async def written(chained: Chained, count: int) -> bytes:
    """``count`` batches stored; the head the agent computed over them."""
    for seq in range(1, count + 1):
        assert await chained.append(seq, entries_of(seq)) == seq
    return log_chain_head(
        JOB, [(seq, [(int(s), d) for s, d in entries_of(seq)]) for seq in range(1, count + 1)]
    )


async def stored_head(store: Store, job_id: str = JOB) -> bytes:
    job = await store.get_job("acme", job_id)
    assert job is not None
    return job.log_chain_head


async def test_each_batch_is_linked_and_the_head_follows(chained: Chained) -> None:
    assert await stored_head(chained.store) == log_chain_start(JOB)  # no batch yet
    batches = [
        [(OUT, b"hello\n"), (OUT, b""), (SYSTEM, b"testhide: note\n")],
        [],  # a batch with no entry still has its link
        [(ERR, b"bye\n")],
    ]
    for seq, entries in enumerate(batches, 1):
        await chained.append(seq, entries)
    head = log_chain_head(JOB, [(seq, [(int(s), d) for s, d in e]) for seq, e in enumerate(batches, 1)])
    assert await stored_head(chained.store) == head
    downloaded = await chained.batches()
    assert [(b.seq, b.entries) for b in downloaded] == [
        (1, ((OUT, b"hello\n"), (SYSTEM, b"testhide: note\n"))),
        (2, ()),
        (3, ((ERR, b"bye\n"),)),
    ]
    assert downloaded[-1].chain == head
    assert await chained.verify(head) is None


async def test_a_replayed_batch_changes_no_link(chained: Chained) -> None:
    head = await written(chained, 3)
    assert await chained.append(2, [(OUT, b"something else\n")]) == 3
    assert await chained.append(3, [(OUT, b"and more\n")]) == 3
    assert await stored_head(chained.store) == head
    assert await chained.verify(head) is None


async def test_batches_are_read_a_page_at_a_time_in_order(chained: Chained) -> None:
    head = await written(chained, 40)  # more than one page of the log book's reads
    assert [b.seq for b in await chained.batches()] == list(range(1, 41))
    assert await chained.verify(head) is None


async def test_another_organisation_gets_not_found_and_no_batch(chained: Chained) -> None:
    await written(chained, 2)
    with pytest.raises(NotFound):
        await chained.batches(org="other")
    with pytest.raises(NotFound):
        await chained.store.read_log_batches("other", JOB, 0, 10)
    with pytest.raises(NotFound):
        await chained.batches(job_id="jmissing")


async def test_the_agents_head_is_kept_beside_the_stored_one(chained: Chained) -> None:
    head = await written(chained, 2)
    other_head = bytes(32)
    report = JobReport(
        "acme", AGENT, JOB, 1, JobStatus.SUCCEEDED, exit_code=0, last_seq=2, log_chain_head=head
    )
    outcome = (await chained.store.report_jobs([report], NOW))[0]
    assert not isinstance(outcome, Exception)
    job, changed = outcome
    assert changed
    assert (job.log_chain_head, job.agent_log_chain_head) == (head, head)
    # A replay of the result (with another head) changes nothing.
    replay = JobReport(
        "acme", AGENT, JOB, 1, JobStatus.SUCCEEDED, exit_code=0, last_seq=2, log_chain_head=other_head
    )
    outcome = (await chained.store.report_jobs([replay], NOW))[0]
    assert not isinstance(outcome, Exception)
    assert outcome[1] is False
    stored = await chained.store.get_job("acme", JOB)
    assert stored is not None
    assert stored.agent_log_chain_head == head


async def test_a_different_agent_head_is_stored_as_reported(chained: Chained) -> None:
    head = await written(chained, 2)
    claimed = bytes(32)
    report = JobReport(
        "acme", AGENT, JOB, 1, JobStatus.FAILED, exit_code=1, last_seq=2, log_chain_head=claimed
    )
    outcome = (await chained.store.report_jobs([report], NOW))[0]
    assert not isinstance(outcome, Exception)
    assert (outcome[0].log_chain_head, outcome[0].agent_log_chain_head) == (head, claimed)
    assert await chained.verify(claimed) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )


async def test_an_entry_resealed_with_other_bytes_is_named(chained: Chained) -> None:
    head = await written(chained, 5)
    await chained.reseal(3, 0, b"out 3, but all tests passed\n")
    assert await chained.verify(head) == "log batch 3 does not match its chain link (edited)"


async def test_a_deleted_batch_is_named(chained: Chained) -> None:
    head = await written(chained, 6)
    await chained.execute("DELETE FROM log_entries WHERE job_id = ? AND seq = ?", JOB, 4)
    await chained.execute("DELETE FROM log_batches WHERE job_id = ? AND seq = ?", JOB, 4)
    assert await chained.verify(head) == "log batch 4 is missing (batches jump from 3 to 5)"


async def test_a_deleted_last_batch_is_named(chained: Chained) -> None:
    head = await written(chained, 6)
    await chained.execute("DELETE FROM log_entries WHERE job_id = ? AND seq = ?", JOB, 6)
    await chained.execute("DELETE FROM log_batches WHERE job_id = ? AND seq = ?", JOB, 6)
    assert await chained.verify(head) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )


async def test_a_deleted_link_is_named(chained: Chained) -> None:
    head = await written(chained, 3)
    await chained.execute("DELETE FROM log_batches WHERE job_id = ? AND seq = ?", JOB, 2)
    assert await chained.verify(head) == (
        "log batch 2 has no chain link (stored without one, or its link was removed)"
    )


async def swap(chained: Chained, a: int, b: int) -> None:
    for table in ("log_entries", "log_batches"):
        await chained.execute(f"UPDATE {table} SET seq = ? WHERE job_id = ? AND seq = ?", -1, JOB, a)  # noqa: S608
        await chained.execute(f"UPDATE {table} SET seq = ? WHERE job_id = ? AND seq = ?", a, JOB, b)  # noqa: S608
        await chained.execute(f"UPDATE {table} SET seq = ? WHERE job_id = ? AND seq = ?", b, JOB, -1)  # noqa: S608


async def test_two_batches_swapped_and_resealed_are_named(chained: Chained) -> None:
    """Someone holding the master key swaps batches 2 and 3 (rows and links) and re-seals
    their entries for their new places: at rest it all authenticates, the chain does not."""
    head = await written(chained, 5)
    await swap(chained, 2, 3)
    for seq, original in ((2, 3), (3, 2)):
        for index, (_, data) in enumerate(entries_of(original)):
            await chained.reseal(seq, index, data)
    assert await chained.verify(head) == "log batches out of order: 3 before 2"


async def test_two_batches_swapped_without_the_key_fail_authentication_at_rest(chained: Chained) -> None:
    head = await written(chained, 5)
    await swap(chained, 2, 3)
    with pytest.raises(IntegrityError, match="log batch 2 of job jchain1 fails authentication at rest"):
        await chained.verify(head)


async def test_a_job_whose_log_predates_the_chain(chained: Chained) -> None:
    """As a job stored before schema version 14 reads: log entries, no links, no head; batches
    that come after the upgrade are stored but not chained (the chain cannot start mid-log)."""
    await written(chained, 2)
    await chained.execute("DELETE FROM log_batches WHERE job_id = ?", JOB)
    await chained.execute("UPDATE jobs SET log_chain = NULL WHERE id = ?", JOB)
    assert await chained.append(3, [(OUT, b"after the upgrade\n")]) == 3
    assert await stored_head(chained.store) == b""
    assert [(b.seq, b.chain) for b in await chained.batches()] == [(1, b""), (2, b""), (3, b"")]
    assert await chained.verify(b"") == PREDATES_LOG_CHAINING


async def test_the_chain_is_per_job(chained: Chained) -> None:
    head = await written(chained, 2)
    await chained.append(1, entries_of(1), job_id="jother")
    assert await stored_head(chained.store, "jother") != head
    assert await chained.verify(await stored_head(chained.store, "jother"), job_id="jother") is None
    assert await chained.verify(head) is None
