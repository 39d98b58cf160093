"""Scheduler throughput: many simulated agents (the real agent daemon with
the fake runtime, whose containers finish at once, each agent on its own
mutual-TLS connection, from a few processes) and a stream of jobs submitted
through the API. Jobs per second dispatched and completed, and the latency
from submission to completion. The baseline is the store alone: the same job
life cycle (create, assign, running, succeeded) straight on SQLite."""

from __future__ import annotations

import asyncio
import cProfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from benchmarks.figures import SPAWN, Figure, cpu_seconds, median, percentile, raise_fd_limit
from benchmarks.fleet import UNLIMITED, issue_agents, save_credentials
from testhide.controlplane.errors import ControlPlaneError
from testhide.controlplane.jobs.model import Job, JobReport, JobSpec, JobStatus, new_job_id
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, RunningControlPlane, control_plane

GOAL = 1000.0
SUBMITTERS = 64


def _run_agents(data_dirs: list[Path], stop: Any, signed: bool = True) -> None:
    from testhide.agent import executor
    from testhide.agent.config import AgentConfig
    from testhide.agent.daemon import Agent
    from testhide.agent.runtime.fake import FakeRuntime
    from testhide.common.logging import configure

    configure("warning")
    if not signed:  # this process's agents make no signer: their results carry no statement
        setattr(executor, "StatementSigner", lambda credentials: None)  # noqa: B010
    raise_fd_limit()

    async def main() -> None:
        agents = [Agent(AgentConfig(data_dir=d), FakeRuntime()) for d in data_dirs]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        await asyncio.to_thread(stop.wait)
        for agent in agents:
            agent.shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def _submit(
    api_targets: tuple[str, ...], ca_pem: bytes, bearer: tuple[tuple[str, str], ...], count: int
) -> list[tuple[str, float, float]]:
    """``count`` jobs from ``SUBMITTERS`` concurrent callers, spread evenly over
    the API targets (replicas)."""
    spec = jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], pool="default")
    submitted: list[tuple[str, float, float]] = []
    remaining = iter(range(count))
    credentials = grpc.ssl_channel_credentials(ca_pem)
    channels = [grpc.aio.secure_channel(target, credentials) for target in api_targets]
    try:
        stubs = [jobs_pb2_grpc.JobsStub(channel) for channel in channels]

        async def submitter(jobs: jobs_pb2_grpc.JobsAsyncStub) -> None:
            for _ in remaining:
                started = time.monotonic()
                response = await jobs.Submit(
                    jobs_pb2.SubmitJobRequest(spec=spec), metadata=bearer, timeout=120
                )
                submitted.append((response.job.id, started, time.monotonic()))

        await asyncio.gather(*(submitter(stubs[i % len(stubs)]) for i in range(SUBMITTERS)))
    finally:
        for channel in channels:
            await channel.close()
    return submitted


def _submit_process(args: tuple[Any, ...], start: Any, out: Any) -> None:
    start.wait()
    out.put(asyncio.run(_submit(*args)))


