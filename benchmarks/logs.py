"""Log throughput: jobs print numbered lines; the rate at which they reach
``testhide logs --follow`` clients (first byte to last), against the rate at
which Python reads the same containers' output from Docker's attach socket in
large blocks. Every log must be byte-identical to what its job printed.

Two figures: one job alone (``log_throughput``), and eight jobs at once on one
agent with ``max_jobs`` 8, each followed by its own ``testhide logs --follow``
process (``log_throughput_eight``; its baseline is eight attach readers, one
thread each, reading eight such containers at the same time). The eight jobs
start writing at one agreed wall-clock moment (the containers share the host's
clock), so that the time it takes to submit and start them does not enter:
the aggregate rate is all bytes over the span from the first byte any reader
got to the last byte any reader got."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import docker
from docker.types import LogConfig
from docker.utils.socket import read as socket_read

from benchmarks.figures import Figure, alternate, cpu_seconds, median
from benchmarks.fleet import agent_process
from testhide.agent.runtime.attach import Demuxer
from tests.harness import Cli, control_plane

GOAL = 0.8
IMAGE = "testhide/python:1"
LINE = 10  # b"%09d\n"
READ_BLOCK = 1 << 20
JOBS = 8
MB = 1e6


def generator(lines: int, delay_s: float = 0.0, start_at: float = 0.0) -> list[str]:
    """The job: after ``delay_s`` (time for the follower to attach) or at the
    wall-clock time ``start_at``, ``lines`` numbered lines written in large blocks."""
    program = (
        f"import sys, time\ntime.sleep(max({delay_s}, {start_at} - time.time()))\n"
        "w = sys.stdout.buffer.write\n"
        f"for k in range(0, {lines}, 100000):\n"
        f"    w(b''.join(b'%09d\\n' % i for i in range(k, min({lines}, k + 100000))))\n"
    )
    return ["python3", "-c", program]


def expected_sha256(lines: int) -> str:
    digest = hashlib.sha256()
    for k in range(0, lines, 100000):
        digest.update(b"".join(b"%09d\n" % i for i in range(k, min(lines, k + 100000))))
    return digest.hexdigest()


class Received:
    """Bytes counted and hashed as they arrive, timed from the first to the last."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.first = 0.0
        self.last = 0.0
        self.started_at = 0.0
        """Wall-clock time the reader's container (or follower process) had started by."""

    def add(self, data: bytes) -> None:
        if data:
            now = time.monotonic()
            if not self.size:
                self.first = now
            self.size += len(data)
            self.digest.update(data)
            self.last = now

    @property
    def rate(self) -> float:
        return self.size / max(self.last - self.first, 1e-9)


def aggregate_rate(received: list[Received]) -> float:
    """All bytes over the span from the first byte any reader got to the last."""
    span = max(r.last for r in received) - min(r.first for r in received)
    return sum(r.size for r in received) / max(span, 1e-9)


def read_attach_socket(command: list[str]) -> Received:
    """The baseline: a container like the job's (no Docker log, as the agent
    sets up), its output read in 1 MiB blocks."""
    client = docker.from_env()
    container = client.containers.create(
        IMAGE,
        command,
        network_mode="none",
        user="65534:65534",
        read_only=True,
        cap_drop=["ALL"],
        log_config=LogConfig(type="none"),
    )
    received = Received()
    try:
        assert container.id is not None  # a created container has one
        sock = client.api.attach_socket(container.id, {"stdout": 1, "stderr": 1, "stream": 1})
        container.start()
        received.started_at = time.time()
        demuxer = Demuxer()
        while data := socket_read(sock, READ_BLOCK):
            for _, chunk in demuxer.feed(data):
                received.add(chunk)
        sock.close()
        container.wait()
    finally:
        container.remove(force=True)
        client.close()
    return received


async def submit(cli: Cli, command: list[str]) -> str:
    submitted = await cli("run", "--detach", "--no-workspace", "--image", IMAGE, "--", *command)
    assert submitted.returncode == 0, submitted.stderr.decode()
    return submitted.stdout.decode().strip()


