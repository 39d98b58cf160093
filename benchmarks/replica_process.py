"""A control-plane replica as operators run it: ``testhide-controlplane
serve`` in a process of its own (so its CPU time and memory are its own), on
ports it picks. It is started through this module's ``main`` so that the
replica benchmarks can set what ``serve`` has no flag for:

- the API's rate limits lifted (one benchmark submitter sends thousands of
  jobs a second as one API key from one address; as ``fleet.UNLIMITED``);
- a cProfile of the event loop's thread from SIGUSR1 to SIGUSR2, so start-up
  and agents connecting stay out of it (``BENCH_PROFILE_FILE``);
- PgCluster's queue announcements off (``BENCH_ANNOUNCE=0``), to measure what
  LISTEN/NOTIFY costs. Without them a job queued through one replica reaches
  another replica's agents only when one of them frees up (or resyncs).

Also here, what the replica benchmarks read from PostgreSQL and the store:
a fresh database, the server's CPU time, and the jobs' and agents' progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import functools
import json
import os
import pstats
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.figures import cpu_seconds, rss_bytes
from benchmarks.fleet import UNLIMITED
from testhide.controlplane.datadir import DATABASE_URL_ENV, DataDir
from tests.harness import REPO

PROFILE_ENV = "BENCH_PROFILE_FILE"
ANNOUNCE_ENV = "BENCH_ANNOUNCE"
JOBS_ENDED = (
    "SELECT count(*) FROM jobs"
    " WHERE status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELED', 'ERROR', 'LOST')"
)


def main() -> None:
    """``python -m benchmarks.replica_process [testhide-controlplane arguments]``."""
    from testhide.controlplane.cli import main as cli
    from testhide.controlplane.cluster import PgCluster
    from testhide.controlplane.commands import serve
    from testhide.controlplane.config import ControlPlaneConfig

    lifted = functools.partial(ControlPlaneConfig, **UNLIMITED)
    serve.ControlPlaneConfig = lifted  # type: ignore[attr-defined,assignment]
    if os.environ.get(ANNOUNCE_ENV) == "0":
        PgCluster.announce_queued = lambda self, org, pool: None  # type: ignore[method-assign]
    profile_file = os.environ.get(PROFILE_ENV)
    if profile_file:
        profiler = cProfile.Profile()

        def dump(*_: object) -> None:
            profiler.disable()
            partial = Path(profile_file + ".tmp")
            profiler.dump_stats(partial)
            partial.replace(profile_file)  # whole, once the parent sees it

        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
        signal.signal(signal.SIGUSR2, dump)
    cli(prog_name="testhide-controlplane")


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    api_target: str
    agent_target: str
    profile_file: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def start_profile(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    async def stop_profile(self, top: int = 10) -> dict[str, list[str]]:
        """The profile since ``start_profile``: its ``top`` functions by
        cumulative and by own time."""
        assert self.profile_file is not None
        self.process.send_signal(signal.SIGUSR2)
        for _ in range(600):
            if self.profile_file.exists():
                break
            await asyncio.sleep(0.05)
        stats = pstats.Stats(str(self.profile_file))
        return {
            "cumulative": _top(stats, "cumulative", top),
            # Under the event loop's own frames: which of our code paths the time went to.
            "cumulative_testhide": _top(stats, "cumulative", top, "/testhide/"),
            "tottime": _top(stats, "tottime", top),
        }


def _top(stats: pstats.Stats, order: str, count: int, within: str = "") -> list[str]:
    stats.sort_stats(order)
    lines = []
    for func in stats.fcn_list:  # type: ignore[attr-defined]
        path, line, name = func
        if within not in path:
            continue
        _, calls, own, cumulative, _ = stats.stats[func]  # type: ignore[attr-defined]
        where = f"{path.split('/testhide/')[-1] if within else Path(path).name}:{line}({name})"
        lines.append(f"{cumulative:.2f}s cum, {own:.2f}s own, {calls} calls: {where if line else name}")
        if len(lines) == count:
            break
    return lines


@asynccontextmanager
async def replica(
    data_dir: Path,
    name: str,
    database_url: str | None = None,
    announce: bool = True,
    profile: bool = False,
) -> AsyncIterator[Replica]:
    """``serve`` on ``data_dir``; ``database_url`` overrides the data dir's
    (to choose the driver); stopped with SIGTERM on exit."""
    ports = data_dir.parent / f"{name}.ports.json"
    log_path = data_dir.parent / f"{name}.log"
    profile_file = data_dir.parent / f"{name}.prof" if profile else None
    env = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, ANNOUNCE_ENV, PROFILE_ENV)}
    if database_url:
        env[DATABASE_URL_ENV] = database_url
    if not announce:
        env[ANNOUNCE_ENV] = "0"
    if profile_file:
        env[PROFILE_ENV] = str(profile_file)
    listen = ("--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0", "--port-file", str(ports))
    with await asyncio.to_thread(log_path.open, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks.replica_process", "--log-level", "warning"),
            *("serve", "--data-dir", str(data_dir), *listen),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        while not ports.exists():  # written once both ports listen
            if process.returncode is not None:
                raise RuntimeError(f"replica {name} exited: {log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        bound = json.loads(ports.read_text())
        yield Replica(
            process, f"127.0.0.1:{bound['api_port']}", f"127.0.0.1:{bound['agent_port']}", profile_file
        )
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


# PostgreSQL and the store, seen from outside ---------------------------------------------


async def new_database(server_url: str, name: str) -> str:
    """The URL of a new, empty database ``name`` on the server at ``server_url``."""
    from tests.pg import with_database

    admin = await asyncpg.connect(server_url, timeout=30)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(server_url, name)


def postgres_cpu_seconds(state_dir: Path) -> float:
    """CPU time of a PostgreSQL cluster (``scripts/postgres`` in ``state_dir``):
    its postmaster, the children alive, and those it has reaped."""
    postmaster = int((state_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile: counted with the postmaster's reaped children
        ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if int(entry.name) == postmaster:
            total += ticks + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        elif int(fields[1]) == postmaster:
            total += ticks
    return total


class Progress:
    """How far a run got, read straight from the store's tables (the control
    planes are other processes): agents that said hello, jobs that ended."""

    def __init__(self, data_dir: Path, database_url: str | None) -> None:
        self._sqlite = DataDir(data_dir).db_path
        self._url = database_url
        self._pg: Any = None

    async def __aenter__(self) -> Progress:
        if self._url:
            self._pg = await asyncpg.connect(self._url, timeout=30)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._pg is not None:
            await self._pg.close()

    async def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self._pg is not None:
            return [tuple(r) for r in await self._pg.fetch(sql)]

        def read() -> list[tuple[Any, ...]]:
            reader = sqlite3.connect(f"file:{self._sqlite}?mode=ro", uri=True, timeout=30)
            with contextlib.closing(reader):
                return reader.execute(sql).fetchall()

        return await asyncio.to_thread(read)

    async def agents_seen(self) -> int:
        return int((await self._rows("SELECT count(*) FROM agents WHERE last_seen_at IS NOT NULL"))[0][0])

    async def jobs_ended(self) -> int:
        return int((await self._rows(JOBS_ENDED))[0][0])

    async def transactions(self) -> tuple[int, int] | None:
        """PostgreSQL's count of (committed, rolled back) transactions in this
        database so far, as its backends last reported them (each at most once
        a second while busy); None on SQLite."""
        if self._pg is None:
            return None
        row = await self._pg.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(row[0]), int(row[1])

    async def job_times(self) -> list[tuple[str, datetime, datetime | None]]:
        """(status, created, finished) of every job, by the control planes' clocks."""
        rows = await self._rows("SELECT status, created_at, finished_at FROM jobs")
        return [(status, _when(created), _when(ended) if ended else None) for status, created, ended in rows]


def _when(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


if __name__ == "__main__":
    main()