def _record_times(cp: RunningControlPlane) -> tuple[dict[str, float], dict[str, float]]:
    """Wrap this store instance (the benchmark's, not production code) to
    note when each job was assigned and when it ended."""
    store = cp.daemon._store
    assert store is not None
    assigned: dict[str, float] = {}
    ended: dict[str, float] = {}
    assign_jobs: Callable[..., Awaitable[list[Job | None]]] = store.assign_jobs
    report_jobs: Callable[..., Awaitable[list[tuple[Job, bool] | ControlPlaneError]]] = store.report_jobs

    async def timed_assign(
        org: str, pairs: Sequence[tuple[str, str]], now: datetime, lease_until: datetime
    ) -> list[Job | None]:
        jobs = await assign_jobs(org, pairs, now, lease_until)
        assigned.update((job.id, time.monotonic()) for job in jobs if job is not None)
        return jobs

    async def timed_reports(
        reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        outcomes = await report_jobs(reports, now)
        for report, outcome in zip(reports, outcomes, strict=True):
            if isinstance(outcome, tuple) and outcome[1] and report.status.terminal:
                ended[report.job_id] = time.monotonic()
        return outcomes

    store.assign_jobs = timed_assign  # type: ignore[method-assign]
    store.report_jobs = timed_reports  # type: ignore[method-assign]
    return assigned, ended


async def store_lifecycle_rate(directory: Path, count: int, database_url: str | None = None) -> float:
    """Jobs per second through the store alone, one after another: SQLite in
    ``directory``, or PostgreSQL in the empty database at ``database_url``."""
    store: Store = await (
        PgStore.open(database_url)
        if database_url
        else SqliteStore.open(directory / f"baseline-{time.monotonic_ns()}.db")
    )
    spec = JobSpec(image=JOB_IMAGE, command=("true",))
    try:
        await store.create_org("default", datetime.now(UTC))
        await store.create_pool("default", "default", datetime.now(UTC))
        started = time.monotonic()
        for _ in range(count):
            now = datetime.now(UTC)
            job = Job(id=new_job_id(), org="default", spec=spec, status=JobStatus.QUEUED, created_at=now)
            await store.create_job(job, b"k" * 40)
            assigned = await store.assign_job("default", job.id, "a1", now, now + timedelta(minutes=1))
            assert assigned is not None
            await store.report_job("default", job.id, "a1", assigned.epoch, JobStatus.RUNNING, now)
            await store.report_job(
                "default", job.id, "a1", assigned.epoch, JobStatus.SUCCEEDED, now, "", 0, last_seq=0
            )
        return count / (time.monotonic() - started)
    finally:
        await store.close()


async def _wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


@dataclass
class _FleetRun:
    submitted: list[tuple[str, float, float]]
    assigned: dict[str, float]
    ended: dict[str, float]
    cpu: dict[str, float]
    """CPU seconds per role while the jobs ran."""
    connected_s: float


async def _fleet_run(
    tmp: Path, agents: int, workers: int, count: int, signed: bool, profile: Path | None = None
) -> _FleetRun:
    """``count`` jobs through a fresh control plane and ``agents`` agents in ``workers``
    processes; ``signed`` False: the agents sign no statement (the jobs as they ran before
    statements: nothing for the control plane to check, countersign or keep)."""
    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    async with control_plane(tmp, **UNLIMITED) as cp:
        scheduler = cp.daemon.scheduler
        assert scheduler is not None
        issued = await issue_agents(cp, agents)
        dirs = [save_credentials(cp, keys, tmp / "agents" / keys.agent_id) for keys in issued]
        stop = SPAWN.Event()
        fleet = [
            SPAWN.Process(target=_run_agents, args=(dirs[i::workers], stop, signed), name=f"bench-agents-{i}")
            for i in range(workers)
        ]
        for process in fleet:
            process.start()
        connect_started = time.monotonic()
        await _wait_for(lambda: len(scheduler.sessions()) == agents, 300, "agents did not all connect")
        connected_s = time.monotonic() - connect_started
        assigned, ended = _record_times(cp)
        start, out = SPAWN.Event(), SPAWN.Queue()
        submitter = SPAWN.Process(
            target=_submit_process,
            name="bench-submit",
            args=(((cp.api_target,), cp.ca_pem, await cp.bearer(), count), start, out),
        )
        submitter.start()
        await asyncio.sleep(1.0)  # let the submitter import and reach the start line
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        roles: dict[str, list[int | None]] = {
            "control_plane": [None],
            "agents": [p.pid for p in fleet],
            "submitter": [submitter.pid],
        }
        cpu_before = {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in roles.items()}
        start.set()
        submitted = await asyncio.to_thread(out.get, True, 900)
        await _wait_for(lambda: len(ended) >= count, 900, "jobs did not all complete")
        cpu = {
            role: round(sum(cpu_seconds(pid) for pid in pids) - cpu_before[role], 2)
            for role, pids in roles.items()
        }
        if profiler and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        stop.set()
        for process in [submitter, *fleet]:
            await asyncio.to_thread(process.join, 60)
    return _FleetRun(submitted, assigned, ended, cpu, connected_s)


def _per_job_ms(cpu: dict[str, float], count: int) -> dict[str, float]:
    return {role: round(v * 1000 / count, 2) for role, v in cpu.items()}


async def measure(smoke: bool, profile: Path | None = None) -> list[Figure]:
    agents, workers, count = (10, 2, 50) if smoke else (1000, 4, 5000)
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        baselines = [await store_lifecycle_rate(Path(tmp), count // 2)]
        run = await _fleet_run(Path(tmp) / "signed", agents, workers, count, True, profile)
        unsigned = await _fleet_run(Path(tmp) / "unsigned", agents, workers, count, False)
        baselines.append(await store_lifecycle_rate(Path(tmp), count // 2))
    submitted, assigned, ended, cpu = run.submitted, run.assigned, run.ended, run.cpu
    first = min(s for _, s, _ in submitted)
    latencies = [ended[job_id] - returned for job_id, _, returned in submitted]
    completed = count / (max(ended.values()) - first)
    dispatched = count / (max(assigned.values()) - min(assigned.values()))
    submit_rate = count / (max(r for _, _, r in submitted) - first)
    baseline = median(baselines)
    throughput = Figure(
        name="scheduler_throughput",
        title="Scheduler throughput",
        value=round(completed, 1),
        unit="jobs/s",
        baseline=round(baseline, 1),
        baseline_unit="jobs/s",
        baseline_what="the store alone: create, assign, running, succeeded per job on SQLite",
        ratio=round(completed / baseline, 3),
        goal=f">= {GOAL:g} jobs/s completed",
        met=completed >= GOAL,
        details={
            "agents": agents,
            "agent_processes": workers,
            "jobs": count,
            "concurrent_submitters": SUBMITTERS,
            "agents_connected_s": round(run.connected_s, 2),
            "submitted_per_s": round(submit_rate, 1),
            "dispatched_per_s": round(dispatched, 1),
            "completed_per_s": round(completed, 1),
            "submit_to_completion_p50_ms": round(median(latencies) * 1000, 1),
            "submit_to_completion_p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "store_alone_jobs_per_s": [round(b, 1) for b in baselines],
            "cpu_seconds": cpu,
            "cpu_ms_per_job": _per_job_ms(cpu, count),
            # Issue target: >= 1,000 (<= 1.0 ms of control-plane CPU a job).
            "control_plane_jobs_per_cpu_s": round(count / cpu["control_plane"], 1)
            if cpu["control_plane"]
            else None,
        },
    )
    return [throughput, _statement_cost(run, unsigned, count)]


def _statement_cost(signed: _FleetRun, unsigned: _FleetRun, count: int) -> Figure:
    """What signed statements add to a job: the CPU of the control plane (check, countersign,
    keep) and of the agents (sign), against the same jobs without them, same run."""
    with_ms, without_ms = _per_job_ms(signed.cpu, count), _per_job_ms(unsigned.cpu, count)
    mine = ("control_plane", "agents")
    added = {role: round(with_ms[role] - without_ms[role], 2) for role in mine}
    total_with = sum(with_ms[role] for role in mine)
    total_without = sum(without_ms[role] for role in mine)
    unsigned_completed = count / (max(unsigned.ended.values()) - min(s for _, s, _ in unsigned.submitted))
    return Figure(
        name="statement_cost",
        title="Signed statements: CPU a job, control plane and agent",
        value=round(total_with, 2),
        unit="ms/job",
        baseline=round(total_without, 2),
        baseline_unit="ms/job",
        baseline_what="the same jobs from agents that sign no statement (nothing to check or countersign)",
        ratio=round(total_with / total_without, 3),
        goal="reported (issue 18: the added time per job, signing and checking)",
        met=None,
        details={
            "jobs": count,
            "cpu_ms_per_job_signed": with_ms,
            "cpu_ms_per_job_unsigned": without_ms,
            "added_cpu_ms_per_job": added,
            "completed_per_s_unsigned": round(unsigned_completed, 1),
        },
    )
