"""Control-plane replicas: several ``serve`` processes on one PostgreSQL
database (a private cluster started for the run), against one on SQLite.

- Scheduler throughput and CPU per job, the simulated agent fleet of
  ``scheduler.py`` split evenly over the replicas and submissions too: SQLite,
  PostgreSQL through asyncpg and through psycopg 3 with one replica (the two
  drivers turn about), asyncpg with two. CPU is each process's own
  (``/proc``), PostgreSQL's the sum of its server processes. One more run
  (half the jobs, not a figure) profiles a replica's event loop. Baselines:
  the store alone (``scheduler.store_lifecycle_rate``) on SQLite and on
  PostgreSQL; for psycopg and for two replicas, asyncpg with one replica.
- What the queue announcements (LISTEN/NOTIFY) cost: two replicas with them
  and without, turn about.
- Cross-replica pickup: the idle agent on replica B, jobs submitted through A,
  against submissions through B itself, turn about.
- Idle agent streams split over two replicas against one replica holding all.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.figures import Figure, median, percentile, raise_fd_limit
from benchmarks.replica_runs import (
    Setup,
    Sizes,
    cross_replica_pickup,
    postgres,
    split_streams,
    store_alone,
    throughput,
)
from tests.pg import PrivateCluster

PICKUP_GOAL_MS = 50.0
MIB = 1 << 20

SMOKE = Sizes(10, 2, 40, 40, 5, 40, 2, 1, smoke=True)
FULL = Sizes(1000, 4, 4000, 1000, 200, 10_000, 6, 2, smoke=False)


async def measure(smoke: bool) -> list[Figure]:
    sizes = SMOKE if smoke else FULL
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        async with postgres() as pg:
            alone = [await store_alone(tmp, pg, sizes.store_alone_jobs, 0)]
            sqlite = await throughput(tmp, None, Setup("sqlite_1"), sizes)
            asyncpg, psycopg = await _turn_about(
                tmp, pg, Setup("asyncpg_1", "asyncpg"), Setup("psycopg_1", "psycopg"), sizes
            )
            loud, quiet = await _turn_about(
                tmp,
                pg,
                Setup("asyncpg_2", "asyncpg", replicas=2),
                Setup("asyncpg_2_quiet", "asyncpg", replicas=2, announce=False),
                sizes,
            )
            profiled = await throughput(tmp, pg, Setup("asyncpg_1_profiled", "asyncpg", profile=True), sizes)
            alone.append(await store_alone(tmp, pg, sizes.store_alone_jobs, 1))
            pickups = await cross_replica_pickup(tmp, pg, sizes.pickups)
            streams = await split_streams(tmp, pg, sizes)
    rates = {store: [round(a[store], 1) for a in alone] for store in alone[0]}
    runs = {"sqlite": sqlite, "asyncpg": _medians(asyncpg), "psycopg": _medians(psycopg)}
    runs["two"] = _medians(loud)
    return [
        *_throughput_figures(runs, rates, profiled),
        _notify_figure(runs["two"], _medians(quiet)),
        _pickup_figure(pickups),
        _streams_figure(streams, sizes.streams),
    ]


async def _turn_about(
    tmp: Path, pg: PrivateCluster, first: Setup, second: Setup, sizes: Sizes
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``sizes.rounds`` runs of each setup, in the order A B B A A B ...: a
    machine that grows busier or quieter meanwhile moves both alike."""
    runs: dict[str, list[dict[str, Any]]] = {first.name: [], second.name: []}
    for i in range(sizes.rounds):
        for setup in (first, second) if i % 2 == 0 else (second, first):
            run = await throughput(tmp, pg, replace(setup, name=f"{setup.name}_{i}"), sizes)
            runs[setup.name].append(run)
    return runs[first.name], runs[second.name]


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one setup as one: the median of every number (per
    process for CPU), and each run's jobs/s."""
    merged: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            middle = median([r[key] for r in runs])
            merged[key] = int(middle) if isinstance(value, int) else round(middle, 2)
        elif key.startswith(("cpu_", "postgresql_")):
            merged[key] = {role: round(median([r[key][role] for r in runs]), 2) for role in value}
        else:
            merged[key] = value
    return {**merged, "runs": len(runs), "jobs_per_s_each_run": [r["jobs_per_s"] for r in runs]}


def _throughput_figure(
    name: str, run: dict[str, Any], baseline: float, baseline_what: str, **details: Any
) -> Figure:
    value = run["jobs_per_s"]
    return Figure(
        name=name,
        title=f"Scheduler throughput, {run['setup']}",
        value=value,
        unit="jobs/s",
        baseline=round(baseline, 1),
        baseline_unit="jobs/s",
        baseline_what=baseline_what,
        ratio=round(value / baseline, 3),
        goal="none set (reported)",
        met=None,
        details={**run, **details},
    )


