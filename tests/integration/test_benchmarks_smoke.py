"""The benchmark suite's smoke mode runs in CI so that it cannot rot. It
asserts that every figure is produced with its baseline, never how fast
anything is."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

FIGURES = {
    "job_overhead",
    "cli_startup",
    "pickup_latency",
    "log_throughput",
    "log_throughput_eight",
    "scheduler_throughput",
    "statement_cost",
    "controlplane_memory",
    "agent_memory",
    "certificate_signing",
    "certificate_renewal",
    "login_flood_health_p99",
    "replicas_throughput_sqlite",
    "replicas_throughput_asyncpg",
    "replicas_throughput_psycopg",
    "replicas_throughput_two",
    "replicas_notify_cost",
    "replicas_pickup",
    "replicas_streams_memory",
}


@pytest.mark.slow  # every figure at tiny sizes: about two minutes
@pytest.mark.timeout(300)
async def test_whole_suite_smoke(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks",
        "--smoke",
        "--out-dir",
        str(tmp_path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 280)
    assert process.returncode == 0, output.decode()[-4000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["smoke"] is True
    assert len(result["source"]["commit"]) == 40
    assert result["machine"]["cpus"] >= 1
    figures = {f["name"]: f for f in result["figures"]}
    assert set(figures) == FIGURES
    for name, figure in figures.items():
        for key in ("value", "baseline", "ratio"):
            assert isinstance(figure[key], (int, float)), (name, key)
            assert figure[key] > 0, (name, key)
        assert figure["goal"], name
        assert figure["baseline_what"], name
        assert figure["met"] in (True, False, None), name
    assert figures["log_throughput"]["details"]["sha256_match"] is True
    eight = figures["log_throughput_eight"]["details"]
    assert (eight["sha256_match"], eight["logs_checked"]) == (True, 16)
    assert eight["agent_cpu_ms_per_mb"] > 0
    clients = eight["cpu_ms_per_mb"]["testhide"]
    assert clients["clients_submitting"] > 0
    assert clients["clients_following"] > 0
    assert figures["pickup_latency"]["details"]["p99_ms"] > 0
    renewal = figures["certificate_renewal"]["details"]
    assert renewal["handshakes_s"] > 0
    assert renewal["controlplane_cpu_ms_per_handshake"] >= 0
    assert renewal["with_handshakes_s"] > renewal["all_renewed_s"]
    assert figures["login_flood_health_p99"]["details"]["logins_answered"]
    assert figures["scheduler_throughput"]["details"]["submit_to_completion_p99_ms"] > 0
    statements = figures["statement_cost"]["details"]
    assert set(statements["added_cpu_ms_per_job"]) == {"control_plane", "agents"}
    assert (
        figures["controlplane_memory"]["details"]["streams_held"]
        == figures["controlplane_memory"]["details"]["streams"]
    )
    two = figures["replicas_throughput_two"]["details"]
    assert set(two["cpu_ms_per_job"]) == {"replica_a", "replica_b", "agents", "submitter", "postgresql"}
    profiled = figures["replicas_throughput_asyncpg"]["details"]["profiled_run"]
    assert profiled["profile_replica_a"]["cumulative"]
    assert figures["replicas_pickup"]["details"]["cross_p99_ms"] > 0
    assert figures["replicas_streams_memory"]["details"]["streams_per_replica"] == [20, 20]
    assert "| figure |" in (tmp_path / "latest.md").read_text()


async def test_certificate_benchmark_alone_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.certs",
        "--smoke",
        "--out",
        str(out),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
    result = json.loads(out.read_text())
    assert result["agents"] == 20
    for key in (
        "signing_per_s",
        "renewals_per_s",
        "all_renewed_s",
        "renewal_rate_vs_signing",
        "latency_p99_ms",
        "rpc_all_renewed_s",
        "rpc_controlplane_cpu_ms_per_renewal",
    ):
        assert isinstance(result[key], float), key
        assert result[key] > 0, key
