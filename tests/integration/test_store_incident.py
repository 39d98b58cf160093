"""The scope of an incident's reads (store/incident.py) on both backends: the agent of any
organisation or of one, the certificates the audit log recorded for it, and every job it was
handed (also one taken back from it), scoped to its organisation, with artifacts and test
summaries, filtered by ``since``; and on SQLite, that the look-ups by agent use their indexes."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from testhide.controlplane.auth.audit import AuditChain, AuditEvent
from testhide.controlplane.jobs.model import JobStatus, TestCase, TestStatus
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord, Store
from testhide.controlplane.store.incident import CERTIFICATE_EVENTS, TestSummary
from testhide.controlplane.store.sqlite import SqliteStore
from testhide.controlplane.store.sqlite_incident import _AGENT_JOBS
from tests.integration.test_store import LEASE, NOW, POSTGRES, SQLITE, empty_store, make_job, populate

LATER = NOW + timedelta(hours=1)


@pytest.fixture(params=[SQLITE, POSTGRES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        for agent_id, org in (("a1", "acme"), ("a2", "acme"), ("b1", "other")):
            token = EnrollmentTokenRecord(f"t-{agent_id}", org, "default", b"h" * 32, NOW, LATER)
            await s.create_enrollment_token(token)
            agent = AgentRecord(agent_id, org, "default", f"host-{agent_id}", "5e", LATER, NOW)
            await s.enroll_agent(token.id, b"h" * 32, NOW, agent)
        yield s


async def ran(store: Store, job_id: str, agent_id: str, org: str = "acme", finished: bool = True) -> None:
    """``job_id`` created, assigned to ``agent_id`` and (if ``finished``) succeeded at NOW."""
    await store.create_job(make_job(job_id, org, secrets=("DEPLOY_TOKEN",)), b"wrapped-key")
    job = await store.assign_job(org, job_id, agent_id, NOW, NOW + LEASE)
    assert job is not None
    await store.report_job(org, job_id, agent_id, job.epoch, JobStatus.RUNNING, NOW)
    if finished:
        await store.report_job(org, job_id, agent_id, job.epoch, JobStatus.SUCCEEDED, NOW, exit_code=0)


async def test_the_agent_is_found_in_any_organisation_or_only_in_its_own(store: Store) -> None:
    found = await store.incident_agent("b1", None)
    assert found is not None
    assert (found.id, found.org) == ("b1", "other")
    assert await store.incident_agent("b1", "other") == found
    assert await store.incident_agent("b1", "acme") is None  # another organisation's: as if none
    assert await store.incident_agent("nope", None) is None


async def test_the_certificates_come_from_the_audit_log(store: Store) -> None:
    chain = AuditChain(b"k" * 32)
    events = [
        AuditEvent(
            CERTIFICATE_EVENTS[0], "token:t", "acme", "a1", {"serial": "5e", "not_after": LATER.isoformat()}
        ),
        AuditEvent(
            CERTIFICATE_EVENTS[1], "agent:a1", "acme", "a1", {"serial": "6f", "not_after": LATER.isoformat()}
        ),
        AuditEvent(CERTIFICATE_EVENTS[1], "agent:a2", "acme", "a2", {"serial": "70"}),
        AuditEvent("agent_revoked", "operator:root", "acme", "a1", {}),
    ]
    for event in events:
        await store.append_audit(event, chain)
    certificates = await store.agent_certificates("acme", "a1")
    assert [(c.serial, c.event, c.not_after) for c in certificates] == [
        ("5e", "agent_enrolled", LATER),
        ("6f", "agent_certificate_renewed", LATER),
    ]
    assert await store.agent_certificates("other", "a1") == []


async def test_every_job_handed_to_the_agent_is_listed_even_one_taken_back(store: Store) -> None:
    await ran(store, "j1", "a1")
    await ran(store, "j2", "a2")
    await ran(store, "k1", "b1", org="other")
    # j3: handed to a1, taken back before it started, then run by a2: a1 still received it.
    await store.create_job(make_job("j3", fetch_secrets=("PIP_TOKEN",)), b"wrapped-key")
    first = await store.assign_job("acme", "j3", "a1", NOW, NOW + LEASE)
    assert first is not None
    await store.release_job("acme", "j3", first.epoch, JobStatus.QUEUED, "lease lapsed", NOW)
    assert await store.assign_job("acme", "j3", "a2", LATER, LATER + LEASE) is not None

    a1 = await store.agent_jobs("acme", "a1", None)
    assert [(j.job.id, j.held, j.assigned_at) for j in a1] == [("j3", False, NOW), ("j1", True, NOW)]
    assert a1[0].job.spec.fetch_secrets == ("PIP_TOKEN",)
    assert a1[1].job.spec.secrets == ("DEPLOY_TOKEN",)
    a2 = await store.agent_jobs("acme", "a2", None)
    assert [(j.job.id, j.held, j.assigned_at) for j in a2] == [("j3", True, LATER), ("j2", True, NOW)]
    assert await store.agent_jobs("other", "a1", None) == []  # scoped to the organisation
    assert [j.job.id for j in await store.agent_jobs("acme", "a1", None, limit=1)] == ["j3"]


async def test_artifacts_and_test_summaries_come_with_each_job(store: Store) -> None:
    await ran(store, "j1", "a1")
    await ran(store, "j2", "a1")
    await store.create_blob("b1", "acme", "artifact", "j1", "dist/app.whl", b"k", NOW)
    await store.complete_blob("b1", 2048, "ab" * 32)
    await store.create_blob("b2", "acme", "artifact", "j1", "dist/unfinished", b"k", NOW)  # never completed
    await store.create_blob("w1", "acme", "workspace", None, "", b"k", NOW)
    await store.complete_blob("w1", 10, "cd" * 32)
    cases = [
        TestCase("s", "c", "ok", 0.1, TestStatus.PASSED),
        TestCase("s", "c", "ok2", 0.1, TestStatus.PASSED),
        TestCase("s", "c", "bad", 0.1, TestStatus.FAILED, "boom"),
        TestCase("s", "c", "skip", 0.0, TestStatus.SKIPPED),
    ]
    await store.record_test_report("j1", "r/junit.xml", cases, "")
    await store.record_test_report("j1", "r/broken.xml", [], "not XML")

    j2, j1 = await store.agent_jobs("acme", "a1", None)
    assert [(a.path, a.size, a.sha256) for a in j1.artifacts] == [("dist/app.whl", 2048, "ab" * 32)]
    assert j1.tests == TestSummary(passed=2, failed=1, errors=0, skipped=1, unreadable_reports=1)
    assert (j2.artifacts, j2.tests) == ((), None)


async def test_since_keeps_the_jobs_not_finished_before_it(store: Store) -> None:
    await ran(store, "j1", "a1")  # finished at NOW
    await ran(store, "j2", "a1", finished=False)
    before, after = NOW - timedelta(seconds=1), NOW + timedelta(seconds=1)
    assert [j.job.id for j in await store.agent_jobs("acme", "a1", before)] == ["j2", "j1"]
    assert [j.job.id for j in await store.agent_jobs("acme", "a1", after)] == ["j2"]


async def test_the_look_ups_by_agent_use_their_indexes(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "testhide.db")
    await store.close()
    with sqlite3.connect(tmp_path / "testhide.db") as db:
        plan = " ".join(
            str(row[3])
            for row in db.execute(
                f"EXPLAIN QUERY PLAN {_AGENT_JOBS}", ("acme", "a1", "acme", "agent a1", None, None, 10)
            )
        )
        assert "jobs_by_agent" in plan, plan
        assert "job_assignments" in plan, plan
        plan = " ".join(
            str(row[3])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT at, action, details FROM audit_log WHERE target = ? AND org = ?"
                " ORDER BY seq",
                ("a1", "acme"),
            )
        )
        assert "audit_by_target" in plan, plan