def _throughput_figures(
    runs: dict[str, dict[str, Any]], rates: dict[str, list[float]], profiled: dict[str, Any]
) -> list[Figure]:
    alone = {store: median(values) for store, values in rates.items()}
    what = "the store alone: create, assign, running, succeeded per job, one after another"
    one_replica = runs["asyncpg"]["jobs_per_s"]
    same_run = "PostgreSQL (asyncpg), 1 replica, in the same run"
    return [
        _throughput_figure(
            "replicas_throughput_sqlite",
            runs["sqlite"],
            alone["sqlite"],
            f"{what}, on SQLite",
            store_alone_jobs_per_s=rates["sqlite"],
        ),
        _throughput_figure(
            "replicas_throughput_asyncpg",
            runs["asyncpg"],
            alone["asyncpg"],
            f"{what}, on PostgreSQL through asyncpg",
            store_alone_jobs_per_s=rates["asyncpg"],
            profiled_run={k: v for k, v in profiled.items() if k != "setup"},
        ),
        _throughput_figure(
            "replicas_throughput_psycopg",
            runs["psycopg"],
            one_replica,
            same_run,
            store_alone_jobs_per_s=rates["psycopg"],
            store_alone_asyncpg_jobs_per_s=rates["asyncpg"],
        ),
        _throughput_figure(
            "replicas_throughput_two",
            runs["two"],
            one_replica,
            same_run,
            store_alone_jobs_per_s=rates["asyncpg"],
        ),
    ]


def _notify_figure(loud: dict[str, Any], quiet: dict[str, Any]) -> Figure:
    value, baseline = loud["jobs_per_s"], quiet["jobs_per_s"]
    return Figure(
        name="replicas_notify_cost",
        title="Scheduler throughput, 2 PostgreSQL replicas, queue announcements (LISTEN/NOTIFY) on",
        value=value,
        unit="jobs/s",
        baseline=baseline,
        baseline_unit="jobs/s",
        baseline_what="the same, announcements off (jobs reach the other replica's agents as they free up)",
        ratio=round(value / baseline, 3),
        goal="none set (reported)",
        met=None,
        details={
            "runs_each": loud["runs"],
            "jobs_per_s_on": loud["jobs_per_s_each_run"],
            "jobs_per_s_off": quiet["jobs_per_s_each_run"],
            "cpu_ms_per_job_on": loud["cpu_ms_per_job"],
            "cpu_ms_per_job_off": quiet["cpu_ms_per_job"],
            "postgresql_per_job_on": loud["postgresql_per_job"],
            "postgresql_per_job_off": quiet["postgresql_per_job"],
            "submit_to_completion_p50_ms_on": loud["submit_to_completion_p50_ms"],
            "submit_to_completion_p50_ms_off": quiet["submit_to_completion_p50_ms"],
        },
    )


def _pickup_figure(pickups: dict[str, list[float]]) -> Figure:
    cross = [s * 1000 for s in pickups["cross"]]
    same = [s * 1000 for s in pickups["same"]]
    p50, baseline = median(cross), median(same)
    return Figure(
        name="replicas_pickup",
        title="Cross-replica pickup (p50): submitted through replica A, idle agent on B",
        value=round(p50, 2),
        unit="ms",
        baseline=round(baseline, 2),
        baseline_unit="ms",
        baseline_what="submitted through replica B itself, turn about, p50",
        ratio=round(p50 / baseline, 2),
        goal=f"p50 < {PICKUP_GOAL_MS:g} ms",
        met=p50 < PICKUP_GOAL_MS,
        details={
            "jobs_each_way": len(cross),
            "cross_p50_ms": round(p50, 2),
            "cross_p99_ms": round(percentile(cross, 99), 2),
            "cross_max_ms": round(max(cross), 2),
            "same_p50_ms": round(baseline, 2),
            "same_p99_ms": round(percentile(same, 99), 2),
            "same_max_ms": round(max(same), 2),
        },
    )


def _streams_figure(streams: dict[str, dict[str, Any]], count: int) -> Figure:
    one, two = streams["one"], streams["two"]
    for layout in (one, two):
        if layout["held"] != count:
            raise RuntimeError(f"{layout['held']} of {count} streams held")
    value, baseline = max(two["loaded"]), one["loaded"][0]

    def per_stream_kib(layout: dict[str, Any]) -> list[float]:
        pairs = zip(layout["loaded"], layout["idle"], layout["streams"], strict=True)
        return [round((loaded - idle) / n / 1024, 1) for loaded, idle, n in pairs]

    return Figure(
        name="replicas_streams_memory",
        title=f"Replica memory, {count:,} idle agent streams over 2 replicas (largest)",
        value=round(value / MIB, 1),
        unit="MiB",
        baseline=round(baseline / MIB, 1),
        baseline_unit="MiB",
        baseline_what=f"one replica holding all {count:,}, same database, same run",
        ratio=round(value / baseline, 2),
        goal="none set (reported)",
        met=None,
        details={
            "streams_per_replica": two["streams"],
            "rss_mib_per_replica": [round(r / MIB, 1) for r in two["loaded"]],
            "idle_rss_mib_per_replica": [round(r / MIB, 1) for r in two["idle"]],
            "per_stream_kib_per_replica": per_stream_kib(two),
            "all_connected_s": two["connect_s"],
            "one_replica_idle_rss_mib": round(one["idle"][0] / MIB, 1),
            "one_replica_per_stream_kib": per_stream_kib(one)[0],
            "one_replica_all_connected_s": one["connect_s"],
        },
    )
