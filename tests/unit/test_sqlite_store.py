"""controlplane/store/sqlite.py on a file in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from testhide.controlplane.errors import FailedPrecondition, NotFound, NotHeld, StaleEpoch, Unauthenticated
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogStream, Resources
from testhide.controlplane.store.base import ApiKeyRecord, EnrollmentTokenRecord
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.sqlite import SqliteStore

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
OUT, ERR = LogStream.STDOUT, LogStream.STDERR
LEASE = timedelta(seconds=60)


def make_job(job_id: str, org: str = "acme", pool: str = "default", **spec_changes: object) -> Job:
    spec = JobSpec(image="alpine:3", command=("sh", "-c", "echo hi"), pool=pool, **spec_changes)  # type: ignore[arg-type]
    return Job(id=job_id, org=org, spec=spec, status=JobStatus.QUEUED, created_at=NOW)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "testhide.db")
    await s.create_org("acme", NOW)
    await s.create_org("other", NOW)
    await s.create_pool("acme", "default", NOW)
    await s.create_pool("other", "default", NOW)
    try:
        yield s
    finally:
        await s.close()


async def assigned(store: SqliteStore, job_id: str = "j1") -> Job:
    await store.create_job(make_job(job_id), b"wrapped-key")
    job = await store.assign_job("acme", job_id, "agent-1", NOW, NOW + LEASE)
    assert job is not None
    return job


# ------------------------------------------------------------------ migrations


async def test_migrations_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = await SqliteStore.open(path)
    await first.create_org("acme", NOW)
    await first.close()
    second = await SqliteStore.open(path)  # must not re-run CREATE TABLE
    assert await second.pool_exists("acme", "nope") is False
    await second.create_pool("acme", "default", NOW)
    assert await second.pool_exists("acme", "default")
    await second.close()
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert versions == [version for version, _ in MIGRATIONS]
    assert {
        "orgs",
        "pools",
        "api_keys",
        "enrollment_tokens",
        "agents",
        "jobs",
        "job_transitions",
        "log_entries",
    } <= tables


async def test_foreign_keys_enforced(store: SqliteStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await store.create_pool("no-such-org", "default", NOW)
    with pytest.raises(sqlite3.IntegrityError):
        await store.create_job(make_job("j", org="no-such-org"), b"k")


# ------------------------------------------------------------------ jobs


async def test_job_round_trip(store: SqliteStore) -> None:
    job = make_job(
        "j1",
        env={"A": "1"},
        timeout=timedelta(minutes=5),
        labels={"team": "x"},
        resources=Resources(cpus=0.5, memory_bytes=64 * 1024**2, pids=10),
        workdir="/src",
    )
    await store.create_job(job, b"wrapped-key")
    loaded = await store.get_job("acme", "j1")
    assert loaded is not None
    assert loaded.spec == job.spec
    assert (loaded.id, loaded.org, loaded.status, loaded.created_at) == ("j1", "acme", JobStatus.QUEUED, NOW)
    assert (loaded.epoch, loaded.last_seq, loaded.log_size, loaded.agent_id) == (0, 0, 0, "")
    assert [t.status for t in loaded.transitions] == [JobStatus.QUEUED]
    assert await store.get_job_data_key("acme", "j1") == b"wrapped-key"


async def test_org_scoping(store: SqliteStore) -> None:
    await store.create_job(make_job("j1"), b"k1")
    await store.create_job(make_job("j2"), b"k2")
    await store.create_job(make_job("j3", org="other"), b"k3")
    assert await store.get_job("other", "j1") is None
    assert await store.get_job("acme", "j3") is None
    assert [j.id for j in await store.list_jobs("acme", 10, None)] == ["j2", "j1"]
    assert [j.id for j in await store.list_jobs("other", 10, None)] == ["j3"]
    assert await store.list_jobs("nobody", 10, None) == []
    with pytest.raises(NotFound):
        await store.get_job_data_key("other", "j1")
    with pytest.raises(NotFound):
        await store.set_job_status("other", "j1", None, JobStatus.CANCELED, NOW)
    assert await store.assign_job("other", "j1", "agent-x", NOW, NOW + LEASE) is None
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.status == JobStatus.QUEUED


async def test_list_jobs_pagination(store: SqliteStore) -> None:
    for i in range(5):
        await store.create_job(make_job(f"j{i}"), b"k")
    assert [j.id for j in await store.list_jobs("acme", 2, None)] == ["j4", "j3"]
    assert [j.id for j in await store.list_jobs("acme", 2, "j3")] == ["j2", "j1"]
    assert [j.id for j in await store.list_jobs("acme", 10, "j1")] == ["j0"]


async def test_queued_jobs_and_pools(store: SqliteStore) -> None:
    await store.create_pool("acme", "gpu", NOW)
    await store.create_job(make_job("j1"), b"k")
    await store.create_job(make_job("j2", pool="gpu"), b"k")
    await store.create_job(make_job("j3"), b"k")
    await store.assign_job("acme", "j1", "agent-1", NOW, NOW + LEASE)
    assert [j.id for j in await store.queued_jobs("acme", "default", 10)] == ["j3"]
    assert [j.id for j in await store.queued_jobs("acme", "gpu", 10)] == ["j2"]
    assert sorted(await store.queued_pools()) == [("acme", "default"), ("acme", "gpu")]
    assert [j.id for j in await store.jobs_of_agent("acme", "agent-1")] == ["j1"]
    assert await store.jobs_of_agent("other", "agent-1") == []


async def test_assign_only_from_queued_and_bumps_epoch(store: SqliteStore) -> None:
    job = await assigned(store)
    assert (job.status, job.agent_id, job.epoch) == (JobStatus.ASSIGNED, "agent-1", 1)
    assert [t.status for t in job.transitions] == [JobStatus.QUEUED, JobStatus.ASSIGNED]
    assert job.transitions[-1].reason == "agent agent-1"
    # Someone else already won it.
    assert await store.assign_job("acme", "j1", "agent-2", NOW, NOW + LEASE) is None
    # Requeued (e.g. its agent vanished) and assigned again: a new epoch fences the old holder.
    await store.set_job_status("acme", "j1", 1, JobStatus.QUEUED, NOW, "agent lost")
    again = await store.assign_job("acme", "j1", "agent-2", NOW, NOW + LEASE)
    assert again is not None
    assert (again.epoch, again.agent_id) == (2, "agent-2")
    with pytest.raises(StaleEpoch):
        await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, NOW)
    assert await store.assign_job("acme", "missing", "agent-1", NOW, NOW + LEASE) is None


async def test_assign_refused_from_running_and_terminal(store: SqliteStore) -> None:
    await assigned(store, "j1")
    await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, NOW)
    assert await store.assign_job("acme", "j1", "agent-2", NOW, NOW + LEASE) is None
    await store.create_job(make_job("j2"), b"k")
    await store.set_job_status("acme", "j2", None, JobStatus.CANCELED, NOW)
    assert await store.assign_job("acme", "j2", "agent-2", NOW, NOW + LEASE) is None


async def test_set_job_status_lifecycle(store: SqliteStore) -> None:
    await assigned(store)
    later = NOW + timedelta(minutes=1)
    running = await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, later)
    assert running.status == JobStatus.RUNNING
    assert running.started_at == later
    assert running.finished_at is None
    # Same status again is a no-op, not an error.
    same = await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, later + timedelta(seconds=5))
    assert same.started_at == later
    assert len(same.transitions) == len(running.transitions)
    end = later + timedelta(minutes=2)
    done = await store.set_job_status("acme", "j1", 1, JobStatus.FAILED, end, "exit 3", exit_code=3)
    assert (done.status, done.exit_code, done.status_reason) == (JobStatus.FAILED, 3, "exit 3")
    assert done.started_at == later
    assert done.finished_at == end
    assert [t.status for t in done.transitions] == [
        JobStatus.QUEUED,
        JobStatus.ASSIGNED,
        JobStatus.RUNNING,
        JobStatus.FAILED,
    ]
    assert [t.at for t in done.transitions] == [NOW, NOW, later, end]


async def test_set_job_status_refuses_stale_epoch(store: SqliteStore) -> None:
    await assigned(store)
    for stale in (0, 2):
        with pytest.raises(StaleEpoch):
            await store.set_job_status("acme", "j1", stale, JobStatus.RUNNING, NOW)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.status == JobStatus.ASSIGNED


@pytest.mark.parametrize("terminal", [JobStatus.SUCCEEDED, JobStatus.CANCELED, JobStatus.LOST])
async def test_set_job_status_refuses_leaving_terminal(store: SqliteStore, terminal: JobStatus) -> None:
    await assigned(store)
    await store.set_job_status("acme", "j1", 1, terminal, NOW)
    for status in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.FAILED):
        with pytest.raises(FailedPrecondition) as info:
            await store.set_job_status("acme", "j1", 1, status, NOW)
        assert not isinstance(info.value, StaleEpoch)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.status == terminal


async def test_set_job_status_unknown_job(store: SqliteStore) -> None:
    with pytest.raises(NotFound):
        await store.set_job_status("acme", "missing", None, JobStatus.RUNNING, NOW)


# ------------------------------------------------------------------ logs


async def test_append_log_batch_offsets_and_replay(store: SqliteStore) -> None:
    await assigned(store)
    first = [(OUT, b"sealed-a", 5), (ERR, b"sealed-b", 3)]
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 1, first) == 1
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"sealed-c", 4)]) == 2
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert (job.last_seq, job.log_size) == (2, 12)
    entries = await store.read_log("acme", "j1", 0, 100)
    assert [(e.offset, e.stream, e.sealed, e.seq, e.index) for e in entries] == [
        (0, OUT, b"sealed-a", 1, 0),
        (5, ERR, b"sealed-b", 1, 1),
        (8, OUT, b"sealed-c", 2, 0),
    ]

    # A replayed batch (after a reconnect) is acknowledged but stored once.
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 1, [(OUT, b"different", 99)]) == 2
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"different", 99)]) == 2
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert (job.last_seq, job.log_size) == (2, 12)
    assert len(await store.read_log("acme", "j1", 0, 100)) == 3


async def test_append_log_batch_refuses_a_gap(store: SqliteStore) -> None:
    await assigned(store)
    with pytest.raises(FailedPrecondition, match="before batch 1"):
        await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"x", 1)])
    await store.append_log_batch("acme", "j1", "agent-1", 1, 1, [(OUT, b"x", 1)])
    with pytest.raises(FailedPrecondition, match="before batch 2"):
        await store.append_log_batch("acme", "j1", "agent-1", 1, 3, [(OUT, b"y", 1)])
    assert len(await store.read_log("acme", "j1", 0, 100)) == 1


async def test_append_log_batch_refuses_stale_epoch_and_unknown_job(store: SqliteStore) -> None:
    await assigned(store)
    with pytest.raises(NotHeld):
        await store.append_log_batch("acme", "j1", "agent-1", 0, 1, [(OUT, b"x", 1)])
    with pytest.raises(NotHeld):
        await store.append_log_batch("acme", "j1", "agent-2", 1, 1, [(OUT, b"x", 1)])
    with pytest.raises(NotHeld):
        await store.append_log_batch("acme", "missing", "agent-1", 1, 1, [(OUT, b"x", 1)])
    with pytest.raises(NotHeld):
        await store.append_log_batch("other", "j1", "agent-1", 1, 1, [(OUT, b"x", 1)])
    assert await store.read_log("acme", "j1", 0, 100) == []


async def test_empty_batch_advances_seq(store: SqliteStore) -> None:
    await assigned(store)
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 1, []) == 1
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"x", 4)]) == 2
    assert [e.offset for e in await store.read_log("acme", "j1", 0, 10)] == [0]


async def test_read_log_from_offsets(store: SqliteStore) -> None:
    await assigned(store)
    batch = [(OUT, b"e0", 5), (ERR, b"e1", 3)]
    await store.append_log_batch("acme", "j1", "agent-1", 1, 1, batch)  # [0,5) [5,8)
    await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"e2", 4)])  # [8,12)

    async def offsets(start: int, limit: int = 100) -> list[int]:
        return [e.offset for e in await store.read_log("acme", "j1", start, limit)]

    assert await offsets(0) == [0, 5, 8]
    assert await offsets(3) == [0, 5, 8]  # mid-entry: the entry holding byte 3 first
    assert await offsets(5) == [5, 8]
    assert await offsets(6) == [5, 8]
    assert await offsets(7) == [5, 8]
    assert await offsets(8) == [8]
    assert await offsets(11) == [8]
    assert await offsets(0, limit=2) == [0, 5]
    assert await store.read_log("other", "j1", 0, 100) == []


# ------------------------------------------------------------------ enrollment tokens


def token(
    expires: datetime = NOW + timedelta(hours=1),
    secret_hash: bytes = b"h" * 32,
    pool: str = "default",
) -> EnrollmentTokenRecord:
    """Enrollment token ``t1`` of org ``acme``."""
    return EnrollmentTokenRecord("t1", "acme", pool, secret_hash, NOW, expires)


async def test_consume_enrollment_token_once(store: SqliteStore) -> None:
    await store.create_enrollment_token(token())
    used_at = NOW + timedelta(minutes=5)
    record = await store.consume_enrollment_token("t1", b"h" * 32, used_at)
    assert (record.id, record.org, record.pool, record.used_at) == ("t1", "acme", "default", used_at)
    assert record.expires_at == NOW + timedelta(hours=1)
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, used_at)


async def test_consume_enrollment_token_refuses_expired(store: SqliteStore) -> None:
    await store.create_enrollment_token(token(expires=NOW + timedelta(minutes=10)))
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=10))
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(days=1))
    # Just before expiry it still works.
    assert await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=9, seconds=59))


async def test_consume_enrollment_token_refuses_wrong_hash_without_burning_it(store: SqliteStore) -> None:
    await store.create_enrollment_token(token())
    for wrong in (b"x" * 32, b"h" * 31, b""):
        with pytest.raises(Unauthenticated):
            await store.consume_enrollment_token("t1", wrong, NOW)
    assert (await store.consume_enrollment_token("t1", b"h" * 32, NOW)).id == "t1"


async def test_consume_enrollment_token_refuses_revoked(store: SqliteStore) -> None:
    await store.create_enrollment_token(token())
    revoked = await store.revoke_enrollment_token("t1", NOW + timedelta(minutes=1))
    assert revoked is not None
    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=2))
    assert await store.revoke_enrollment_token("missing", NOW) is None


async def test_consume_unknown_enrollment_token(store: SqliteStore) -> None:
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("missing", b"h" * 32, NOW)


async def test_enrollment_token_needs_an_existing_pool(store: SqliteStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await store.create_enrollment_token(token(pool="nope"))


async def test_api_key_round_trip(store: SqliteStore) -> None:
    record = ApiKeyRecord("k1", "acme", "ci", b"\x00hash", ("jobs:read", "jobs:write"), NOW)
    await store.create_api_key(record)
    assert await store.get_api_key("k1") == record
    assert await store.get_api_key("k2") is None


# ------------------------------------------------------------------ leases


async def test_heartbeat_extends_only_held_jobs_at_their_epoch(store: SqliteStore) -> None:
    await assigned(store, "j1")
    await assigned(store, "j2")
    later = NOW + 2 * LEASE
    assert await store.extend_leases("acme", "agent-1", {"j1": 1, "j2": 7, "missing": 1}, later) == 1
    assert await store.extend_leases("acme", "agent-2", {"j1": 1}, later) == 0  # not its job
    assert await store.extend_leases("other", "agent-1", {"j1": 1}, later) == 0  # not its org
    extended, other = await store.get_job("acme", "j1"), await store.get_job("acme", "j2")
    assert extended is not None
    assert other is not None
    assert extended.lease_expires_at == later
    assert other.lease_expires_at == NOW + LEASE


async def test_lapsed_lease_requeues_assigned_and_loses_running(store: SqliteStore) -> None:
    await assigned(store, "j1")
    await assigned(store, "j2")
    await store.set_job_status("acme", "j2", 1, JobStatus.RUNNING, NOW)
    assert await store.expire_leases(NOW + LEASE) == []  # not yet: the lease runs up to its end
    released = {j.id: j for j, _ in await store.expire_leases(NOW + LEASE + timedelta(seconds=1))}
    assert released["j1"].status == JobStatus.QUEUED
    assert released["j1"].lease_expires_at is None
    assert released["j2"].status == JobStatus.LOST
    assert released["j2"].finished_at is not None
    assert "stopped reporting" in released["j2"].status_reason
    # Both epochs moved on: the old holder is fenced off at once, even before any reassignment.
    assert released["j1"].epoch == released["j2"].epoch == 2
    with pytest.raises(NotHeld):
        await store.append_log_batch("acme", "j2", "agent-1", 1, 1, [(OUT, b"late", 4)])
    with pytest.raises(StaleEpoch):
        await store.set_job_status("acme", "j2", 1, JobStatus.SUCCEEDED, NOW)
    assert await store.expire_leases(NOW + 3 * LEASE) == []  # released once
    again = await store.assign_job("acme", "j1", "agent-2", NOW, NOW + LEASE)
    assert again is not None
    assert again.epoch == 3


async def test_restart_grace_extends_every_held_lease(store: SqliteStore) -> None:
    await assigned(store, "j1")
    await store.create_job(make_job("j2"), b"k")
    assert await store.extend_all_leases(NOW + 5 * LEASE) == 1
    assert await store.expire_leases(NOW + 2 * LEASE) == []


async def test_release_is_fenced(store: SqliteStore) -> None:
    await assigned(store, "j1")
    with pytest.raises(StaleEpoch):
        await store.release_job("acme", "j1", 2, JobStatus.LOST, "x", NOW)
    with pytest.raises(NotFound):
        await store.release_job("other", "j1", 1, JobStatus.LOST, "x", NOW)
    lost = await store.release_job("acme", "j1", 1, JobStatus.LOST, "agent came back without it", NOW)
    assert (lost.status, lost.epoch) == (JobStatus.LOST, 2)
    with pytest.raises(StaleEpoch):
        await store.release_job("acme", "j1", 2, JobStatus.LOST, "again", NOW)


async def test_lost_job_is_retried_once_per_attempt_as_asked(store: SqliteStore) -> None:
    await store.create_job(make_job("j1", retries=1), b"k")
    await store.assign_job("acme", "j1", "agent-1", NOW, NOW + LEASE)
    await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, NOW)
    await store.create_job(make_job("j9"), b"k")  # asked for no retries
    await store.assign_job("acme", "j9", "agent-1", NOW, NOW + LEASE)
    await store.set_job_status("acme", "j9", 1, JobStatus.RUNNING, NOW)
    await store.expire_leases(NOW + 2 * LEASE)
    [lost] = await store.retryable_jobs(10)
    assert lost.id == "j1"
    assert lost.retryable
    retry = await store.create_retry(lost, make_job("j2"), b"k2")
    assert retry is not None
    assert (retry.attempt, retry.retry_of, retry.status) == (2, "j1", JobStatus.QUEUED)
    assert retry.spec == lost.spec
    assert await store.create_retry(lost, make_job("j3"), b"k3") is None  # once
    first = await store.get_job("acme", "j1")
    assert first is not None
    assert first.retried_as == "j2"
    assert await store.retryable_jobs(10) == []
    # The retry is lost too: its one retry is spent.
    await store.assign_job("acme", "j2", "agent-1", NOW, NOW + LEASE)
    await store.set_job_status("acme", "j2", 1, JobStatus.RUNNING, NOW)
    await store.expire_leases(NOW + 2 * LEASE)
    assert await store.retryable_jobs(10) == []


async def test_agent_reports_are_checked_and_applied_once(store: SqliteStore) -> None:
    await assigned(store, "j1")
    with pytest.raises(NotHeld):  # not this agent's job, whatever the epoch
        await store.report_job("acme", "j1", "agent-2", 1, JobStatus.RUNNING, NOW)
    with pytest.raises(NotHeld):
        await store.report_job("acme", "j1", "agent-1", 2, JobStatus.RUNNING, NOW)
    running, changed = await store.report_job("acme", "j1", "agent-1", 1, JobStatus.RUNNING, NOW)
    assert changed
    assert running.status == JobStatus.RUNNING
    assert running.started_at == NOW
    assert not (await store.report_job("acme", "j1", "agent-1", 1, JobStatus.RUNNING, NOW))[1]  # a replay
    await store.append_log_batch("acme", "j1", "agent-1", 1, 1, [(OUT, b"x", 1)])
    with pytest.raises(FailedPrecondition):  # the result may not overtake the log
        await store.report_job("acme", "j1", "agent-1", 1, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=2)
    done, changed = await store.report_job(
        "acme", "j1", "agent-1", 1, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=1
    )
    assert changed
    assert (done.status, done.exit_code, done.lease_expires_at) == (JobStatus.SUCCEEDED, 0, None)
    # A replayed or late result changes nothing, also with another outcome.
    again, changed = await store.report_job(
        "acme", "j1", "agent-1", 1, JobStatus.FAILED, NOW, exit_code=1, last_seq=1
    )
    assert not changed
    assert again.status == JobStatus.SUCCEEDED
    final = await store.get_job("acme", "j1")
    assert final is not None
    transitions = final.transitions
    assert [t.status for t in transitions] == [
        JobStatus.QUEUED,
        JobStatus.ASSIGNED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
    ]
