"""The storage contract (store/base.py ``Store``) on both backends: SQLite on a
file in tmp_path, and PostgreSQL on a fresh database of the test cluster
(tests/pg.py: skipped on a laptop without one, a failure in CI). Every
contract test runs as ``[sqlite]`` and ``[postgres]``; a representative few
also through psycopg 3 (``[postgres-psycopg]``, the ``?driver=psycopg`` URL).

Then what one backend has alone: SQLite's migration table and online
snapshot; PostgreSQL's migrations across replicas starting together, its
schema-version checks, several control planes (one ``PgStore`` each) racing
on one database, and a database that cuts its connections."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import AuditChain, AuditEntry, AuditEvent, Auditor
from testhide.controlplane.ca.store import AgentHello, CertificateRenewal
from testhide.controlplane.errors import (
    ConfigError,
    FailedPrecondition,
    NotFound,
    NotHeld,
    StaleEpoch,
    StorageUnavailable,
    Unauthenticated,
)
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogStream, Resources
from testhide.controlplane.jobs.scheduler import Scheduler
from testhide.controlplane.store.base import (
    AgentRecord,
    ApiKeyRecord,
    EnrollmentTokenRecord,
    RefreshRecord,
    Store,
)
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore
from tests.pg import fresh_database

T = TypeVar("T")

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
OUT, ERR = LogStream.STDOUT, LogStream.STDERR
LEASE = timedelta(seconds=60)

SQLITE, POSTGRES, PSYCOPG = "sqlite", "postgres", "postgres-psycopg"
EVERY_DRIVER = pytest.mark.parametrize("store", [SQLITE, POSTGRES, PSYCOPG], indirect=True)
"""For a representative slice: PostgreSQL through psycopg 3 as well as asyncpg."""

TABLES = {
    "orgs",
    "pools",
    "api_keys",
    "enrollment_tokens",
    "agents",
    "jobs",
    "job_transitions",
    "log_entries",
    "audit_log",
    "audit_head",
    "refresh_tokens",
}


def make_job(job_id: str, org: str = "acme", pool: str = "default", **spec_changes: object) -> Job:
    spec = JobSpec(image="alpine:3", command=("sh", "-c", "echo hi"), pool=pool, **spec_changes)  # type: ignore[arg-type]
    return Job(id=job_id, org=org, spec=spec, status=JobStatus.QUEUED, created_at=NOW)


def with_driver(url: str, driver: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(q for q in (parts.query, f"driver={driver}") if q)))


def through(url: str, kind: str) -> str:
    """The URL of the database ``url`` names, for the driver ``kind`` (POSTGRES or PSYCOPG) names."""
    return with_driver(url, "psycopg") if kind == PSYCOPG else url


@asynccontextmanager
async def empty_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A new store: a SQLite file, or a fresh PostgreSQL database through the driver ``kind`` names."""
    async with AsyncExitStack() as stack:
        store: Store
        if kind == SQLITE:
            store = await SqliteStore.open(tmp_path / "testhide.db")
        else:
            url = await stack.enter_async_context(fresh_database())
            store = await PgStore.open(through(url, kind))
        stack.push_async_callback(store.close)
        yield store


async def populate(store: Store) -> None:
    """Organisations acme and other, each with the pool default."""
    for org in ("acme", "other"):
        await store.create_org(org, NOW)
        await store.create_pool(org, "default", NOW)