async def follow(cli: Cli, job_id: str) -> Received:
    """``testhide logs --follow JOB`` in its own process, its stdout read in 1 MiB blocks."""
    process = await cli.start("logs", "--follow", job_id)
    assert process.stdout is not None
    assert process.stderr is not None
    received = Received()
    received.started_at = time.time()
    while data := await process.stdout.read(READ_BLOCK):
        received.add(data)
    err = await process.stderr.read()
    if await process.wait() != 0:
        raise RuntimeError(f"testhide logs --follow exited {process.returncode}: {err.decode()[-400:]}")
    return received


async def follow_job(cli: Cli, command: list[str]) -> Received:
    return await follow(cli, await submit(cli, command))


async def measure(smoke: bool) -> list[Figure]:
    return [await measure_single(smoke), await measure_eight(smoke)]


async def measure_single(smoke: bool) -> Figure:
    lines, repetitions = (200_000, 1) if smoke else (20_000_000, 3)
    command = generator(lines, 1.5 if smoke else 3.0)
    expected = await asyncio.to_thread(expected_sha256, lines)
    runs: dict[str, list[Received]] = {"testhide": [], "docker": []}
    with tempfile.TemporaryDirectory() as tmp:
        cap = lines * LINE + (1 << 20)
        async with control_plane(Path(tmp)) as cp, agent_process(cp, Path(tmp) / "agent", log_cap_bytes=cap):
            cli = Cli(Path(tmp) / "cli")
            assert (await cli.login(cp)).returncode == 0

            async def testhide() -> float:
                runs["testhide"].append(await follow_job(cli, command))
                return runs["testhide"][-1].rate

            async def attach() -> float:
                runs["docker"].append(await asyncio.to_thread(read_attach_socket, command))
                return runs["docker"][-1].rate

            values, baselines = await alternate(repetitions, testhide, attach)
    identical = all(
        r.digest.hexdigest() == expected and r.size == lines * LINE
        for received in runs.values()
        for r in received
    )
    value, baseline = median(values), median(baselines)
    ratio = value / baseline
    details: dict[str, Any] = {
        "bytes": lines * LINE,
        "repetitions": repetitions,
        "source_sha256": expected,
        "sha256_match": identical,
        "testhide_mb_s": [round(v / MB, 1) for v in values],
        "docker_mb_s": [round(v / MB, 1) for v in baselines],
        "python": sys.version.split()[0],
    }
    return Figure(
        name="log_throughput",
        title="Log throughput",
        value=round(value / MB, 1),
        unit="MB/s",
        baseline=round(baseline / MB, 1),
        baseline_unit="MB/s",
        baseline_what="Python reading the same container's attach socket in 1 MiB blocks",
        ratio=round(ratio, 3),
        goal=f"ratio >= {GOAL} and sha256 identical",
        met=ratio >= GOAL and identical,
        details=details,
    )


def dockerd_pid() -> int | None:
    """dockerd's process, for its CPU time (None where it cannot be found)."""
    try:
        return int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class CpuMeter:
    """CPU seconds of the agent process, dockerd, this process (the control
    plane and the benchmark's own reading and hashing) and the waited-for child
    processes (the CLIs) over one phase."""

    def __init__(self, agent_pid: int) -> None:
        self._pids = {"agent": agent_pid, "dockerd": dockerd_pid(), "control_plane_and_bench": os.getpid()}
        self._start = self._read()
        self._submitted: float | None = None

    def submitted(self) -> None:
        """The submitting CLIs have all exited: the clients' CPU so far is theirs (start-up
        included), the rest the followers'."""
        self._submitted = self._read()["clients"]

    def _read(self) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        read = {"clients": children.ru_utime + children.ru_stime}
        for name, pid in self._pids.items():
            if pid is not None:
                with suppress(OSError):
                    read[name] = cpu_seconds(pid)
        return read

    def used(self) -> dict[str, float]:
        end = self._read()
        used = {name: end[name] - self._start[name] for name in end if name in self._start}
        if self._submitted is not None:
            used["clients_submitting"] = self._submitted - self._start["clients"]
            used["clients_following"] = end["clients"] - self._submitted
        return used


