"""The runs behind the replica figures (``replicas.py``): the scheduler
benchmark against ``serve`` processes (``replica_process.py``) on SQLite or on
a PostgreSQL cluster of the run's own, cross-replica pickup, and idle streams
held by one replica or split over two."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks.connections import _client_process
from benchmarks.figures import SPAWN, cpu_seconds, median, percentile, settle_time
from benchmarks.fleet import (
    AgentKeys,
    issue_agents,
    open_stream,
    write_credentials,
)
from benchmarks.pickup import idle_agent
from benchmarks.replica_process import Progress, Replica, new_database, postgres_cpu_seconds, replica
from benchmarks.scheduler import _run_agents, _submit_process, store_lifecycle_rate
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, control_plane
from tests.pg import PrivateCluster, private_cluster

WARMUP = 5


@dataclass(frozen=True)
class Sizes:
    """How big each part of a run is (``replicas.SMOKE`` and ``replicas.FULL``)."""

    agents: int
    agent_processes: int
    jobs: int
    store_alone_jobs: int
    pickups: int
    streams: int
    stream_clients: int
    rounds: int
    """Runs of each setup compared turn about (drivers; announcements on and off)."""
    smoke: bool
    """Settling waits a tenth as long (``figures.settle_time``)."""


@dataclass(frozen=True)
class Setup:
    name: str
    driver: str | None = None
    """None: SQLite."""
    replicas: int = 1
    announce: bool = True
    profile: bool = False

    @property
    def label(self) -> str:
        store = f"PostgreSQL ({self.driver})" if self.driver else "SQLite"
        return f"{store}, {self.replicas} replica{'s' if self.replicas > 1 else ''}"


@asynccontextmanager
async def postgres() -> AsyncIterator[PrivateCluster]:
    """A PostgreSQL cluster of the run's own: its CPU time is the benchmark's alone."""
    try:
        async with private_cluster() as cluster:
            yield cluster
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # tests.pg's unavailable()
        raise RuntimeError(f"the replica benchmarks need a PostgreSQL cluster: {exc}") from exc


def _with_driver(url: str, driver: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}driver={driver}"


@asynccontextmanager
async def _fleet(dirs: list[Path], processes: int) -> AsyncIterator[list[int]]:
    """Simulated agents (real agent daemons, fake runtime) over a few processes; their pids."""
    stop = SPAWN.Event()
    fleet = [
        SPAWN.Process(target=_run_agents, args=(dirs[i::processes], stop), name=f"bench-agents-{i}")
        for i in range(processes)
    ]
    for process in fleet:
        process.start()
    try:
        yield [p.pid for p in fleet if p.pid is not None]
    finally:
        stop.set()
        for process in fleet:
            await asyncio.to_thread(process.join, 60)
            if process.is_alive():
                process.kill()


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.25)


async def _prepared(
    tmp: Path, pg: PrivateCluster | None, name: str, driver: str | None, agents: int
) -> tuple[Path, str | None, list[AgentKeys], tuple[tuple[str, str], ...], bytes]:
    """A new data dir (on PostgreSQL, with a database of its own) and ``agents``
    agents issued: its path, the database's URL (None: SQLite), the agents, an
    admin's bearer token, the CA bundle."""
    database_url = await new_database(pg.url, f"bench_{name}") if pg and driver else None
    async with control_plane(tmp / name, database_url=database_url) as cp:
        keys = await issue_agents(cp, agents)
        return cp.data_dir, database_url, keys, await cp.bearer(), cp.ca_pem