@pytest.fixture(params=[SQLITE, POSTGRES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        yield s


def integrity_error(store: Store) -> type[Exception]:
    """What the backend's driver raises for a broken foreign key; the stores pass it on as it is."""
    if isinstance(store, SqliteStore):
        return sqlite3.IntegrityError
    assert isinstance(store, PgStore)
    return psycopg.IntegrityError if store.driver == "psycopg" else asyncpg.IntegrityConstraintViolationError


async def assigned(store: Store, job_id: str = "j1") -> Job:
    await store.create_job(make_job(job_id), b"wrapped-key")
    job = await store.assign_job("acme", job_id, "agent-1", NOW, NOW + LEASE)
    assert job is not None
    return job


# ------------------------------------------------------------------ SQLite alone


async def test_sqlite_migrations_applied_once(tmp_path: Path) -> None:
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
    assert tables >= TABLES


async def test_sqlite_snapshot_is_a_working_copy(tmp_path: Path) -> None:
    async with empty_store(SQLITE, tmp_path) as store:
        await populate(store)
        await assigned(store, "j1")
        await store.snapshot(tmp_path / "copy.db")
    copy = await SqliteStore.open(tmp_path / "copy.db")
    try:
        job = await copy.get_job("acme", "j1")
        assert job is not None
        assert (job.status, job.epoch) == (JobStatus.ASSIGNED, 1)
        assert await copy.integrity_problems() == []
    finally:
        await copy.close()


# ------------------------------------------------------------------ the database as a whole


@EVERY_DRIVER
async def test_foreign_keys_enforced(store: Store) -> None:
    with pytest.raises(integrity_error(store)):
        await store.create_pool("no-such-org", "default", NOW)
    with pytest.raises(integrity_error(store)):
        await store.create_job(make_job("j", org="no-such-org"), b"k")
    assert await store.list_jobs("no-such-org", 10, None) == []


async def test_a_sound_database_has_no_integrity_problems(store: Store) -> None:
    await assigned(store)
    assert await store.integrity_problems() == []


@EVERY_DRIVER
async def test_data_keys_are_listed_in_order_and_replaced_only_where_unchanged(store: Store) -> None:
    await store.create_job(make_job("j1"), b"key-1")
    await store.create_job(make_job("j2"), b"key-2")
    await store.put_secret("acme", "TOKEN", b"secret-key", b"sealed", NOW)
    keys = await store.data_keys("jobs", 0, 10)
    assert [(k.table, k.owner, k.wrapped) for k in keys] == [
        ("jobs", ("j1",), b"key-1"),
        ("jobs", ("j2",), b"key-2"),
    ]
    assert keys[0].rowid < keys[1].rowid
    assert await store.data_keys("jobs", keys[0].rowid, 10) == keys[1:]
    assert await store.data_keys("jobs", 0, 1) == keys[:1]
    [secret] = await store.data_keys("secrets", 0, 10)
    assert (secret.owner, secret.wrapped) == (("acme", "TOKEN"), b"secret-key")
    assert await store.data_keys("blobs", 0, 10) == []
    changed = await store.replace_data_keys(
        "jobs", [(keys[0].rowid, b"key-1", b"new-1"), (keys[1].rowid, b"not-what-it-holds", b"new-2")]
    )
    assert changed == 1
    assert await store.get_job_data_key("acme", "j1") == b"new-1"
    assert await store.get_job_data_key("acme", "j2") == b"key-2"
    with pytest.raises(KeyError):  # only the tables that hold data keys ever reach the SQL
        await store.data_keys("orgs; DROP TABLE jobs", 0, 10)
    with pytest.raises(KeyError):
        await store.replace_data_keys("orgs", [])


# ------------------------------------------------------------------ jobs


@EVERY_DRIVER
async def test_job_round_trip(store: Store) -> None:
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


async def test_org_scoping(store: Store) -> None:
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


async def test_list_jobs_pagination(store: Store) -> None:
    for i in range(5):
        await store.create_job(make_job(f"j{i}"), b"k")
    assert [j.id for j in await store.list_jobs("acme", 2, None)] == ["j4", "j3"]
    assert [j.id for j in await store.list_jobs("acme", 2, "j3")] == ["j2", "j1"]
    assert [j.id for j in await store.list_jobs("acme", 10, "j1")] == ["j0"]


async def test_queued_jobs_and_pools(store: Store) -> None:
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


@EVERY_DRIVER
async def test_assign_only_from_queued_and_bumps_epoch(store: Store) -> None:
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


async def test_assign_refused_from_running_and_terminal(store: Store) -> None:
    await assigned(store, "j1")
    await store.set_job_status("acme", "j1", 1, JobStatus.RUNNING, NOW)
    assert await store.assign_job("acme", "j1", "agent-2", NOW, NOW + LEASE) is None
    await store.create_job(make_job("j2"), b"k")
    await store.set_job_status("acme", "j2", None, JobStatus.CANCELED, NOW)
    assert await store.assign_job("acme", "j2", "agent-2", NOW, NOW + LEASE) is None


async def test_set_job_status_lifecycle(store: Store) -> None:
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


async def test_set_job_status_refuses_stale_epoch(store: Store) -> None:
    await assigned(store)
    for stale in (0, 2):
        with pytest.raises(StaleEpoch):
            await store.set_job_status("acme", "j1", stale, JobStatus.RUNNING, NOW)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.status == JobStatus.ASSIGNED


@pytest.mark.parametrize("terminal", [JobStatus.SUCCEEDED, JobStatus.CANCELED, JobStatus.LOST])
async def test_set_job_status_refuses_leaving_terminal(store: Store, terminal: JobStatus) -> None:
    await assigned(store)
    await store.set_job_status("acme", "j1", 1, terminal, NOW)
    for status in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.FAILED):
        with pytest.raises(FailedPrecondition) as info:
            await store.set_job_status("acme", "j1", 1, status, NOW)
        assert not isinstance(info.value, StaleEpoch)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.status == terminal


async def test_set_job_status_unknown_job(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.set_job_status("acme", "missing", None, JobStatus.RUNNING, NOW)


# ------------------------------------------------------------------ logs


@EVERY_DRIVER
async def test_append_log_batch_offsets_and_replay(store: Store) -> None:
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


async def test_append_log_batch_refuses_a_gap(store: Store) -> None:
    await assigned(store)
    with pytest.raises(FailedPrecondition, match="before batch 1"):
        await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"x", 1)])
    await store.append_log_batch("acme", "j1", "agent-1", 1, 1, [(OUT, b"x", 1)])
    with pytest.raises(FailedPrecondition, match="before batch 2"):
        await store.append_log_batch("acme", "j1", "agent-1", 1, 3, [(OUT, b"y", 1)])
    assert len(await store.read_log("acme", "j1", 0, 100)) == 1


