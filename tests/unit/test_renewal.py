"""controlplane/ca/renewal.py's group commit against a store whose transactions
the test opens and commits by hand: who is answered when, what goes into which
transaction, and what a failed transaction does to its callers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import pytest

from testhide.controlplane.auth.audit import AuditChain, AuditEvent, Auditor
from testhide.controlplane.ca.renewal import RenewalLog
from testhide.controlplane.ca.store import AgentStore, CertificateRenewal
from testhide.controlplane.errors import PermissionDenied, StorageUnavailable
from tests.unit.fakes import MemoryAudit

NOT_AFTER = datetime(2030, 1, 2, tzinfo=UTC)


class GatedStore:
    """``record_agent_renewals`` waits until the test commits (or fails) it."""

    def __init__(self, revoked: frozenset[str] = frozenset()) -> None:
        self.revoked = revoked
        self.batches: list[list[str]] = []
        self.committed: list[str] = []
        self.started = asyncio.Event()
        self.outcome: asyncio.Queue[Exception | None] = asyncio.Queue()

    async def record_agent_renewals(
        self, renewals: Sequence[CertificateRenewal], chain: AuditChain
    ) -> list[bool]:
        self.batches.append([r.serial for r in renewals])
        self.started.set()
        failure = await self.outcome.get()
        self.started.clear()
        if failure is not None:
            raise failure
        self.committed += [r.serial for r in renewals]
        return [r.agent_id not in self.revoked for r in renewals]


def renewal(agent_id: str, serial: str) -> CertificateRenewal:
    event = AuditEvent("agent_certificate_renewed", f"agent:{agent_id}", "acme", agent_id)
    return CertificateRenewal("acme", agent_id, serial, NOT_AFTER, "ca", event)


def renewal_log(store: GatedStore) -> RenewalLog:
    return RenewalLog(cast(AgentStore, store), Auditor(MemoryAudit(), b"k" * 32))


async def started(store: GatedStore) -> None:
    await asyncio.wait_for(store.started.wait(), 5)


async def test_renewals_arriving_during_a_transaction_share_the_next_one() -> None:
    store = GatedStore()
    log = renewal_log(store)
    first = asyncio.create_task(log.record(renewal("a1", "s1")))
    await started(store)
    others = [asyncio.create_task(log.record(renewal(f"a{i}", f"s{i}"))) for i in range(2, 6)]
    await asyncio.sleep(0)
    assert not first.done()  # nobody is answered before their transaction commits
    await store.outcome.put(None)
    await first
    await started(store)
    assert not any(task.done() for task in others)
    await store.outcome.put(None)
    await asyncio.gather(*others)
    assert store.batches == [["s1"], ["s2", "s3", "s4", "s5"]]
    assert store.committed == ["s1", "s2", "s3", "s4", "s5"]


async def test_a_failed_transaction_fails_each_of_its_callers_and_the_next_one_proceeds() -> None:
    store = GatedStore()
    log = renewal_log(store)
    batch = [asyncio.create_task(log.record(renewal(f"a{i}", f"s{i}"))) for i in range(3)]
    await started(store)
    later = asyncio.create_task(log.record(renewal("a9", "s9")))
    await store.outcome.put(StorageUnavailable("the disk is full"))
    for task in batch:
        with pytest.raises(StorageUnavailable, match="the disk is full"):
            await task
    await started(store)
    await store.outcome.put(None)
    await later
    assert store.committed == ["s9"]


async def test_a_revoked_agent_is_refused_and_the_others_of_its_batch_are_not() -> None:
    store = GatedStore(revoked=frozenset({"a2"}))
    log = renewal_log(store)
    tasks = [asyncio.create_task(log.record(renewal(f"a{i}", f"s{i}"))) for i in (1, 2, 3)]
    await started(store)
    await store.outcome.put(None)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], PermissionDenied)


async def test_an_agent_renewing_twice_at_once_is_written_in_order_in_two_transactions() -> None:
    store = GatedStore()
    log = renewal_log(store)
    tasks = [
        asyncio.create_task(log.record(r))
        for r in (renewal("a1", "old"), renewal("a2", "x"), renewal("a1", "new"))
    ]
    for _ in range(2):
        await started(store)
        await store.outcome.put(None)
    await asyncio.gather(*tasks)
    assert store.batches == [["old", "x"], ["new"]]


async def test_batches_are_bounded() -> None:
    store = GatedStore()
    log = RenewalLog(cast(AgentStore, store), Auditor(MemoryAudit(), b"k" * 32), max_batch=2)
    tasks = [asyncio.create_task(log.record(renewal(f"a{i}", f"s{i}"))) for i in range(5)]
    for _ in range(3):
        await started(store)
        await store.outcome.put(None)
    await asyncio.gather(*tasks)
    assert store.batches == [["s0", "s1"], ["s2", "s3"], ["s4"]]


async def test_a_caller_that_goes_away_strands_nobody() -> None:
    store = GatedStore()
    log = renewal_log(store)
    leaving = asyncio.create_task(log.record(renewal("a1", "s1")))
    staying = asyncio.create_task(log.record(renewal("a2", "s2")))
    await started(store)
    leaving.cancel()  # its deadline passed: the transaction goes on for the others
    await store.outcome.put(None)
    await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert store.committed == ["s1", "s2"]
