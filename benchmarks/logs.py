"""Log throughput: a job prints numbered lines; the rate at which they reach
a ``testhide logs --follow`` client (first byte to last), against the rate at
which Python reads the same container's output from Docker's attach socket
in large blocks. Both must be byte-identical to what the job printed."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
from docker.types import LogConfig
from docker.utils.socket import read as socket_read

from benchmarks.figures import Figure, alternate, median
from benchmarks.fleet import agent_process
from testhide.agent.runtime.docker import Demuxer
from tests.harness import Cli, control_plane

GOAL = 0.8
IMAGE = "testhide/python:1"
LINE = 10  # b"%09d\n"
READ_BLOCK = 1 << 20


def generator(lines: int, delay_s: float) -> list[str]:
    """The job: after ``delay_s`` (time for the follower to attach), ``lines``
    numbered lines written in large blocks."""
    program = (
        f"import sys, time\ntime.sleep({delay_s})\nw = sys.stdout.buffer.write\n"
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


async def follow_job(cli: Cli, command: list[str]) -> Received:
    submitted = await cli("run", "--detach", "--no-workspace", "--image", IMAGE, "--", *command)
    assert submitted.returncode == 0, submitted.stderr.decode()
    job_id = submitted.stdout.decode().strip()
    process = await cli.start("logs", "--follow", job_id)
    assert process.stdout is not None
    assert process.stderr is not None
    received = Received()
    while data := await process.stdout.read(READ_BLOCK):
        received.add(data)
    err = await process.stderr.read()
    if await process.wait() != 0:
        raise RuntimeError(f"testhide logs --follow exited {process.returncode}: {err.decode()[-400:]}")
    return received


async def measure(smoke: bool) -> Figure:
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
    mb = 1e6
    details: dict[str, Any] = {
        "bytes": lines * LINE,
        "repetitions": repetitions,
        "source_sha256": expected,
        "sha256_match": identical,
        "testhide_mb_s": [round(v / mb, 1) for v in values],
        "docker_mb_s": [round(v / mb, 1) for v in baselines],
        "python": sys.version.split()[0],
    }
    return Figure(
        name="log_throughput",
        title="Log throughput",
        value=round(value / mb, 1),
        unit="MB/s",
        baseline=round(baseline / mb, 1),
        baseline_unit="MB/s",
        baseline_what="Python reading the same container's attach socket in 1 MiB blocks",
        ratio=round(ratio, 3),
        goal=f"ratio >= {GOAL} and sha256 identical",
        met=ratio >= GOAL and identical,
        details=details,
    )