async def test_append_log_batch_refuses_stale_epoch_and_unknown_job(store: Store) -> None:
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


async def test_empty_batch_advances_seq(store: Store) -> None:
    await assigned(store)
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 1, []) == 1
    assert await store.append_log_batch("acme", "j1", "agent-1", 1, 2, [(OUT, b"x", 4)]) == 2
    assert [e.offset for e in await store.read_log("acme", "j1", 0, 10)] == [0]


@EVERY_DRIVER
async def test_read_log_from_offsets(store: Store) -> None:
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


@EVERY_DRIVER
async def test_consume_enrollment_token_once(store: Store) -> None:
    await store.create_enrollment_token(token())
    used_at = NOW + timedelta(minutes=5)
    record = await store.consume_enrollment_token("t1", b"h" * 32, used_at)
    assert (record.id, record.org, record.pool, record.used_at) == ("t1", "acme", "default", used_at)
    assert record.expires_at == NOW + timedelta(hours=1)
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, used_at)


async def test_consume_enrollment_token_refuses_expired(store: Store) -> None:
    await store.create_enrollment_token(token(expires=NOW + timedelta(minutes=10)))
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=10))
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(days=1))
    # Just before expiry it still works.
    assert await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=9, seconds=59))


async def test_consume_enrollment_token_refuses_wrong_hash_without_burning_it(store: Store) -> None:
    await store.create_enrollment_token(token())
    for wrong in (b"x" * 32, b"h" * 31, b""):
        with pytest.raises(Unauthenticated):
            await store.consume_enrollment_token("t1", wrong, NOW)
    assert (await store.consume_enrollment_token("t1", b"h" * 32, NOW)).id == "t1"


async def test_consume_enrollment_token_refuses_revoked(store: Store) -> None:
    await store.create_enrollment_token(token())
    revoked = await store.revoke_enrollment_token("t1", NOW + timedelta(minutes=1))
    assert revoked is not None
    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("t1", b"h" * 32, NOW + timedelta(minutes=2))
    assert await store.revoke_enrollment_token("missing", NOW) is None


async def test_consume_unknown_enrollment_token(store: Store) -> None:
    with pytest.raises(Unauthenticated):
        await store.consume_enrollment_token("missing", b"h" * 32, NOW)


async def test_enrollment_token_needs_an_existing_pool(store: Store) -> None:
    with pytest.raises(integrity_error(store)):
        await store.create_enrollment_token(token(pool="nope"))


@EVERY_DRIVER
async def test_api_key_round_trip(store: Store) -> None:
    record = ApiKeyRecord("k1", "acme", "ci", b"\x00hash", ("jobs:read", "jobs:write"), NOW)
    await store.create_api_key(record)
    assert await store.get_api_key("k1") == record
    assert await store.get_api_key("k2") is None


# ------------------------------------------------------------------ leases


async def test_heartbeat_extends_only_held_jobs_at_their_epoch(store: Store) -> None:
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


@EVERY_DRIVER
async def test_lapsed_lease_requeues_assigned_and_loses_running(store: Store) -> None:
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


@EVERY_DRIVER
async def test_a_job_whose_log_began_is_lost_not_requeued(store: Store) -> None:
    # A batch stored before the RUNNING report (an agent's reason for giving up on the start,
    # or any agent sending early): the job must not run again under the same log (the next
    # holder's first batches would pass for replays of these).
    for job_id, lease in (("j1", LEASE), ("j2", 3 * LEASE)):
        await store.create_job(make_job(job_id, retries=1), b"k")
        await store.assign_job("acme", job_id, "agent-1", NOW, NOW + lease)
        await store.append_log_batch("acme", job_id, "agent-1", 1, 1, [(OUT, b"sealed-a", 4)])
    [(lapsed, holder)] = await store.expire_leases(NOW + 2 * LEASE)
    refused = await store.release_job(
        "acme", "j2", 1, JobStatus.QUEUED, "agent refused it (x); requeued", NOW
    )
    assert holder == "agent-1"
    for job in (lapsed, refused):
        assert (job.status, job.epoch, job.last_seq) == (JobStatus.LOST, 2, 1)
        assert job.finished_at is not None
        assert job.status_reason.endswith("but its log had begun: lost, not requeued")
    assert refused.status_reason.startswith("agent refused it (x), but")
    assert [t.status for t in refused.transitions][-1] == JobStatus.LOST
    assert [(e.seq, e.sealed) for e in await store.read_log("acme", "j1", 0, 10)] == [(1, b"sealed-a")]
    assert {j.id for j in await store.retryable_jobs(10)} == {"j1", "j2"}  # each as asked, anew
    # Without a stored batch, the same release still queues the job again.
    await assigned(store, "j3")
    requeued = await store.release_job("acme", "j3", 1, JobStatus.QUEUED, "agent refused it; requeued", NOW)
    assert (requeued.status, requeued.status_reason) == (JobStatus.QUEUED, "agent refused it; requeued")


