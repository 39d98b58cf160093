"""Connections: idle agent streams held by one control plane, and its
resident memory against its own before any agent connected; and the resident
memory of one idle, connected agent daemon against a bare Python interpreter.

Every stream is a real agent identity: its own key and certificate and its
own mutual-TLS connection, opened from a few client processes that each hold
thousands, sending a heartbeat at the agent's interval."""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.figures import SPAWN, Figure, raise_fd_limit, rss_bytes, settle_time
from benchmarks.fleet import AgentKeys, AgentStream, issue_agents, open_stream, save_credentials
from testhide.protos.v1 import agent_pb2
from tests.harness import REPO, ControlPlaneProcess, RunningControlPlane, control_plane, free_port

GOAL_CONTROLPLANE_BYTES = 1 << 30
HEARTBEAT_S = 20.0
HANDSHAKES_AT_ONCE = 64
MIB = 1 << 20


async def _hold(target: str, ca_pem: bytes, agents: list[AgentKeys], connected: Any, stop: Any) -> None:
    gate = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
    streams: list[tuple[grpc.aio.Channel, AgentStream]] = []

    async def one(keys: AgentKeys) -> None:
        async with gate:
            streams.append(await open_stream(target, ca_pem, keys))

    async def heartbeat(call: AgentStream) -> None:
        await asyncio.sleep(random.uniform(0, HEARTBEAT_S))
        while True:
            await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
            await asyncio.sleep(HEARTBEAT_S)

    async def drain(call: AgentStream) -> None:
        async for _ in call:
            pass

    await asyncio.gather(*(one(k) for k in agents))
    tasks = [asyncio.create_task(f(call)) for _, call in streams for f in (heartbeat, drain)]
    connected.put((len(streams), rss_bytes()))  # each stream's identity was accepted
    await asyncio.to_thread(stop.wait)
    for task in tasks:
        task.cancel()
    for channel, call in streams:
        call.cancel()
        await channel.close()


def _client_process(target: str, ca_pem: bytes, agents: list[AgentKeys], connected: Any, stop: Any) -> None:
    raise_fd_limit()
    asyncio.run(_hold(target, ca_pem, agents, connected, stop))


async def _idle_rss(*command: str, cwd: Path, settle_s: float, ready: Any = None) -> int:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        if ready is not None:
            await ready
        await asyncio.sleep(settle_s)
        return rss_bytes(process.pid)
    finally:
        process.terminate()
        await process.wait()


async def idle_agent(cp: RunningControlPlane, tmp: Path, smoke: bool) -> tuple[int, int]:
    """(RSS of ``testhide-agent run`` connected and idle, RSS of a bare interpreter)."""
    keys = (await issue_agents(cp, 1))[0]
    data_dir = save_credentials(cp, keys, tmp / "idle-agent")
    assert cp.daemon.scheduler is not None
    attached = cp.daemon.scheduler.wait_for_agent(keys.agent_id)
    agent = await _idle_rss(
        sys.executable,
        "-m",
        "testhide.agent.cli",
        "run",
        "--data-dir",
        str(data_dir),
        cwd=REPO,
        settle_s=settle_time(3.0, smoke),
        ready=asyncio.wait_for(attached, 60),
    )
    bare = await _idle_rss(
        sys.executable, "-c", "import time; time.sleep(60)", cwd=REPO, settle_s=settle_time(1.0, smoke)
    )
    return agent, bare


async def measure(smoke: bool) -> list[Figure]:
    streams, clients = (50, 2) if smoke else (10_000, 5)
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp)) as cp:  # enrolls the fleet, then stops
            agents = await issue_agents(cp, streams)
            ca_pem = cp.ca_pem
        # The control plane measured is a process of its own, as operators run it.
        served = ControlPlaneProcess(cp.data_dir, free_port(), free_port())
        await served.start()
        try:
            assert served.process is not None
            await asyncio.sleep(
                settle_time(2.0, smoke)
            )  # settle: the watcher's and the lease sweep's first rounds
            idle = rss_bytes(served.process.pid)
            connected, stop = SPAWN.Queue(), SPAWN.Event()
            target = f"127.0.0.1:{served.agent_port}"
            processes = [
                SPAWN.Process(
                    target=_client_process,
                    name=f"bench-streams-{i}",
                    args=(target, ca_pem, agents[i::clients], connected, stop),
                )
                for i in range(clients)
            ]
            started = time.monotonic()
            for process in processes:
                process.start()
            reports = [await asyncio.to_thread(connected.get, True, 900) for _ in processes]
            connect_s = time.monotonic() - started
            held = sum(count for count, _ in reports)
            await asyncio.sleep(settle_time(5.0, smoke))  # settle: first heartbeats, freed handshake buffers
            loaded = rss_bytes(served.process.pid)
            stop.set()
            for process in processes:
                await asyncio.to_thread(process.join, 120)
        finally:
            await served.stop()
        client_rss = [rss for _, rss in reports]
        async with control_plane(Path(tmp) / "idle") as cp:
            agent_rss, bare_rss = await idle_agent(cp, Path(tmp), smoke)
    per_stream_kib = (loaded - idle) / streams / 1024
    return [
        Figure(
            name="controlplane_memory",
            title=f"Control plane memory, {streams:,} idle agent streams",
            value=round(loaded / MIB, 1),
            unit="MiB",
            baseline=round(idle / MIB, 1),
            baseline_unit="MiB",
            baseline_what="the same control plane process before any agent connected",
            ratio=round(loaded / idle, 2),
            goal="< 1024 MiB",
            met=loaded < GOAL_CONTROLPLANE_BYTES and held == streams,
            details={
                "streams": streams,
                "streams_held": held,
                "client_processes": clients,
                "connections": streams,
                "per_stream_kib": round(per_stream_kib, 1),
                "all_connected_s": round(connect_s, 1),
                "client_process_rss_mib": [round(r / MIB, 1) for r in client_rss],
            },
        ),
        Figure(
            name="agent_memory",
            title="Idle agent memory",
            value=round(agent_rss / MIB, 1),
            unit="MiB",
            baseline=round(bare_rss / MIB, 1),
            baseline_unit="MiB",
            baseline_what="a bare Python interpreter, idle",
            ratio=round(agent_rss / bare_rss, 2),
            goal="none set (reported)",
            met=None,
            details={"command": "testhide-agent run (Docker runtime), connected, no job"},
        ),
    ]
