"""Login flood: the p99 of health checks on the API port while 64 password
logins for accounts that do not exist are kept in flight, against the p99 of
the same health checks on the idle control plane, turn about in one run.

Each bcrypt check costs ~240 ms of CPU; on the event loop, 64 of them stalled
every RPC for seconds. The control plane runs here in the benchmark's process
(its event loop is what is measured); the flood and the prober are processes
of their own, so neither bends the other's timing. The flood clients retry
after the ``retry-after`` hint when refused, which keeps the bcrypt pool
saturated all along. Client-side limits that would stop a flood from one
address (the per-address rate limit and failure budget) are lifted: the
prober shares 127.0.0.1 with the flood, and a real flood has many addresses.

    python3 -m benchmarks --only login_flood [--smoke]
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.figures import SPAWN, Figure, median, percentile
from benchmarks.fleet import UNLIMITED
from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc
from tests.harness import control_plane

FLOOD = 64
GUESS = "Summer2030!"
WARMUP = 10
INTERVAL_S = 0.01


def _channel(target: str, ca_pem: bytes) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca_pem))


async def _flood(target: str, ca_pem: bytes, running: Any, stop: Any, out: Any) -> None:
    """Keep ``FLOOD`` password logins in flight until ``stop`` is set."""
    counts: Counter[str] = Counter()
    stopping = asyncio.Event()
    answered = asyncio.Event()

    async def login(stub: auth_pb2_grpc.AuthAsyncStub, i: int) -> None:
        attempt = 0
        while not stopping.is_set():
            attempt += 1
            request = auth_pb2.LoginRequest(
                password=auth_pb2.PasswordLogin(org="default", user=f"flood-{i}-{attempt}", password=GUESS)
            )
            wait = 0.0
            try:
                await stub.Login(request, timeout=120)
                counts["OK"] += 1
            except grpc.aio.AioRpcError as error:
                counts[error.code().name] += 1
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    wait = float(dict(error.trailing_metadata() or ()).get("retry-after", "1"))
            answered.set()
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), wait)

    async with _channel(target, ca_pem) as channel:
        stub = auth_pb2_grpc.AuthStub(channel)
        tasks = [asyncio.create_task(login(stub, i)) for i in range(FLOOD)]
        await answered.wait()
        running.put(True)
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await asyncio.gather(*tasks)  # every login in flight answered: the pool drained
    out.put(dict(counts))


def _flood_process(target: str, ca_pem: bytes, running: Any, stop: Any, out: Any) -> None:
    asyncio.run(_flood(target, ca_pem, running, stop, out))


async def _probe(target: str, ca_pem: bytes, commands: Any, results: Any) -> None:
    """For each count received, that many health checks, one every ``INTERVAL_S`` (so that a
    phase spans seconds of the flood, not a burst at its start): their latencies."""
    async with _channel(target, ca_pem) as channel:
        # types-grpcio-health-checking declares HealthStub without its methods.
        check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
        for _ in range(WARMUP):
            await check(health_pb2.HealthCheckRequest(), timeout=60)
        while (count := await asyncio.to_thread(commands.get)) is not None:
            latencies = []
            for _ in range(count):
                started = time.perf_counter()
                await check(health_pb2.HealthCheckRequest(), timeout=60)
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(max(0.0, INTERVAL_S - latencies[-1]))
            results.put(latencies)


def _probe_process(target: str, ca_pem: bytes, commands: Any, results: Any) -> None:
    asyncio.run(_probe(target, ca_pem, commands, results))


async def _flooded(
    target: str, ca_pem: bytes, commands: Any, results: Any, checks: int
) -> tuple[list[float], dict[str, int]]:
    running, stop, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    flood = SPAWN.Process(
        target=_flood_process, name="bench-login-flood", args=(target, ca_pem, running, stop, out)
    )
    flood.start()
    try:
        await asyncio.to_thread(running.get, True, 120)
        commands.put(checks)
        latencies: list[float] = await asyncio.to_thread(results.get, True, 600)
    finally:
        stop.set()
    counts: dict[str, int] = await asyncio.to_thread(out.get, True, 120)
    await asyncio.to_thread(flood.join, 60)
    return latencies, counts


async def measure(smoke: bool) -> Figure:
    rounds, checks = (1, 100) if smoke else (5, 500)
    settings: dict[str, Any] = {**UNLIMITED, "address_lockout": LockoutPolicy(failures=1 << 30)}
    idle: list[float] = []
    flooded: list[float] = []
    logins: Counter[str] = Counter()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp), **settings) as cp:
            pool = cp.daemon.password_checks
            assert pool is not None
            commands, results = SPAWN.Queue(), SPAWN.Queue()
            probe = SPAWN.Process(
                target=_probe_process,
                name="bench-health-probe",
                args=(cp.api_target, cp.ca_pem, commands, results),
            )
            probe.start()
            try:
                for _ in range(rounds):
                    # The last flood ended with all its logins answered: the pool is empty.
                    commands.put(checks)
                    idle += await asyncio.to_thread(results.get, True, 600)
                    latencies, counts = await _flooded(cp.api_target, cp.ca_pem, commands, results, checks)
                    flooded += latencies
                    logins.update(counts)
            finally:
                commands.put(None)
                await asyncio.to_thread(probe.join, 60)
            workers, capacity = pool.workers, pool.capacity
    flood_s = time.monotonic() - started
    idle_ms = [s * 1000 for s in idle]
    flood_ms = [s * 1000 for s in flooded]
    p99, baseline = percentile(flood_ms, 99), percentile(idle_ms, 99)
    return Figure(
        name="login_flood_health_p99",
        title=f"Health-check p99 during {FLOOD} concurrent password logins",
        value=round(p99, 2),
        unit="ms",
        baseline=round(baseline, 2),
        baseline_unit="ms",
        baseline_what="health-check p99 on the same control plane, idle (turn about with the flood)",
        ratio=round(p99 / baseline, 2),
        goal="none set (reported)",
        met=None,
        details={
            "rounds": rounds,
            "health_checks_per_phase": checks,
            "flood_p50_ms": round(median(flood_ms), 2),
            "flood_max_ms": round(max(flood_ms), 2),
            "idle_p50_ms": round(median(idle_ms), 2),
            "idle_max_ms": round(max(idle_ms), 2),
            "password_workers": workers,
            "password_capacity": capacity,
            "logins_answered": dict(logins),
            "wall_s": round(flood_s, 1),
        },
    )