async def test_restart_grace_extends_every_held_lease(store: Store) -> None:
    await assigned(store, "j1")
    await store.create_job(make_job("j2"), b"k")
    assert await store.extend_all_leases(NOW + 5 * LEASE) == 1
    assert await store.expire_leases(NOW + 2 * LEASE) == []


async def test_release_is_fenced(store: Store) -> None:
    await assigned(store, "j1")
    with pytest.raises(StaleEpoch):
        await store.release_job("acme", "j1", 2, JobStatus.LOST, "x", NOW)
    with pytest.raises(NotFound):
        await store.release_job("other", "j1", 1, JobStatus.LOST, "x", NOW)
    lost = await store.release_job("acme", "j1", 1, JobStatus.LOST, "agent came back without it", NOW)
    assert (lost.status, lost.epoch) == (JobStatus.LOST, 2)
    with pytest.raises(StaleEpoch):
        await store.release_job("acme", "j1", 2, JobStatus.LOST, "again", NOW)


async def test_lost_job_is_retried_once_per_attempt_as_asked(store: Store) -> None:
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


@EVERY_DRIVER
async def test_agent_reports_are_checked_and_applied_once(store: Store) -> None:
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


# ------------------------------------------------------------------ refresh tokens and audit


def refresh_token(token_id: str = "r1", family: str = "f1") -> RefreshRecord:
    return RefreshRecord(
        token_id, family, "acme", "api_key", "k1", ("jobs:read",), b"r" * 32, NOW, NOW + timedelta(days=30)
    )


@EVERY_DRIVER
async def test_refresh_token_is_spent_once_and_its_family_revoked_together(store: Store) -> None:
    await store.create_refresh_token(refresh_token("r1"))
    await store.create_refresh_token(refresh_token("r2"))
    await store.create_refresh_token(refresh_token("r3", family="f2"))
    used_at = NOW + timedelta(minutes=1)
    found = await store.spend_refresh_token("r1", used_at)
    assert found is not None
    record, spent = found
    assert spent
    assert record == refresh_token("r1")  # as it was before this call spent it
    again = await store.spend_refresh_token("r1", used_at + timedelta(minutes=1))
    assert again is not None
    assert again == (replace(record, used_at=used_at), False)
    assert await store.spend_refresh_token("missing", NOW) is None
    assert not await store.family_revoked("f1")
    assert await store.revoke_refresh_family("f1", used_at) == 2
    assert await store.family_revoked("f1")
    assert not await store.family_revoked("f2")
    found = await store.spend_refresh_token("r2", used_at)
    assert found is not None
    assert found[0].revoked_at == used_at


@EVERY_DRIVER
async def test_audit_chain_round_trip(store: Store) -> None:
    chain = AuditChain(b"k" * 32)
    assert await store.read_audit() == ([], None)
    events = [
        AuditEvent("login", "api_key:k1", "acme", "f1", {}, "203.0.113.9", NOW),
        AuditEvent("job_created", "user:u1", "acme", "j1", {"image": "alpine:3", "n": [1, 2]}, "", NOW),
        AuditEvent("org_revoked", "operator:root", at=datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)),
    ]
    appended = [await store.append_audit(event, chain) for event in events]
    assert [e.seq for e in appended] == [1, 2, 3]
    entries, head = await store.read_audit()
    assert entries == appended
    assert [e.event for e in entries] == events
    assert head is not None
    assert head[:2] == (3, appended[-1].hash)
    assert chain.verify(entries, head) == []
    assert AuditChain(b"x" * 32).verify(entries, head)  # another key: nothing verifies


