"""Pickup latency: from the Submit RPC's return to an idle, connected agent
holding the assignment. The probe (submitter and agent in one process, so
both timestamps come from one clock) speaks the real agent protocol over
mutual TLS; the baseline is a unary round trip (health check) on the same
API channel, taken turn about with the submissions."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.figures import SPAWN, Figure, median, percentile
from benchmarks.fleet import UNLIMITED, AgentKeys, finished_messages, issue_agents, open_stream
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, control_plane

GOAL_MS = 20.0
WARMUP = 5


def idle_agent(
    call: Any,
) -> tuple[asyncio.Queue[tuple[str, float]], asyncio.Queue[str], asyncio.Task[None]]:
    """A simulated agent on ``call`` that finishes each job at once: when each
    assignment arrived (job id, monotonic time), each result acknowledged, and
    the task reading the stream."""
    arrivals: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    acks: asyncio.Queue[str] = asyncio.Queue()

    async def agent() -> None:
        async for message in call:
            kind = message.WhichOneof("body")
            if kind == "assign":
                arrivals.put_nowait((message.assign.job_id, time.monotonic()))
                for reply in finished_messages(message.assign.job_id, message.assign.epoch):
                    await call.write(reply)
            elif kind == "result_ack":
                acks.put_nowait(message.result_ack.job_id)

    return arrivals, acks, asyncio.create_task(agent())


async def _probe(
    api_target: str,
    agent_target: str,
    ca_pem: bytes,
    bearer: tuple[tuple[str, str], ...],
    keys: AgentKeys,
    count: int,
) -> dict[str, list[float]]:
    agent_channel, call = await open_stream(agent_target, ca_pem, keys)
    arrivals, acks, reader = idle_agent(call)
    spec = jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], pool="default")
    pickups, round_trips = [], []
    async with grpc.aio.secure_channel(api_target, grpc.ssl_channel_credentials(ca_pem)) as channel:
        jobs = jobs_pb2_grpc.JobsStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for i in range(WARMUP + count):
            started = time.monotonic()
            # types-grpcio-health-checking declares HealthStub without its methods.
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # type: ignore[attr-defined]
            round_trip = time.monotonic() - started
            response = await jobs.Submit(jobs_pb2.SubmitJobRequest(spec=spec), metadata=bearer, timeout=30)
            returned = time.monotonic()
            job_id, arrived = await asyncio.wait_for(arrivals.get(), 30)
            assert job_id == response.job.id, (job_id, response.job.id)
            assert await asyncio.wait_for(acks.get(), 30) == job_id  # the agent is idle again
            if i >= WARMUP:
                pickups.append(arrived - returned)
                round_trips.append(round_trip)
    reader.cancel()
    call.cancel()
    await agent_channel.close()
    return {"pickup_s": pickups, "round_trip_s": round_trips}


def _probe_process(args: tuple[Any, ...], out: Any) -> None:
    out.put(asyncio.run(_probe(*args)))


async def measure(smoke: bool) -> Figure:
    count = 10 if smoke else 300
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp), **UNLIMITED) as cp:
            keys = (await issue_agents(cp, 1))[0]
            out = SPAWN.Queue()
            process = SPAWN.Process(
                target=_probe_process,
                name="bench-pickup",
                args=((cp.api_target, cp.agent_target, cp.ca_pem, await cp.bearer(), keys, count), out),
            )
            process.start()
            result = await asyncio.to_thread(out.get, True, 600)
            await asyncio.to_thread(process.join, 30)
    pickups = [s * 1000 for s in result["pickup_s"]]
    trips = [s * 1000 for s in result["round_trip_s"]]
    p50, baseline = median(pickups), median(trips)
    return Figure(
        name="pickup_latency",
        title="Pickup latency (p50)",
        value=round(p50, 2),
        unit="ms",
        baseline=round(baseline, 2),
        baseline_unit="ms",
        baseline_what="unary RPC round trip (health check) on the same TLS channel, p50",
        ratio=round(p50 / baseline, 2),
        goal=f"p50 < {GOAL_MS:g} ms",
        met=p50 < GOAL_MS,
        details={
            "jobs": count,
            "p50_ms": round(p50, 2),
            "p99_ms": round(percentile(pickups, 99), 2),
            "max_ms": round(max(pickups), 2),
            "round_trip_p99_ms": round(percentile(trips, 99), 2),
            "compare": "GitLab Runner polls every 3 s (1.5 s mean wait); GitHub's runner long-polls",
        },
    )
