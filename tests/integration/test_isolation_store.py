"""Both stores keep what an agent read back from the containers beside a job's own:
its fetch step's (with the step) and its services' (with the started report), and a job
stored before they existed reads with none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from testhide.controlplane.jobs.model import FetchStep, Isolation, JobReport, JobStatus, ServiceIsolation
from testhide.controlplane.store.base import Store
from tests.integration.test_store import NOW, assigned, empty_store, populate

FACTS = Isolation(
    runtime="runc",
    network_mode="testhide-egress-j1",
    interfaces=("eth0", "lo"),
    user="65534:65534",
    cap_drop=("ALL",),
    no_new_privileges=True,
    seccomp="testhide",
    read_only_root=True,
    pids_limit=100,
    memory_bytes=2**28,
    cpus=1.5,
    image_id="sha256:" + "ab" * 32,
    mounts=("/cache (rw)", "/tmp (tmpfs)", "/workspace (ro)"),
)
SERVICES = (
    ServiceIsolation("db", FACTS),
    ServiceIsolation("cache", Isolation(network_mode="container:x", interfaces=("lo",))),
)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        yield s


async def test_a_fetch_steps_facts_are_stored_with_the_step(store: Store) -> None:
    await assigned(store, "j1")
    await store.record_fetch("acme", "j1", "agent-1", 1, FetchStep("none", 0, 1.0, (), FACTS))
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.fetch == FetchStep("none", 0, 1.0, (), FACTS)
    await store.record_fetch("acme", "j1", "agent-1", 1, FetchStep("hit", 0, 0.0))
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.fetch is not None
    assert job.fetch.isolation is None


async def test_services_facts_are_stored_with_the_started_report(store: Store) -> None:
    await assigned(store, "j1")
    assert (await store.get_job("acme", "j1")).service_isolation == ()  # type: ignore[union-attr]
    report = JobReport("acme", "agent-1", "j1", 1, JobStatus.RUNNING, isolation=FACTS, services=SERVICES)
    [outcome] = await store.report_jobs([report], NOW)
    assert not isinstance(outcome, Exception)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert (job.status, job.isolation, job.service_isolation) == (JobStatus.RUNNING, FACTS, SERVICES)
    [listed] = await store.list_jobs("acme", 10, None)
    assert listed.service_isolation == SERVICES