@EVERY_DRIVER
async def test_renewals_are_recorded_with_their_audit_entries_in_one_transaction(store: Store) -> None:
    chain = AuditChain(b"k" * 32)
    for agent_id in ("a1", "a2", "a3"):
        await store.create_agent(new_agent(agent_id))
    await store.revoke_agent("a2", NOW)
    before = await store.append_audit(AuditEvent("agent_revoked", "operator:root", "acme", "a2"), chain)
    assert await store.record_agent_renewals([], chain) == []

    def renewal(agent_id: str, serial: str) -> CertificateRenewal:
        event = AuditEvent(
            "agent_certificate_renewed", f"agent:{agent_id}", "acme", agent_id, {"serial": serial}
        )
        return CertificateRenewal("acme", agent_id, serial, NOW + timedelta(hours=2), "ca-2", event)

    renewals = [renewal("a1", "b1"), renewal("a2", "b2"), renewal("a3", "b3")]
    assert await store.record_agent_renewals(renewals, chain) == [True, False, True]  # a2 is revoked
    agents = {a.id: a for a in await store.list_agents("acme")}
    assert [(agents[i].cert_serial, agents[i].cert_issuer) for i in ("a1", "a2", "a3")] == [
        ("b1", "ca-2"),
        ("5e", ""),
        ("b3", "ca-2"),
    ]
    assert agents["a1"].cert_not_after == NOW + timedelta(hours=2)
    entries, head = await store.read_audit()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0] == before
    assert [e.event for e in entries[1:]] == [renewals[0].event, renewals[2].event]
    assert chain.verify(entries, head) == []


# ------------------------------------------------------------------ PostgreSQL alone


async def schema_of(url: str) -> tuple[list[int], set[str]]:
    """The versions schema_migrations records, and the tables there are."""
    conn = await asyncpg.connect(url)
    try:
        versions = [
            r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        ]
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        }
    finally:
        await conn.close()
    return versions, tables


KNOWN_VERSIONS = [version for version, _ in PG_MIGRATIONS]


async def test_pg_migrations_applied_once_and_recorded(pg_url: str) -> None:
    first = await PgStore.open(pg_url)
    await first.create_org("acme", NOW)
    await first.close()
    second = await PgStore.open(pg_url)  # must not re-run CREATE TABLE
    try:
        assert await second.migrate() == []
        assert await second.list_orgs() == ["acme"]
        assert await second.pool_exists("acme", "nope") is False
        await second.create_pool("acme", "default", NOW)
        assert await second.pool_exists("acme", "default")
    finally:
        await second.close()
    versions, tables = await schema_of(pg_url)
    assert versions == KNOWN_VERSIONS
    assert tables >= TABLES | {"schema_migrations"}


async def test_pg_replicas_starting_together_migrate_once(pg_url: str) -> None:
    opening = await asyncio.gather(PgStore.open(pg_url), PgStore.open(pg_url), return_exceptions=True)
    stores = [s for s in opening if isinstance(s, PgStore)]
    try:
        assert len(stores) == 2, opening
        first, second = stores
        await first.create_org("acme", NOW)
        assert await second.list_orgs() == ["acme"]
        assert await second.migrate() == []
    finally:
        for s in stores:
            await s.close()
    versions, _ = await schema_of(pg_url)
    assert versions == KNOWN_VERSIONS


async def test_pg_database_of_a_newer_testhide_is_refused(pg_url: str) -> None:
    await (await PgStore.open(pg_url)).close()
    known = max(KNOWN_VERSIONS)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", known + 1)
    finally:
        await conn.close()
    for migrate in (True, False):
        with pytest.raises(ConfigError) as refused:
            await PgStore.open(pg_url, migrate=migrate)
        assert {int(n) for n in re.findall(r"\d+", str(refused.value))} >= {known, known + 1}, refused.value


async def test_pg_open_without_migrating_refuses_an_empty_database(pg_url: str) -> None:
    with pytest.raises(FailedPrecondition):
        await PgStore.open(pg_url, migrate=False)
    conn = await asyncpg.connect(pg_url)
    try:  # it only looked
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()
    await (await PgStore.open(pg_url)).close()
    store = await PgStore.open(pg_url, migrate=False)  # once migrated, it opens
    try:
        await store.create_org("acme", NOW)
        assert await store.list_orgs() == ["acme"]
    finally:
        await store.close()


async def test_pg_snapshot_points_to_pg_dump(pg_url: str, tmp_path: Path) -> None:
    store = await PgStore.open(pg_url)
    try:
        with pytest.raises(FailedPrecondition, match="pg_dump"):
            await store.snapshot(tmp_path / "copy.db")
    finally:
        await store.close()
    assert not (tmp_path / "copy.db").exists()


async def test_pg_url_chooses_the_driver(pg_url: str) -> None:
    for url, driver in [
        (pg_url, "asyncpg"),
        (with_driver(pg_url, "asyncpg"), "asyncpg"),
        (with_driver(pg_url, "psycopg"), "psycopg"),
    ]:
        store = await PgStore.open(url)
        try:
            assert store.driver == driver
        finally:
            await store.close()
    with pytest.raises(ConfigError, match="nope"):
        await PgStore.open(with_driver(pg_url, "nope"))