async def throughput(tmp: Path, pg: PrivateCluster | None, setup: Setup, sizes: Sizes) -> dict[str, Any]:
    """One run of the scheduler benchmark against ``setup``'s replicas."""
    data_dir, database_url, keys, bearer, ca_pem = await _prepared(
        tmp, pg, setup.name, setup.driver, sizes.agents
    )
    serve_url = _with_driver(database_url, setup.driver) if database_url and setup.driver else None
    count = sizes.jobs // 2 if setup.profile else sizes.jobs
    async with AsyncExitStack() as stack:
        progress = await stack.enter_async_context(Progress(data_dir, database_url))
        replicas: list[Replica] = [
            await stack.enter_async_context(
                replica(data_dir, f"r{i}", serve_url, setup.announce, setup.profile and i == 0)
            )
            for i in range(setup.replicas)
        ]
        agents_dir = data_dir.parent / "agents"
        dirs = [
            write_credentials(k, r.api_target, r.agent_target, ca_pem, agents_dir / k.agent_id)
            for k, r in zip(keys, itertools.cycle(replicas), strict=False)
        ]
        start, out = SPAWN.Event(), SPAWN.Queue()
        targets = tuple(r.api_target for r in replicas)
        submitter = SPAWN.Process(
            target=_submit_process, name="bench-submit", args=((targets, ca_pem, bearer, count), start, out)
        )
        submitter.start()  # it imports while the agents connect, then waits for the start
        stack.callback(_kill_if_alive, submitter)
        started = time.monotonic()
        agent_pids = await stack.enter_async_context(_fleet(dirs, sizes.agent_processes))
        await _until(lambda: _equals(progress.agents_seen(), len(keys)), 300, "agents did not all connect")
        connected_s = time.monotonic() - started
        await asyncio.sleep(
            settle_time(1.0, sizes.smoke)
        )  # the last hellos are attached (the store hears of them first)
        cpu_now = _cpu_meter(replicas, agent_pids, submitter.pid, pg)
        cpu_before, transactions_before = cpu_now(), await progress.transactions()
        for r in replicas[:1] if setup.profile else []:
            r.start_profile()
        start.set()
        submitted = await asyncio.to_thread(out.get, True, 900)
        await _until(lambda: _at_least(progress.jobs_ended(), count), 900, "jobs did not all end")
        cpu = {role: round(v - cpu_before[role], 2) for role, v in cpu_now().items()}
        profile = await replicas[0].stop_profile() if setup.profile else None
        await asyncio.to_thread(submitter.join, 60)
        times = await progress.job_times()
        await asyncio.sleep(settle_time(1.5, sizes.smoke))  # the backends report their last transactions
        transactions = _difference(transactions_before, await progress.transactions())
    summary = _summary(setup, sizes, count, times, submitted, cpu, connected_s, profile)
    if transactions is not None:
        # Agents' heartbeats included: 1,000 agents send 50 a second (about 0.2 a job here).
        summary["postgresql_per_job"] = {k: round(v / count, 2) for k, v in transactions.items()}
    return summary


