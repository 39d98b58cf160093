"""agent/executor.py with a fetch step and services, on the scripted FakeRuntime
and scripted egress and caches: what runs in which order with what, what the
control plane is told, and what is cleaned up (the real containers, proxy and
caches are tested in tests/integration/test_fetch_and_services.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testhide.agent.model import EgressRequest, JobFetched, JobResult, JobStarted, Outcome, ServiceSpec
from testhide.agent.runtime.base import VolumeMount
from testhide.agent.runtime.fake import FakeServices, Script
from testhide.agent.steps import JobFacilities
from tests.unit.test_executor import ERR, OUT, WAIT, Harness, job

FETCH = "testhide-fetch-j1"
RECORD = EgressRequest(datetime(2030, 1, 2, tzinfo=UTC), "CONNECT", "pypi.org", 443, True, 200, 900, 50_000)


@dataclass
class Lease:
    org: str
    pool: str
    key: str
    volume: str
    hit: bool


@dataclass
class ScriptedCaches:
    hits: set[str] = field(default_factory=set)
    kept: list[str] = field(default_factory=list)
    released: list[tuple[str, bool]] = field(default_factory=list)

    async def acquire(self, org: str, pool: str, key: str) -> Lease:
        return Lease(org, pool, key, f"testhide-cache-{key}", key in self.hits)

    async def keep(self, lease: Lease) -> str:
        self.kept.append(lease.key)
        return ""

    async def release(self, lease: Lease, kept: bool) -> None:
        self.released.append((lease.key, kept))


@dataclass
class ScriptedSession:
    network: str = "testhide-egress-j1"
    closed: bool = False

    def proxy_env(self) -> dict[str, str]:
        return {"HTTPS_PROXY": "http://10.0.0.2:3128", "https_proxy": "http://10.0.0.2:3128"}

    async def finish(self) -> list[EgressRequest]:
        return [RECORD]

    async def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedEgress:
    sessions: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    session: ScriptedSession = field(default_factory=ScriptedSession)

    async def open(self, job_id: str, allow: Any) -> ScriptedSession:
        self.sessions.append((job_id, tuple(allow)))
        return self.session


class StepsHarness(Harness):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.caches = ScriptedCaches()
        self.egress = ScriptedEgress()
        facilities = JobFacilities(self.egress, self.caches, lambda: ("acme", "linux"))  # type: ignore[arg-type]
        self.executor._facilities = facilities


def fetch_job(**changes: Any) -> Any:
    given: dict[str, Any] = {
        "fetch": "pip download -d /cache/wheels -r requirements.lock",
        "egress_allow": ("pypi.org",),
    }
    return job(**(given | changes))


async def test_the_fetch_step_runs_first_offline_but_for_its_proxy_then_the_job_step(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.scripts[FETCH] = Script(output=[(OUT, b"fetched 3 wheels\n")])
    h.runtime.scripts["j1"] = Script(output=[(OUT, b"tests passed\n")])
    await h.run(
        fetch_job(cache="py-1", secret_env={"TOKEN": "job-only"}, fetch_secret_env={"INDEX": "s3cr3t"})
    )

    fetch, step = h.runtime.specs[FETCH], h.runtime.specs["j1"]
    assert fetch.command == ("sh", "-c", "pip download -d /cache/wheels -r requirements.lock")
    assert fetch.network == "testhide-egress-j1"
    assert fetch.env["INDEX"] == "s3cr3t"
    assert fetch.env["HTTPS_PROXY"] == "http://10.0.0.2:3128"
    assert "TOKEN" not in fetch.env  # the job's secrets stay with the job step
    assert (fetch.workspace_name, fetch.workspace_read_only) == ("testhide-ws-j1", True)
    assert fetch.volumes == (VolumeMount("testhide-cache-py-1", "/cache", read_only=False),)
    assert step.network == "none"
    assert (step.workspace_name, step.workspace_read_only) == ("testhide-ws-j1", False)
    assert step.volumes == (VolumeMount("testhide-cache-py-1", "/cache", read_only=True),)
    assert "INDEX" not in step.env

    fetched = [r for r in h.reports if isinstance(r, JobFetched)]
    # As its container started (its facts, checked while it runs), then at its end.
    assert [(f.fetch.running, f.fetch.cache) for f in fetched] == [(True, "miss"), (False, "miss")]
    assert fetched[0].fetch.requests == ()
    assert (fetched[1].fetch.exit_code, fetched[1].fetch.requests) == (0, (RECORD,))
    log = b"".join(data for _, data in h.output())
    assert (
        log.index(b"testhide: fetch step: sh -c")
        < log.index(b"fetched 3 wheels")
        < log.index(b"tests passed")
    )
    assert b"fetch step ended with exit code 0" in log
    assert b"1 request(s) through the egress proxy, 0 refused" in log
    assert h.result() == JobResult("j1", 1, h.result().last_seq, Outcome.EXITED, 0, "")
    assert h.egress.sessions == [("j1", ("pypi.org",))]
    assert h.egress.session.closed
    assert h.caches.kept == ["py-1"]
    assert h.caches.released == [("py-1", True)]
    assert h.runtime.removed_workspaces == []  # the job step's container took it over
    assert h.runtime.started[FETCH].removed
    assert h.runtime.started["j1"].removed


async def test_a_failing_fetch_step_fails_the_job_before_its_job_step(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.scripts[FETCH] = Script(output=[(ERR, b"no such package\n")], exit_code=2)
    await h.run(fetch_job(cache="py-1"))
    result = h.result()
    assert (result.outcome, result.exit_code) == (Outcome.EXITED, 2)
    assert result.reason == "the fetch step failed with exit code 2"
    fetched = [r for r in h.reports if isinstance(r, JobFetched)]
    assert [(f.fetch.cache, f.fetch.exit_code) for f in fetched if not f.fetch.running] == [("miss", 2)]
    assert "j1" not in h.runtime.started  # the job step never ran
    assert h.caches.kept == []
    assert h.caches.released == [("py-1", False)]
    assert h.runtime.removed_workspaces == ["testhide-ws-j1"]
    assert h.egress.session.closed


async def test_a_cache_hit_skips_the_fetch_step(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.caches.hits.add("py-1")
    await h.run(fetch_job(cache="py-1"))
    assert FETCH not in h.runtime.started
    assert h.egress.sessions == []
    fetched = [r for r in h.reports if isinstance(r, JobFetched)]
    assert fetched[0].fetch.cache == "hit"
    assert fetched[0].fetch.requests == ()
    assert h.runtime.specs["j1"].volumes == (VolumeMount("testhide-cache-py-1", "/cache", read_only=True),)
    assert h.runtime.specs["j1"].workspace_name == "testhide-ws-j1"
    assert h.runtime.removed_workspaces == []  # the job step took it over
    assert b"cache py-1 restored on this agent: fetch step skipped" in b"".join(d for _, d in h.output())
    assert h.result().outcome == Outcome.EXITED
    assert h.result().exit_code == 0


async def test_without_a_cache_key_the_cache_is_the_jobs_alone(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    await h.run(fetch_job())
    fetched = [r for r in h.reports if isinstance(r, JobFetched)]
    assert fetched[0].fetch.cache == "none"
    assert h.caches.kept == []
    assert h.caches.released == [("job.j1", False)]


async def test_the_fetch_steps_secrets_are_masked_in_its_output(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.scripts[FETCH] = Script(output=[(OUT, b"token is s3cr3t\n")])
    await h.run(fetch_job(fetch_secret_env={"INDEX": "s3cr3t"}))
    log = b"".join(data for _, data in h.output())
    assert b"s3cr3t" not in log
    assert b"token is " in log


async def test_a_pool_without_egress_refuses_the_fetch_step(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    await h.run(fetch_job(egress_allow=()))
    result = h.result()
    assert result.outcome == Outcome.ERROR
    assert result.reason.startswith("the pool allows no egress, so the fetch step has nowhere to fetch from")
    assert h.runtime.started == {}


async def test_canceling_during_the_fetch_step_ends_the_job_there(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.scripts[FETCH] = Script(hold=True)
    fetching = h.when(lambda r: isinstance(r, JobStarted))
    task = asyncio.create_task(h.executor.run(fetch_job()))
    await asyncio.wait_for(fetching.wait(), WAIT)
    # Whether the fetch container is up yet or not: the cancel stops it, or it stops at once.
    assert h.executor.cancel("j1", "canceled by ada")
    await asyncio.wait_for(task, WAIT)
    assert h.result().outcome == Outcome.CANCELED
    assert "canceled by ada" in h.result().reason
    assert "j1" not in h.runtime.started


async def test_a_service_that_exits_early_fails_the_job_naming_it(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    services = h.runtime.services = FakeServices()
    h.runtime.scripts["j1"] = Script(hold=True)
    started = h.when(lambda r: isinstance(r, JobStarted))
    task = asyncio.create_task(h.executor.run(job(services=(ServiceSpec("db", "postgres:16"),))))
    await asyncio.wait_for(started.wait(), WAIT)
    assert h.runtime.specs["j1"].network == "container:holder"
    services.exit("db", 3)
    await asyncio.wait_for(task, WAIT)
    result = h.result()
    assert result.outcome == Outcome.EXITED
    assert result.exit_code != 0
    assert result.reason == "service db exited early with exit code 3"
    assert services.removed


async def test_a_job_without_services_starts_none(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.services = FakeServices()
    await h.run(job())
    assert h.runtime.specs["j1"].network == "none"
    assert h.runtime.services.names == ()
    assert not h.runtime.services.removed


async def test_the_fetch_report_goes_again_on_a_new_connection(tmp_path: Path) -> None:
    h = StepsHarness(tmp_path)
    h.runtime.scripts["j1"] = Script(hold=True)
    running = h.when(lambda r: isinstance(r, JobStarted) and "j1" in h.runtime.started)
    task = asyncio.create_task(h.executor.run(fetch_job()))
    await asyncio.wait_for(running.wait(), WAIT)
    first = [r for r in h.reports if isinstance(r, JobFetched)]
    h.reports.clear()
    h.outbox.attach(h._send)
    again = [r for r in h.reports if isinstance(r, JobFetched)]
    assert [f.fetch.running for f in first] == [True, False]
    assert again == first[-1:]  # the last word on the step
    assert first[-1].fetch.requests == (RECORD,)
    h.executor.cancel("j1", "done")
    await asyncio.wait_for(task, WAIT)
