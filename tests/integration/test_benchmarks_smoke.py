"""The benchmarks' smoke modes run in CI so that they cannot rot. They assert
that each figure is produced, never how fast it is."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.harness import REPO


async def run_benchmark(module: str, tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "result.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--smoke", "--out", str(out), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
    return json.loads(out.read_text())


async def test_certificate_benchmark_smoke(tmp_path: Path) -> None:
    result = await run_benchmark("benchmarks.certs", tmp_path)
    assert result["agents"] == 20
    for key in ("signing_per_s", "renewals_per_s", "all_renewed_s", "renewal_rate_vs_signing", "latency_p99_ms"):
        assert isinstance(result[key], float) and result[key] > 0, key