def _difference(before: tuple[int, int] | None, after: tuple[int, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {"commits": after[0] - before[0], "rollbacks": after[1] - before[1]}


def _kill_if_alive(process: Any) -> None:
    if process.is_alive():
        process.kill()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _at_least(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected


def _cpu_meter(
    replicas: list[Replica], agents: list[int], submitter: int | None, pg: PrivateCluster | None
) -> Callable[[], dict[str, float]]:
    def now() -> dict[str, float]:
        cpu = {f"replica_{chr(ord('a') + i)}": r.cpu_seconds() for i, r in enumerate(replicas)}
        cpu["agents"] = sum(cpu_seconds(pid) for pid in agents)
        cpu["submitter"] = cpu_seconds(submitter)
        if pg is not None:
            cpu["postgresql"] = postgres_cpu_seconds(pg.state_dir)
        return cpu

    return now


def _summary(
    setup: Setup,
    sizes: Sizes,
    count: int,
    times: list[Any],
    submitted: list[tuple[str, float, float]],
    cpu: dict[str, float],
    connected_s: float,
    profile: dict[str, list[str]] | None,
) -> dict[str, Any]:
    failed = [status for status, _, _ in times if status != "SUCCEEDED"]
    if len(times) != count or failed:
        raise RuntimeError(f"{setup.name}: {len(times)} jobs, {len(failed)} did not succeed: {failed[:5]}")
    first = min(created for _, created, _ in times)
    last = max(ended for _, _, ended in times)
    latencies = [(ended - created).total_seconds() for _, created, ended in times]
    submit_span = max(r for _, _, r in submitted) - min(s for _, s, _ in submitted)
    summary: dict[str, Any] = {
        "setup": setup.label,
        "agents": sizes.agents,
        "jobs": count,
        "agents_connected_s": round(connected_s, 1),
        "jobs_per_s": round(count / (last - first).total_seconds(), 1),
        "submitted_per_s": round(count / submit_span, 1),
        "submit_to_completion_p50_ms": round(median(latencies) * 1000, 1),
        "submit_to_completion_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "cpu_seconds": cpu,
        "cpu_ms_per_job": {role: round(v * 1000 / count, 2) for role, v in cpu.items()},
    }
    if profile is not None:
        summary["profile_replica_a"] = profile
    return summary


async def store_alone(tmp: Path, pg: PrivateCluster, count: int, round_: int) -> dict[str, float]:
    rates = {"sqlite": await store_lifecycle_rate(tmp, count)}
    for driver in ("asyncpg", "psycopg"):
        url = await new_database(pg.url, f"bench_alone_{driver}_{round_}")
        rates[driver] = await store_lifecycle_rate(tmp, count, _with_driver(url, driver))
    return rates


# cross-replica pickup ---------------------------------------------------------------------


async def _pickup_probe(
    through: dict[str, str],
    agent_target: str,
    ca_pem: bytes,
    bearer: tuple[tuple[str, str], ...],
    keys: AgentKeys,
    count: int,
) -> dict[str, list[float]]:
    """Pickup times (s) of jobs submitted through each named API target, turn
    about, to one idle agent (as ``pickup._probe``; one process, one clock)."""
    agent_channel, call = await open_stream(agent_target, ca_pem, keys)
    arrivals, acks, reader = idle_agent(call)
    spec = jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], pool="default")
    credentials = grpc.ssl_channel_credentials(ca_pem)
    channels = {name: grpc.aio.secure_channel(target, credentials) for name, target in through.items()}
    stubs = {name: jobs_pb2_grpc.JobsStub(channel) for name, channel in channels.items()}
    pickups: dict[str, list[float]] = {name: [] for name in through}
    order = list(through)
    for i in range(WARMUP + count):
        for name in order if i % 2 == 0 else order[::-1]:
            request = jobs_pb2.SubmitJobRequest(spec=spec)
            response = await stubs[name].Submit(request, metadata=bearer, timeout=30)
            returned = time.monotonic()
            job_id, arrived = await asyncio.wait_for(arrivals.get(), 30)
            assert job_id == response.job.id, (job_id, response.job.id)
            assert await asyncio.wait_for(acks.get(), 30) == job_id  # the agent is idle again
            if i >= WARMUP:
                pickups[name].append(arrived - returned)
    reader.cancel()
    call.cancel()
    for channel in [agent_channel, *channels.values()]:
        await channel.close()
    return pickups


def _pickup_process(args: tuple[Any, ...], out: Any) -> None:
    out.put(asyncio.run(_pickup_probe(*args)))


async def cross_replica_pickup(tmp: Path, pg: PrivateCluster, count: int) -> dict[str, list[float]]:
    data_dir, _, keys, bearer, ca_pem = await _prepared(tmp, pg, "pickup", "asyncpg", 1)
    async with replica(data_dir, "a") as a, replica(data_dir, "b") as b:
        out = SPAWN.Queue()
        through = {"cross": a.api_target, "same": b.api_target}
        process = SPAWN.Process(
            target=_pickup_process,
            name="bench-pickup",
            args=((through, b.agent_target, ca_pem, bearer, keys[0], count), out),
        )
        process.start()
        result: dict[str, list[float]] = await asyncio.to_thread(out.get, True, 600)
        await asyncio.to_thread(process.join, 30)
    return result


# idle streams -----------------------------------------------------------------------------


async def _held_streams(
    replicas: list[Replica], agents: list[AgentKeys], ca_pem: bytes, clients: int, smoke: bool
) -> dict[str, Any]:
    """Every agent's stream open, client ``i`` on replica ``i mod n``: the
    replicas' RSS once settled, with their RSS before."""
    idle = [r.rss() for r in replicas]
    connected, stop = SPAWN.Queue(), SPAWN.Event()
    processes = [
        SPAWN.Process(
            target=_client_process,
            name=f"bench-streams-{i}",
            args=(replicas[i % len(replicas)].agent_target, ca_pem, agents[i::clients], connected, stop),
        )
        for i in range(clients)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    try:
        reports = [await asyncio.to_thread(connected.get, True, 900) for _ in processes]
        connect_s = time.monotonic() - started
        await asyncio.sleep(settle_time(5.0, smoke))  # settle: first heartbeats, freed handshake buffers
        loaded = [r.rss() for r in replicas]
    finally:
        stop.set()
        for process in processes:
            await asyncio.to_thread(process.join, 120)
            if process.is_alive():
                process.kill()
    # A client reports once every one of its streams was accepted (or dies and never does).
    n = len(replicas)
    planned = [sum(len(agents[i::clients]) for i in range(j, clients, n)) for j in range(n)]
    return {
        "idle": idle,
        "loaded": loaded,
        "streams": planned,
        "held": sum(n for n, _ in reports),
        "connect_s": round(connect_s, 1),
    }


async def split_streams(tmp: Path, pg: PrivateCluster, sizes: Sizes) -> dict[str, dict[str, Any]]:
    data_dir, _, agents, _, ca_pem = await _prepared(tmp, pg, "streams", "asyncpg", sizes.streams)
    async with replica(data_dir, "single") as single:
        await asyncio.sleep(settle_time(2.0, sizes.smoke))  # settle: the first rounds of the background tasks
        one = await _held_streams([single], agents, ca_pem, sizes.stream_clients, sizes.smoke)
    async with replica(data_dir, "a") as a, replica(data_dir, "b") as b:
        await asyncio.sleep(settle_time(2.0, sizes.smoke))
        two = await _held_streams([a, b], agents, ca_pem, sizes.stream_clients, sizes.smoke)
    return {"one": one, "two": two}
