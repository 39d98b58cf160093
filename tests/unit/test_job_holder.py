"""The one test every agent message about a job passes (store ``held_job``
and the same check inside report and log writes): taken only from the agent
holding the job at that epoch, and anything else answered exactly as a job
that does not exist. SQLite store in tmp_path, no sockets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.errors import NotHeld
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogStream
from testhide.controlplane.store.sqlite import SqliteStore

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
LEASE = timedelta(seconds=60)
OUT = LogStream.STDOUT


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "testhide.db")
    for org in ("acme", "other"):
        await s.create_org(org, NOW)
        await s.create_pool(org, "default", NOW)
    try:
        yield s
    finally:
        await s.close()


async def held(store: SqliteStore, job_id: str = "j1", agent_id: str = "agent-1", key: bytes = b"k") -> Job:
    spec = JobSpec(image="busybox", command=("true",))
    await store.create_job(Job(job_id, "acme", spec, JobStatus.QUEUED, NOW), key)
    job = await store.assign_job("acme", job_id, agent_id, NOW, NOW + LEASE)
    assert job is not None
    return job


async def refusal(store: SqliteStore, org: str, job_id: str, agent_id: str, epoch: int) -> str:
    """What each way of speaking about the job is answered, the job id blanked out."""
    answers = set()
    for attempt in (
        store.held_job(org, job_id, agent_id, epoch),
        store.report_job(org, job_id, agent_id, epoch, JobStatus.RUNNING, NOW),
        store.report_job(org, job_id, agent_id, epoch, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=0),
        store.append_log_batch(org, job_id, agent_id, epoch, 1, [(OUT, b"forged", 6)]),
    ):
        with pytest.raises(NotHeld) as refused:
            await attempt
        answers.add(str(refused.value).replace(job_id, "<job>"))
    [answer] = answers
    return answer


async def test_only_the_holder_at_its_epoch_is_answered(store: SqliteStore) -> None:
    job = await held(store)
    assert (await store.held_job("acme", "j1", "agent-1", job.epoch)).id == "j1"
    before = await store.get_job("acme", "j1")
    nonexistent = await refusal(store, "acme", "j-missing", "agent-1", job.epoch)
    for org, agent_id, epoch in [
        ("acme", "agent-2", job.epoch),  # another agent, even one that knows the epoch
        ("acme", "agent-1", job.epoch - 1),
        ("acme", "agent-1", job.epoch + 1),
        ("acme", "agent-1", job.epoch + 100),
        ("other", "agent-1", job.epoch),
    ]:
        assert await refusal(store, org, "j1", agent_id, epoch) == nonexistent, (org, agent_id, epoch)
    assert not re.search(r"\d", nonexistent)  # no epoch, no count
    assert await store.get_job("acme", "j1") == before


@pytest.mark.parametrize("taken_back_as", [JobStatus.QUEUED, JobStatus.LOST])
async def test_a_job_taken_back_is_held_by_nobody(store: SqliteStore, taken_back_as: JobStatus) -> None:
    job = await held(store)
    await store.report_job("acme", "j1", "agent-1", job.epoch, JobStatus.RUNNING, NOW)
    released = await store.release_job("acme", "j1", job.epoch, taken_back_as, "taken back", NOW)
    assert released.agent_id == ("" if taken_back_as == JobStatus.QUEUED else "agent-1")
    nonexistent = await refusal(store, "acme", "j-missing", "agent-1", job.epoch)
    # Not at its own epoch, nor at the next one, which the former holder could guess.
    for epoch in (job.epoch, released.epoch):
        assert await refusal(store, "acme", "j1", "agent-1", epoch) == nonexistent
    assert await store.extend_leases("acme", "agent-1", {"j1": released.epoch}, NOW + LEASE) == 0
    assert await store.get_job("acme", "j1") == released


async def test_a_lapsed_lease_names_the_agent_that_held_the_job(store: SqliteStore) -> None:
    await held(store, "j1", "agent-1")
    [(requeued, holder)] = await store.expire_leases(NOW + 2 * LEASE)
    assert (requeued.status, requeued.agent_id, holder) == (JobStatus.QUEUED, "", "agent-1")


async def test_a_job_ended_on_its_holders_report_answers_its_replays_only(store: SqliteStore) -> None:
    job = await held(store)
    assert await store.append_log_batch("acme", "j1", "agent-1", job.epoch, 1, [(OUT, b"x", 1)]) == 1
    done, changed = await store.report_job(
        "acme", "j1", "agent-1", job.epoch, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=1
    )
    assert changed
    # Its acknowledgements may have been lost with the connection: the replays are answered.
    assert await store.append_log_batch("acme", "j1", "agent-1", job.epoch, 1, [(OUT, b"x", 1)]) == 1
    again, changed = await store.report_job(
        "acme", "j1", "agent-1", job.epoch, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=1
    )
    assert not changed
    # Nothing new is taken, and no lease comes back.
    with pytest.raises(NotHeld):
        await store.append_log_batch("acme", "j1", "agent-1", job.epoch, 2, [(OUT, b"late", 4)])
    assert await store.extend_leases("acme", "agent-1", {"j1": job.epoch}, NOW + LEASE) == 0
    final = await store.get_job("acme", "j1")
    assert final is not None
    assert replace(final, transitions=()) == done == again


async def test_a_log_batch_for_a_job_not_held_is_refused_before_anything_of_it_is_read(
    store: SqliteStore,
) -> None:
    master = MasterKey.generate()
    _, wrapped = master.new_data_key(aad=b"j1")
    job = await held(store, key=wrapped)
    logs = LogBook(store, master)
    # The holder's batch puts the job's data key in the cache; the intruder's finds it there.
    assert await logs.append("acme", "agent-1", "j1", job.epoch, 1, [(OUT, b"mine\n")]) == 1
    answers = set()
    for job_id, agent_id in [("j1", "agent-2"), ("j-missing", "agent-2"), ("j1", "agent-1")]:
        epoch = job.epoch + 1 if agent_id == "agent-1" else job.epoch
        with pytest.raises(NotHeld) as refused:
            await logs.append("acme", agent_id, job_id, epoch, 2, [(OUT, b"forged\n")])
        answers.add(str(refused.value).replace(job_id, "<job>"))
    assert len(answers) == 1
    assert b"".join([c.data async for c in logs.read("acme", "j1", 0)]) == b"mine\n"
