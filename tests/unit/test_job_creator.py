"""controlplane/jobs/creations.py: jobs submitted while a transaction runs share
the next one; each caller hears only its own job's outcome, and only after the
commit; a store failure fails the group, an unexpected one only its cause."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest

from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, StorageUnavailable
from testhide.controlplane.jobs.creations import JobCreator
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, PoolPolicy, PullPolicy

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = PoolPolicy(pull_policy=PullPolicy.NEVER)


def job(job_id: str) -> Job:
    return Job(job_id, "acme", JobSpec(image="i", command=("true",)), JobStatus.QUEUED, NOW)


async def settle() -> None:
    """Until every ready task has run as far as it can."""
    for _ in range(5):
        await asyncio.sleep(0)


def refuse(job: Job, policy: PoolPolicy) -> None:
    if job.id.startswith("refused"):
        raise FailedPrecondition(f"{job.id} refused")


class Store:
    """Commits when the test says so; ``admit`` refuses as given, and job ids
    starting with "poison" break the transaction (not a store error)."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.created: list[str] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[PoolPolicy | ControlPlaneError]:
        self.groups.append([j.id for j, _ in jobs])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        if any(j.id.startswith("poison") for j, _ in jobs):
            raise RuntimeError("poisoned")
        outcomes: list[PoolPolicy | ControlPlaneError] = []
        for j, _ in jobs:
            try:
                admit(j, POLICY)
            except ControlPlaneError as exc:
                outcomes.append(exc)
                continue
            self.created.append(j.id)
            outcomes.append(POLICY)
        return outcomes


async def test_jobs_submitted_during_a_transaction_share_the_next() -> None:
    store = Store()
    creator = JobCreator(store, refuse)
    store.release.clear()
    first = asyncio.ensure_future(creator.create(job("j1"), b"k"))
    await settle()
    assert store.groups == [["j1"]]  # a lone submission goes at once
    later = [asyncio.ensure_future(creator.create(job(i), b"k")) for i in ("j2", "refused3", "j4")]
    await settle()
    assert not first.done()  # not before its commit
    store.release.set()
    assert await first == POLICY
    results = await asyncio.gather(*later, return_exceptions=True)
    assert store.groups == [["j1"], ["j2", "refused3", "j4"]]
    assert [type(r).__name__ for r in results] == ["PoolPolicy", "FailedPrecondition", "PoolPolicy"]
    assert store.created == ["j1", "j2", "j4"]


async def test_a_batch_is_at_most_max_batch_jobs() -> None:
    store = Store()
    creator = JobCreator(store, refuse, max_batch=2)
    store.release.clear()
    calls = [asyncio.ensure_future(creator.create(job(f"j{i}"), b"k")) for i in range(5)]
    await settle()
    store.release.set()
    await asyncio.gather(*calls)
    assert store.groups == [["j0", "j1"], ["j2", "j3"], ["j4"]]


async def test_a_store_failure_fails_the_group_and_an_unexpected_one_only_its_cause() -> None:
    store = Store()
    creator = JobCreator(store, refuse)
    store.fail = StorageUnavailable("the disk is full")
    with pytest.raises(StorageUnavailable):
        await creator.create(job("j1"), b"k")
    store.fail = None
    store.release.clear()
    blocker = asyncio.ensure_future(creator.create(job("j2"), b"k"))
    await settle()
    group = [asyncio.ensure_future(creator.create(job(i), b"k")) for i in ("j3", "poison4", "j5")]
    await settle()
    store.release.set()
    await blocker
    results = await asyncio.gather(*group, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["PoolPolicy", "RuntimeError", "PoolPolicy"]
    assert store.groups[-4:] == [["j3", "poison4", "j5"], ["j3"], ["poison4"], ["j5"]]
    assert store.created == ["j2", "j3", "j5"]
