"""Pausing a pool from the operator's shell (`pools pause|resume|list`), which a running
serve follows from another process, and what the stores keep of pools: on SQLite and on
PostgreSQL."""

from __future__ import annotations

import getpass
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane.errors import NotFound
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus
from testhide.controlplane.store.base import Store
from tests.harness import (
    JOB_IMAGE,
    RunningControlPlane,
    control_plane,
    eventually,
    in_status,
    job,
    operator,
    running_agent,
)
from tests.json_schema import assert_matches_example
from tests.pg import fresh_database

PAUSED = (
    "waiting: pool 'default' is paused by an administrator; nothing new is dispatched until it is resumed"
)


@pytest.fixture(params=["sqlite", "postgres"])
async def cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(fresh_database()) if request.param == "postgres" else None
        yield await stack.enter_async_context(control_plane(tmp_path, database_url=url))


def store_of(cp: RunningControlPlane) -> Store:
    assert cp.daemon._store is not None
    return cp.daemon._store


async def submit(cp: RunningControlPlane, pool: str = "default", org: str = "default") -> Job:
    assert cp.daemon.jobs is not None
    return await cp.daemon.jobs.submit(org, JobSpec(image=JOB_IMAGE, command=("true",), pool=pool))


async def operated(cp: RunningControlPlane, *args: str) -> str:
    code, out, err = await operator(*args, "--data-dir", str(cp.data_dir))
    assert code == 0, err
    return out


async def test_an_operator_pauses_and_resumes_a_pool_that_a_running_serve_dispatches(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    async with running_agent(cp, tmp_path, FakeRuntime()):
        await operated(cp, "pools", "pause", "default")
        waiting = await submit(cp)
        assert ((await job(cp, waiting.id)).status_reason) == PAUSED
        pools = json.loads(await operated(cp, "pools", "list", "--json"))
        assert_matches_example("testhide-controlplane pools list", pools)
        for listing in ("agents", "enroll-token"):
            shown = json.loads(await operated(cp, listing, "list", "--json"))
            assert_matches_example(f"testhide-controlplane {listing} list", shown)
        [listed] = pools
        assert listed == {
            "org": "default",
            "name": "default",
            "paused": True,
            "allowed_images": [],
            "pull_policy": "never",
            "runtime": "",
            "agent_cert_ttl_s": None,
            "agents_enrolled": 1,
            "agents_connected": 1,
            "jobs_queued": 1,
            "jobs_running": 0,
            "created_at": listed["created_at"],
            "egress_allow": [],
        }
        await operated(cp, "pools", "resume", "default")
        # The serve learns of it from the database (PostgreSQL: a notification; SQLite: its watcher).
        await eventually(lambda: in_status(cp, waiting.id, JobStatus.SUCCEEDED), 10, "the job to run")
    actions = [
        (e.event.action, e.event.actor, e.event.target)
        for e in (await store_of(cp).read_audit())[0]
        if e.event.action.startswith("pool_")
    ]
    me = f"operator:{getpass.getuser()}"
    assert actions == [("pool_paused", me, "default"), ("pool_resumed", me, "default")]
    code, _, err = await operator("pools", "pause", "--data-dir", str(cp.data_dir), "--org", "nobody", "x")
    assert (code, err.strip()) == (1, "Error: pool 'x' not found")


async def test_stores_keep_pools_paused_counted_and_scoped_to_their_organisation(
    cp: RunningControlPlane,
) -> None:
    store = store_of(cp)
    now = datetime.now(UTC)
    await store.create_org("acme", now)
    await store.create_pool("acme", "default", now)
    await store.create_pool("acme", "gpu", now)
    await store.set_pool_cert_ttl("acme", "gpu", timedelta(minutes=5))
    queued = await submit(cp, "gpu", "acme")

    assert [p.name for p in await store.list_pools("default")] == ["default"]
    assert [(p.org, p.name) for p in await store.list_pools()] == [
        ("acme", "default"),
        ("acme", "gpu"),
        ("default", "default"),
    ]
    gpu = (await store.list_pools("acme"))[1]
    assert (gpu.agent_cert_ttl, gpu.jobs_queued, gpu.jobs_running, gpu.policy.paused) == (
        timedelta(minutes=5),
        1,
        0,
        False,
    )
    assert [j.id for j in await store.queued_jobs("acme", "gpu", 10)] == [queued.id]

    await store.set_pool_paused("acme", "gpu", True, now)
    assert (await store.pool_policy("acme", "gpu")).paused
    assert not (await store.pool_policy("acme", "default")).paused
    assert await store.queued_jobs("acme", "gpu", 10) == []  # the dispatcher sees nothing of it
    assert ("acme", "gpu") not in await store.queued_pools()
    assert await store.pools_resumed_since(now - timedelta(seconds=1)) == []

    resumed_at = datetime.now(UTC)
    await store.set_pool_paused("acme", "gpu", False, resumed_at)
    assert [j.id for j in await store.queued_jobs("acme", "gpu", 10)] == [queued.id]
    assert await store.pools_resumed_since(resumed_at) == [("acme", "gpu")]
    assert await store.pools_resumed_since(resumed_at + timedelta(seconds=1)) == []
    with pytest.raises(NotFound):
        await store.set_pool_paused("default", "gpu", True, now)  # acme's pool, not default's
    assert [a.org for a in await store.list_agents("default")] == []
    assert [t.org for t in await store.list_enrollment_tokens("acme")] == []
