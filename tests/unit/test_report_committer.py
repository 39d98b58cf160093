"""controlplane/jobs/reports.py: reports that arrive while a transaction runs
share the next one; each caller hears only its own outcome, and only after
the commit; a store failure fails the group, an unexpected one only its cause."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from testhide.controlplane.errors import ControlPlaneError, NotHeld, StorageUnavailable
from testhide.controlplane.jobs.model import Job, JobReport, JobSpec, JobStatus
from testhide.controlplane.jobs.reports import ReportCommitter

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def report(job_id: str) -> JobReport:
    return JobReport("acme", "agent-1", job_id, 1, JobStatus.SUCCEEDED, exit_code=0, last_seq=0)


async def settle() -> None:
    """Until every ready task has run as far as it can."""
    for _ in range(5):
        await asyncio.sleep(0)


class Store:
    """Commits when the test says so; refuses job ids starting with "stale", and
    breaks (not a store error) on those starting with "poison"."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def report_jobs(
        self, reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        self.groups.append([r.job_id for r in reports])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        if any(r.job_id.startswith("poison") for r in reports):
            raise RuntimeError("poisoned")
        return [
            NotHeld(r.job_id)
            if r.job_id.startswith("stale")
            else (Job(r.job_id, r.org, JobSpec(image="i", command=("true",)), r.status, NOW), True)
            for r in reports
        ]


async def test_reports_arriving_during_a_transaction_share_the_next() -> None:
    store = Store()
    committer = ReportCommitter(store)  # type: ignore[arg-type]
    store.release.clear()
    first = asyncio.ensure_future(committer.report([report("j1")]))
    await settle()
    assert store.groups == [["j1"]]  # a lone report goes at once
    later = [asyncio.ensure_future(committer.report([report(f"j{i}"), report(f"stale{i}")])) for i in (2, 3)]
    await settle()
    assert not first.done()  # not before its commit
    store.release.set()
    outcomes = await asyncio.gather(first, *later)
    assert store.groups == [["j1"], ["j2", "stale2", "j3", "stale3"]]
    assert [[type(o).__name__ for o in each] for each in outcomes] == [
        ["tuple"],
        ["tuple", "NotHeld"],
        ["tuple", "NotHeld"],
    ]


async def test_a_store_failure_fails_the_group_and_an_unexpected_one_only_its_cause() -> None:
    store = Store()
    committer = ReportCommitter(store)  # type: ignore[arg-type]
    store.fail = StorageUnavailable("the disk is full")
    with pytest.raises(StorageUnavailable):
        await committer.report([report("j1"), report("j2")])
    store.fail = None
    store.release.clear()
    blocker = asyncio.ensure_future(committer.report([report("j0")]))
    await settle()
    good = asyncio.ensure_future(committer.report([report("j3")]))
    bad = asyncio.ensure_future(committer.report([report("poison")]))
    await settle()
    store.release.set()
    await blocker
    assert [type(o).__name__ for o in await good] == ["tuple"]
    with pytest.raises(RuntimeError):
        await bad
    assert store.groups[-3:] == [["j3", "poison"], ["j3"], ["poison"]]


async def test_large_groups_are_split() -> None:
    store = Store()
    committer = ReportCommitter(store, max_batch=2)  # type: ignore[arg-type]
    outcomes = await committer.report([report(f"j{i}") for i in range(5)])
    assert len(outcomes) == 5
    assert [len(g) for g in store.groups] == [2, 2, 1]