async def measure_eight(smoke: bool) -> Figure:
    lines, repetitions, lead_s = (200_000, 1, 6.0) if smoke else (5_000_000, 3, 10.0)
    expected = await asyncio.to_thread(expected_sha256, lines)
    runs: dict[str, list[list[Received]]] = {"testhide": [], "docker": []}
    cpu: dict[str, list[dict[str, float]]] = {"testhide": [], "docker": []}
    late: list[int] = []
    late_containers: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        cap = lines * LINE + (1 << 20)
        async with (
            control_plane(Path(tmp)) as cp,
            agent_process(cp, Path(tmp) / "agent", log_cap_bytes=cap, max_jobs=JOBS) as agent_pid,
        ):
            cli = Cli(Path(tmp) / "cli")
            assert (await cli.login(cp)).returncode == 0

            meters: list[CpuMeter] = []

            async def phase(name: str, run: Callable[[list[str], float], Awaitable[list[Received]]]) -> float:
                meter = CpuMeter(agent_pid)
                meters.append(meter)
                start_at = time.time() + lead_s
                received = await run(generator(lines, start_at=start_at), start_at)
                cpu[name].append(meter.used())
                runs[name].append(received)
                return aggregate_rate(received)

            async def testhide(command: list[str], start_at: float) -> list[Received]:
                job_ids = await asyncio.gather(*(submit(cli, command) for _ in range(JOBS)))
                meters[-1].submitted()
                received = list(await asyncio.gather(*(follow(cli, job_id) for job_id in job_ids)))
                late.append(sum(r.started_at > start_at for r in received))
                return received

            async def attach(command: list[str], start_at: float) -> list[Received]:
                # A thread each (asyncio's default pool has fewer than eight on 2 cores).
                loop = asyncio.get_running_loop()
                with ThreadPoolExecutor(JOBS, thread_name_prefix="attach") as pool:
                    readers = (loop.run_in_executor(pool, read_attach_socket, command) for _ in range(JOBS))
                    received = list(await asyncio.gather(*readers))
                late_containers.append(sum(r.started_at > start_at for r in received))
                return received

            values, baselines = await alternate(
                repetitions, lambda: phase("testhide", testhide), lambda: phase("docker", attach)
            )
    identical = all(
        r.digest.hexdigest() == expected and r.size == lines * LINE
        for repetition in (*runs["testhide"], *runs["docker"])
        for r in repetition
    )
    value, baseline = median(values), median(baselines)
    ratio = value / baseline
    total_mb = JOBS * lines * LINE / MB

    def per_mb(name: str) -> dict[str, float]:
        keys = sorted(set.intersection(*(set(c) for c in cpu[name])))
        return {k: round(median([c[k] for c in cpu[name]]) * 1000 / total_mb, 2) for k in keys}

    details: dict[str, Any] = {
        "jobs": JOBS,
        "bytes_per_job": lines * LINE,
        "repetitions": repetitions,
        "source_sha256": expected,
        "sha256_match": identical,
        "logs_checked": sum(len(r) for r in (*runs["testhide"], *runs["docker"])),
        "testhide_mb_s": [round(v / MB, 1) for v in values],
        "docker_mb_s": [round(v / MB, 1) for v in baselines],
        "agent_cpu_ms_per_mb": per_mb("testhide").get("agent"),
        "cpu_ms_per_mb": {"testhide": per_mb("testhide"), "docker": per_mb("docker")},
        "followers_started_after_writing_began": sum(late),
        "baseline_containers_started_after_writing_began": sum(late_containers),
        "cpu_how": "CPU seconds from /proc/PID/stat over each phase: the agent process (all its threads:"
        " event loop, output readers, gRPC), dockerd, this process (the control plane, in process, with the"
        " benchmark's own pipe reading and hashing; the baseline's reader threads in the docker phase) and"
        " the CLI processes (RUSAGE_CHILDREN; in testhide's phase split into clients_submitting, the 8"
        " `run --detach`, and clients_following, the 8 `logs --follow`, each with its start-up); median over"
        " repetitions, per MB of log delivered",
    }
    return Figure(
        name="log_throughput_eight",
        title=f"Log throughput, {JOBS} jobs on one agent",
        value=round(value / MB, 1),
        unit="MB/s",
        baseline=round(baseline / MB, 1),
        baseline_unit="MB/s",
        baseline_what=f"{JOBS} Python threads reading {JOBS} such containers' attach sockets in 1 MiB blocks",
        ratio=round(ratio, 3),
        goal=f"ratio >= {GOAL} and sha256 identical",
        met=ratio >= GOAL and identical,
        details=details,
    )