# ------------------------------------------------------------------ several control planes, one database


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore]]:
    """Two control planes on one database, each its own PgStore (its own pool of connections)."""
    async with AsyncExitStack() as stack:
        first = await PgStore.open(pg_url)
        stack.push_async_callback(first.close)
        second = await PgStore.open(pg_url)
        stack.push_async_callback(second.close)
        await populate(first)
        yield first, second


async def together(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Runs the calls at once; every one must finish without an exception (each is awaited to its end)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    return results  # type: ignore[return-value]


async def test_pg_a_job_assigned_from_two_replicas_at_once_goes_to_one(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    ids = [f"j{i:02}" for i in range(20)]
    for job_id in ids:
        await first.create_job(make_job(job_id), b"k")
    contenders = ((first, "agent-a"), (second, "agent-b"))
    results = await together(
        s.assign_job("acme", job_id, agent, NOW, NOW + LEASE) for job_id in ids for s, agent in contenders
    )
    for job_id, pair in zip(ids, zip(results[::2], results[1::2], strict=True), strict=True):
        [winner] = [job for job in pair if job is not None]
        stored = await second.get_job("acme", job_id)
        assert stored is not None
        assert (stored.status, stored.agent_id, stored.epoch) == (JobStatus.ASSIGNED, winner.agent_id, 1)
        assert [t.status for t in stored.transitions] == [JobStatus.QUEUED, JobStatus.ASSIGNED]


async def test_pg_an_enrollment_token_redeemed_at_two_replicas_at_once_enrolls_one(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    ids = [f"t{i:02}" for i in range(20)]
    for token_id in ids:
        await first.create_enrollment_token(replace(token(), id=token_id))
    at = {first: NOW + timedelta(minutes=1), second: NOW + timedelta(minutes=2)}

    async def redeem(s: PgStore, token_id: str) -> EnrollmentTokenRecord | None:
        try:
            return await s.consume_enrollment_token(token_id, b"h" * 32, at[s])
        except Unauthenticated:
            return None

    results = await together(redeem(s, token_id) for token_id in ids for s in (first, second))
    used = {t.id: t.used_at for t in await second.list_enrollment_tokens()}
    for token_id, pair in zip(ids, zip(results[::2], results[1::2], strict=True), strict=True):
        [record] = [r for r in pair if r is not None]
        assert record.id == token_id
        assert used[token_id] == record.used_at
        assert record.used_at in at.values()


async def test_pg_a_refresh_token_rotated_at_two_replicas_at_once_is_spent_once(
    replicas: tuple[PgStore, PgStore],
) -> None:
    """Each replica does what Sessions.refresh does with the store: spend the
    token, and issue the next one only if this call spent it. The other call
    sees a token spent just now: Sessions answers it within the reuse grace and
    revokes the whole family beyond it."""
    first, second = replicas
    families = [f"f{i:02}" for i in range(20)]
    for family in families:
        await first.create_refresh_token(refresh_token(f"{family}-r1", family))
    at = {first: NOW + timedelta(minutes=1), second: NOW + timedelta(minutes=2)}

    async def rotate(s: PgStore, family: str) -> tuple[RefreshRecord, bool, RefreshRecord | None]:
        found = await s.spend_refresh_token(f"{family}-r1", at[s])
        assert found is not None
        record, spent = found
        if not spent:
            return record, spent, None
        following = replace(record, id=f"{family}-r2-{at[s].minute}", created_at=at[s])
        await s.create_refresh_token(following)
        return record, spent, following

    results = await together(rotate(s, family) for family in families for s in (first, second))
    for family, pair in zip(families, zip(results[::2], results[1::2], strict=True), strict=True):
        [(record, _, following)] = [r for r in pair if r[1]]
        [(replay, _, nothing)] = [r for r in pair if not r[1]]
        assert following is not None
        assert nothing is None
        assert record.used_at is None
        assert replay == replace(record, used_at=following.created_at)  # the other spent it, just then
        # A replay beyond the grace revokes the family, the token just issued included.
        assert await second.revoke_refresh_family(family, NOW + timedelta(hours=1)) == 2
        assert await first.family_revoked(family)
        spent_next = await first.spend_refresh_token(following.id, NOW + timedelta(hours=2))
        assert spent_next is not None
        assert spent_next[0].revoked_at == NOW + timedelta(hours=1)


async def test_pg_audit_appends_from_two_replicas_at_once_make_one_chain(
    replicas: tuple[PgStore, PgStore],
) -> None:
    key = b"k" * 32
    chain = AuditChain(key)
    first, second = replicas
    names = {first: "first", second: "second"}
    appends = [
        s.append_audit(AuditEvent(f"{names[s]}-{i}", "operator:test", details={"i": i}), chain)
        for i in range(50)
        for s in (first, second)
    ]
    appended: list[AuditEntry] = await together(appends)
    assert sorted(e.seq for e in appended) == list(range(1, 101))
    entries, head = await first.read_audit()
    assert chain.verify(entries, head) == []
    assert [e.seq for e in entries] == list(range(1, 101))
    assert sorted(e.event.action for e in entries) == sorted(e.event.action for e in appended)
    assert sorted(entries, key=lambda e: e.seq) == sorted(appended, key=lambda e: e.seq)
    verified, problems = await Auditor(second, key).verify()
    assert (verified, problems) == (entries, [])


async def start_jobs(store: Store, running: list[str], assigned_only: list[str]) -> None:
    """Held by agent-1 since NOW: ``running`` (each asks for one retry), ``assigned_only`` not started."""
    for job_id in running + assigned_only:
        await store.create_job(make_job(job_id, retries=1), b"k")
        job = await store.assign_job("acme", job_id, "agent-1", NOW, NOW + LEASE)
        assert job is not None
        if job_id in running:
            await store.set_job_status("acme", job_id, job.epoch, JobStatus.RUNNING, NOW)


async def test_pg_lapsed_leases_expired_by_two_replicas_at_once_are_released_once(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    running, waiting = [f"r{i:02}" for i in range(10)], [f"w{i:02}" for i in range(5)]
    await start_jobs(first, running, waiting)
    later = NOW + 2 * LEASE
    released = await together([first.expire_leases(later), second.expire_leases(later)])
    ids = Counter(job.id for batch in released for job, _ in batch)
    assert ids == Counter(running + waiting)
    for batch in released:
        for job, holder in batch:
            assert holder == "agent-1"
            assert job.epoch == 2
            assert job.status == (JobStatus.LOST if job.id in running else JobStatus.QUEUED)
    lost = await first.retryable_jobs(100)
    assert sorted(j.id for j in lost) == running
    retries = await together(
        s.create_retry(job, make_job(f"{job.id}-{n}"), b"k2")
        for job in lost
        for n, s in enumerate((first, second))
    )
    assert sorted(r.retry_of for r in retries if r is not None) == running
    assert await second.retryable_jobs(100) == []


async def test_pg_lease_sweeps_at_two_replicas_at_once_retry_each_lost_job_once(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    running, waiting = [f"r{i:02}" for i in range(10)], [f"w{i:02}" for i in range(5)]
    await start_jobs(first, running, waiting)

    def keeper(store: PgStore) -> Leases:
        master = MasterKey.generate()
        scheduler = Scheduler(store, lease=LEASE)
        return Leases(store, master, scheduler, LogBook(store, master), LEASE, lambda: NOW + 2 * LEASE)

    await together([keeper(first).sweep(), keeper(second).sweep()])
    jobs = {job.id: job for job in await second.list_jobs("acme", 100, None)}
    assert len(jobs) == 2 * len(running) + len(waiting)
    for job_id in running:
        lost = jobs[job_id]
        assert (lost.status, lost.epoch) == (JobStatus.LOST, 2)
        assert [t.status for t in lost.transitions].count(JobStatus.LOST) == 1
        [retry] = [job for job in jobs.values() if job.retry_of == job_id]
        assert retry.id == lost.retried_as
        assert (retry.status, retry.attempt) == (JobStatus.QUEUED, 2)
    for job_id in waiting:
        requeued = jobs[job_id]
        assert (requeued.status, requeued.epoch, requeued.retried_as) == (JobStatus.QUEUED, 2, "")
        assert [t.status for t in requeued.transitions] == [
            JobStatus.QUEUED,
            JobStatus.ASSIGNED,
            JobStatus.QUEUED,
        ]


# ------------------------------------------------------------------ a database that goes away


async def cut_connections(url: str) -> int:
    """Terminates every other session on the database, waiting until each has ended; returns how many."""
    admin = await asyncpg.connect(url)
    try:
        cut: int = await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    return cut


@pytest.mark.parametrize("kind", [POSTGRES, PSYCOPG])
async def test_pg_connections_cut_by_the_server_are_storage_unavailable_then_replaced(
    pg_url: str, kind: str
) -> None:
    store = await PgStore.open(through(pg_url, kind))
    try:
        await populate(store)
        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("read", store.list_orgs),
            ("write", lambda: store.extend_all_leases(NOW)),
            ("reads in one snapshot", lambda: store.list_jobs("acme", 10, None)),
        ]
        for name, call in calls:
            await together(store.list_orgs() for _ in range(4))  # several connections in the pool
            assert await cut_connections(pg_url) >= 1, name
            # A pool that notices the cut reconnects at once; else the call fails as transient, only.
            with suppress(StorageUnavailable):
                await call()
            await call()
        assert await store.list_orgs() == ["acme", "other"]
    finally:
        await store.close()


# ------------------------------------------------------------------ enrollment and agents (the build host)


def new_agent(agent_id: str = "a1", org: str = "acme") -> AgentRecord:
    return AgentRecord(agent_id, org, "default", "build-1", "5e", NOW + timedelta(hours=1), NOW)


@EVERY_DRIVER
async def test_enroll_agent_spends_the_token_and_adds_the_agent_together(store: Store) -> None:
    await store.create_enrollment_token(token())
    looked_at = await store.enrollment_token("t1", b"h" * 32, NOW)
    assert (looked_at.org, looked_at.pool, looked_at.used_at) == ("acme", "default", None)
    assert [t.used_at for t in await store.list_enrollment_tokens()] == [None]  # looking spends nothing
    spent = await store.enroll_agent("t1", b"h" * 32, NOW, new_agent())
    assert spent.used_at == NOW
    assert [a.id for a in await store.list_agents()] == ["a1"]
    for again in (
        store.enrollment_token("t1", b"h" * 32, NOW),
        store.enroll_agent("t1", b"h" * 32, NOW, new_agent("a2")),
    ):
        with pytest.raises(Unauthenticated):
            await again
    assert [a.id for a in await store.list_agents()] == ["a1"]


async def test_a_failed_enrollment_keeps_the_token_and_leaves_no_agent(store: Store) -> None:
    await store.create_agent(new_agent("a1"))
    await store.create_enrollment_token(token())
    with pytest.raises(integrity_error(store)):  # the agent cannot be added (its id is taken)
        await store.enroll_agent("t1", b"h" * 32, NOW, new_agent("a1"))
    with pytest.raises(Unauthenticated):  # nor into another org than the token's
        await store.enroll_agent("t1", b"h" * 32, NOW, new_agent("a2", org="other"))
    with pytest.raises(Unauthenticated):  # nor with the wrong secret
        await store.enroll_agent("t1", b"x" * 32, NOW, new_agent("a2"))
    assert [t.used_at for t in await store.list_enrollment_tokens()] == [None]
    assert [a.id for a in await store.list_agents()] == ["a1"]
    await store.enroll_agent("t1", b"h" * 32, NOW, new_agent("a2"))
    assert [a.id for a in await store.list_agents()] == ["a1", "a2"]


async def test_agents_list_what_their_hello_offered_and_their_running_jobs(store: Store) -> None:
    await store.create_agent(new_agent("agent-1"))
    await store.create_agent(new_agent("agent-2"))
    never = next(a for a in await store.list_agents() if a.id == "agent-2")
    assert (never.labels, never.runtimes, never.max_jobs, never.last_seen_at, never.replica) == (
        {},
        (),
        0,
        None,
        "",
    )
    hello = AgentHello.shown("1.2.3", {"arch": "amd64", "gpu\x1b[31m": "no"}, ["runsc", "runc"], 4)
    await store.touch_agent("acme", "agent-1", NOW, hello)
    await assigned(store, "j1")
    await assigned(store, "j2")
    await store.report_job("acme", "j2", "agent-1", 1, JobStatus.SUCCEEDED, NOW, exit_code=0, last_seq=0)
    await store.touch_agent("acme", "agent-1", NOW + timedelta(seconds=20))  # a heartbeat keeps the offer
    listed = {a.id: a for a in await store.list_agents()}
    seen = listed["agent-1"]
    assert (seen.version, seen.labels, seen.runtimes, seen.max_jobs) == (
        "1.2.3",
        {"arch": "amd64", "gpu[31m": "no"},  # an agent's words, without control characters
        ("runc", "runsc"),
        4,
    )
    assert (seen.running_jobs, listed["agent-2"].running_jobs) == (1, 0)
    assert seen.last_seen_at == NOW + timedelta(seconds=20)
    assert (await store.get_agent("acme", "agent-1")) is not None


async def test_the_stream_holder_of_an_agent_is_marked_until_it_disconnects(store: Store) -> None:
    """SQLite: the serve process marks the agent itself; PostgreSQL: the cluster's replica mark."""
    await store.create_agent(new_agent())
    hello = AgentHello.shown("1.2.3", {}, ["runc"], 1)
    await store.touch_agent("acme", "a1", NOW, hello)
    if isinstance(store, PgStore):
        await store.set_agent_replica("acme", "a1", "r1")
        holder = "r1"
    else:
        holder = f"pid:{os.getpid()}"
    [agent] = await store.list_agents()
    assert agent.replica == holder
    await store.agent_disconnected("acme", "a1", NOW + timedelta(seconds=5))
    if isinstance(store, PgStore):
        await store.clear_agent_replica("a1", "r1")
    [agent] = await store.list_agents()
    assert (agent.replica, agent.last_seen_at) == ("", NOW + timedelta(seconds=5))
