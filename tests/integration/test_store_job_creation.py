"""``create_jobs`` (group commit of submissions, ``jobs/creations.py``) on both
backends: the jobs of one call go into one transaction, each checked against its
own organisation's pool as read in that transaction; a refused job writes
nothing of itself and does not stop the others; a broken one writes none."""

from __future__ import annotations

import pytest

from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, NotFound
from testhide.controlplane.jobs.model import Job, JobStatus, PoolPolicy, PullPolicy
from testhide.controlplane.store.base import Store
from tests.integration.test_store import EVERY_DRIVER, integrity_error, make_job, store

__all__ = ["store"]  # the backend-parametrised fixture of the store contract tests


def refuse_fetch(job: Job, policy: PoolPolicy) -> None:
    if job.id.startswith("refused"):
        raise FailedPrecondition(f"{job.id} refused under {policy.pull_policy.value}")


@EVERY_DRIVER
async def test_jobs_are_created_together_each_with_its_pools_policy_of_now(store: Store) -> None:
    await store.set_pool_policy("acme", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
    await store.set_pool_policy("other", "default", PoolPolicy(pull_policy=PullPolicy.ALWAYS))
    outcomes = await store.create_jobs(
        [(make_job("j1"), b"k1"), (make_job("j2", org="other"), b"k2"), (make_job("j3"), b"k3")],
        refuse_fetch,
    )
    assert [o.pull_policy if isinstance(o, PoolPolicy) else o for o in outcomes] == [
        PullPolicy.NEVER,
        PullPolicy.ALWAYS,
        PullPolicy.NEVER,
    ]
    for job_id, org in (("j1", "acme"), ("j2", "other"), ("j3", "acme")):
        job = await store.get_job(org, job_id)
        assert job is not None
        assert job.status == JobStatus.QUEUED
        assert [t.status for t in job.transitions] == [JobStatus.QUEUED]
    assert await store.get_job("acme", "j2") is None  # each in its own organisation
    assert await store.get_job_data_key("other", "j2") == b"k2"
    # A change of policy applies to the very next creation.
    await store.set_pool_policy("acme", "default", PoolPolicy(pull_policy=PullPolicy.IF_NOT_PRESENT))
    (after,) = await store.create_jobs([(make_job("j4"), b"k4")], refuse_fetch)
    assert isinstance(after, PoolPolicy)
    assert after.pull_policy == PullPolicy.IF_NOT_PRESENT


async def test_a_refused_job_writes_nothing_and_the_others_are_created(store: Store) -> None:
    outcomes = await store.create_jobs(
        [
            (make_job("j1"), b"k"),
            (make_job("nopool", pool="gpu"), b"k"),
            (make_job("refused1"), b"k"),
            (make_job("j2"), b"k"),
        ],
        refuse_fetch,
    )
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["PoolPolicy", "NotFound", "FailedPrecondition", "PoolPolicy"]
    assert isinstance(outcomes[1], NotFound)
    assert isinstance(outcomes[2], ControlPlaneError)
    assert {j.id for j in await store.list_jobs("acme", 10, None)} == {"j1", "j2"}


async def test_a_job_the_database_refuses_fails_the_whole_transaction(store: Store) -> None:
    with pytest.raises(integrity_error(store)):
        await store.create_jobs([(make_job("j1"), b"k"), (make_job("j1"), b"k")], refuse_fetch)
    assert await store.list_jobs("acme", 10, None) == []
