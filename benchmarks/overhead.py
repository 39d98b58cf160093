"""Job overhead: ``testhide run --no-workspace --image IMAGE -- true``, start
to exit, against ``docker run --rm --network none IMAGE true``, turn about."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.figures import Figure, alternate, median
from benchmarks.fleet import agent_process
from tests.harness import JOB_IMAGE, REPO, Cli, control_plane

GOAL = 1.15


async def _timed(*command: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {process.returncode}: {err.decode()[-400:]}")
    return elapsed


async def measure(smoke: bool) -> Figure:
    repetitions = 2 if smoke else 10
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp)) as cp, agent_process(cp, Path(tmp) / "agent"):
            cli = Cli(Path(tmp) / "cli")
            assert (await cli.login(cp)).returncode == 0

            async def testhide() -> float:
                return await _timed(
                    sys.executable,
                    "-m",
                    "testhide.cli.main",
                    "run",
                    "--no-workspace",
                    "--image",
                    JOB_IMAGE,
                    "--",
                    "true",
                    env=cli.env,
                    cwd=cli.cwd,
                )

            async def docker() -> float:
                return await _timed("docker", "run", "--rm", "--network", "none", JOB_IMAGE, "true")

            await testhide()  # warm both paths: image cache, init image, imports
            await docker()
            values, baselines = await alternate(repetitions, testhide, docker)
            cli_start = median(
                [
                    await _timed(sys.executable, "-m", "testhide.cli.main", "--help", env=cli.env, cwd=REPO)
                    for _ in range(3)
                ]
            )
    value, baseline = median(values), median(baselines)
    ratio = value / baseline
    return Figure(
        name="job_overhead",
        title="Job overhead",
        value=round(value, 3),
        unit="s",
        baseline=round(baseline, 3),
        baseline_unit="s",
        baseline_what="docker run --rm --network none IMAGE true",
        ratio=round(ratio, 3),
        goal=f"ratio <= {GOAL}",
        met=ratio <= GOAL,
        details={
            "repetitions": repetitions,
            "testhide_s": [round(v, 3) for v in values],
            "docker_s": [round(v, 3) for v in baselines],
            "cli_startup_s": round(cli_start, 3),
            "without_cli_startup_ratio": round((value - cli_start) / baseline, 3),
            "image": JOB_IMAGE,
        },
    )
