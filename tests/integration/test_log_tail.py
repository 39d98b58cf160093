"""The log book's tail: while a job has followers, the batches this control plane stored
last are read from memory, exactly as the store holds them, and only those.

Each test runs on SQLite and PostgreSQL (tests/pg.py). Reading "from the store" is told
apart from reading "from the tail" by changing the stored rows behind the log book's
back, and by counting the store's reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.jobs import logs as logs_module
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import LogChunk, LogStream
from testhide.controlplane.store.base import Store
from tests.integration.test_log_chain_store import Chained
from tests.integration.test_store import NOW, POSTGRES, SQLITE, empty_store, make_job, populate

OUT, ERR = LogStream.STDOUT, LogStream.STDERR
LEASE = timedelta(seconds=60)
JOB = "jchain1"
AGENT = "agent-1"


class CountingReads:
    """The store's log reads, counted (the store itself is real)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        read_log = store.read_log

        async def counted(org: str, job_id: str, from_offset: int, limit: int) -> object:
            self.count += 1
            return await read_log(org, job_id, from_offset, limit)

        monkeypatch.setattr(store, "read_log", counted)


@pytest.fixture(params=[SQLITE, POSTGRES])
async def chained(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Chained]:
    async with empty_store(request.param, tmp_path) as store:
        await populate(store)
        master = MasterKey.generate()
        _, wrapped = master.new_data_key(aad=JOB.encode())
        await store.create_job(make_job(JOB), wrapped)
        assert await store.assign_job("acme", JOB, AGENT, NOW, NOW + LEASE) is not None
        yield Chained(store, master)


async def read(logs: LogBook, offset: int = 0, known_size: int | None = None) -> list[LogChunk]:
    return [c async for c in logs.read("acme", JOB, offset, known_size)]


def joined(chunks: list[LogChunk]) -> bytes:
    return b"".join(c.data for c in chunks)


async def test_a_followed_job_is_read_from_its_tail_as_stored(
    chained: Chained, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_replica = LogBook(chained.store, chained.master)
    with chained.logs.watch(JOB):
        await chained.append(1, [(OUT, b"one\n"), (ERR, b""), (ERR, b"two\n")])
        await chained.append(2, [(OUT, b"three\n")])
        stored = await read(other_replica)  # no follower there: the store
        assert stored == [
            LogChunk(0, OUT, b"one\n"),
            LogChunk(4, ERR, b"two\n"),
            LogChunk(8, OUT, b"three\n"),
        ]
        reads = CountingReads(chained.store, monkeypatch)
        assert await read(chained.logs, known_size=14) == stored
        assert await read(chained.logs, 6, known_size=14) == [LogChunk(6, ERR, b"o\n"), stored[2]]
        assert reads.count == 0
        # The stored rows changed behind its back: the tail still has what was stored.
        await chained.execute("DELETE FROM log_entries WHERE job_id = ?", JOB)
        assert await read(chained.logs, known_size=14) == stored
        assert await read(other_replica) == []
        # Without the job's size the store is asked for what may lie past the tail.
        assert await read(chained.logs) == stored
        assert reads.count == 2  # the other replica's read and this one


async def test_a_replay_adds_nothing_to_the_tail(chained: Chained) -> None:
    with chained.logs.watch(JOB) as watch:
        assert await chained.append(1, [(OUT, b"a\n")]) == 1
        assert await chained.append(2, [(OUT, b"b\n")]) == 2
        assert await chained.append(2, [(OUT, b"b\n")]) == 2  # the agent sends it again
        assert await chained.append(1, [(OUT, b"a\n")]) == 2
        assert [(c.offset, c.data) for c in watch.tail] == [(0, b"a\n"), (2, b"b\n")]
        assert joined(await read(chained.logs, known_size=4)) == b"a\nb\n"


async def test_batches_another_replica_stored_are_read_from_the_store(chained: Chained) -> None:
    other_replica = LogBook(chained.store, chained.master)
    with chained.logs.watch(JOB) as watch:
        await chained.append(1, [(OUT, b"here 1\n")])
        await other_replica.append("acme", AGENT, JOB, 1, 2, [(OUT, b"there 2\n")])
        await chained.append(3, [(OUT, b"here 3\n")])
        # The tail starts afresh at batch 3: it does not pretend batch 2 was nothing.
        assert [(c.offset, c.data) for c in watch.tail] == [(15, b"here 3\n")]
        assert joined(await read(chained.logs, 7, known_size=22)) == b"there 2\nhere 3\n"
        assert joined(await read(chained.logs, 0, known_size=22)) == b"here 1\nthere 2\nhere 3\n"


async def test_a_follower_behind_the_tail_reads_the_store(
    chained: Chained, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "TAIL_BYTES", 8)
    with chained.logs.watch(JOB) as watch:
        for seq in range(1, 5):
            await chained.append(seq, [(OUT, b"%d23\n" % seq)])  # 4 bytes each
        assert [c.offset for c in watch.tail] == [8, 12]  # the last 8 bytes
        reads = CountingReads(chained.store, monkeypatch)
        assert joined(await read(chained.logs, 12, known_size=16)) == b"423\n"
        assert reads.count == 0
        assert joined(await read(chained.logs, 2, known_size=16)) == b"3\n223\n323\n423\n"
        assert reads.count == 1
    assert not watch.tail  # gone with the last follower
    assert chained.logs.tail_bytes == 0


async def test_a_batch_larger_than_the_tail_bound_is_kept_whole(
    chained: Chained, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "TAIL_BYTES", 4)
    with chained.logs.watch(JOB) as watch:
        await chained.append(1, [(OUT, b"12"), (ERR, b"345678")])
        await chained.append(2, [(OUT, b"abcdefgh"), (ERR, b"ij")])
        assert [(c.offset, c.data) for c in watch.tail] == [(8, b"abcdefgh"), (16, b"ij")]
        assert chained.logs.tail_bytes == 10


async def test_all_tails_together_stay_within_their_bound(
    chained: Chained, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "TAILS_BYTES", 10)
    with chained.logs.watch(JOB) as watch:
        await chained.append(1, [(OUT, b"12345678")])
        assert chained.logs.tail_bytes == 8
        await chained.append(2, [(OUT, b"abcd")])  # 12 bytes would pass the bound: none kept
        assert not watch.tail
        assert chained.logs.tail_bytes == 0
        assert joined(await read(chained.logs, 0, known_size=12)) == b"12345678abcd"  # the store
        await chained.append(3, [(OUT, b"xyz")])  # a fresh start after the gap
        assert [(c.offset, c.data) for c in watch.tail] == [(12, b"xyz")]
        assert chained.logs.tail_bytes == 3
    assert chained.logs.tail_bytes == 0


async def test_nothing_is_kept_for_a_job_nobody_follows(chained: Chained) -> None:
    await chained.append(1, [(OUT, b"unwatched\n")])
    assert chained.logs.tail_bytes == 0
    assert chained.logs.watched_jobs == 0
    with chained.logs.watch(JOB) as watch:
        assert not watch.tail  # what was stored before the follower came is read from the store
        assert joined(await read(chained.logs, known_size=10)) == b"unwatched\n"
