"""Job overhead: ``testhide run --no-workspace --image IMAGE -- true``, start
to exit, against ``docker run --rm --network none IMAGE true``, turn about.

The CLI's own share is measured apart, in the same run, as a figure of its
own: ``testhide run --detach`` of a job into a pool without agents is the
CLI's start-up, its connection and the Submit call, and its exit, everything
of `run` but the job; its baseline is ``python -c pass`` of the same
interpreter (not the ``python3`` on PATH, which may be a shell-script shim).
The CLI runs as installed: its bytecode is written on the first run (into a
directory of the benchmark's) and read by the others, whatever
PYTHONDONTWRITEBYTECODE says in the benchmark's environment; and as a user
has it, warm (cli/main.py): `login` starts the user's warm process, which runs
the commands after it. The same `run --detach` with the warm process off
(TESTHIDE_CLI_WARM=off: a whole interpreter, every import) is reported beside
it, and the warm process is stopped at the end."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.figures import Figure, alternate, median
from benchmarks.fleet import agent_process
from tests.harness import JOB_IMAGE, Cli, control_plane, eventually

GOAL = 1.4
GOAL_WITHOUT_CLI = 1.1
PARKED_POOL = "parked"
"""A pool no agent serves: the jobs `run --detach` submits there stay queued."""


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


def _installed(cli: Cli, pycache: Path) -> None:
    """Bytecode as an installed CLI has it: compiled once, then read."""
    cli.env.pop("PYTHONDONTWRITEBYTECODE", None)
    cli.env["PYTHONPYCACHEPREFIX"] = str(pycache)


async def measure(smoke: bool) -> list[Figure]:
    repetitions = 2 if smoke else 10
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp)) as cp, agent_process(cp, Path(tmp) / "agent"):
            cli = Cli(Path(tmp) / "cli", warm=True)
            _installed(cli, Path(tmp) / "pycache")
            try:
                assert (await cli.login(cp)).returncode == 0
                await eventually(cli.warm_answers, 60, "the CLI's warm process")
                return await _measure(cli, repetitions)
            finally:
                await cli.stop_warm()


async def _measure(cli: Cli, repetitions: int) -> list[Figure]:
    assert (await cli("admin", "pools", "create", PARKED_POOL)).returncode == 0
    cold_env = {**cli.env, "TESTHIDE_CLI_WARM": "off"}

    async def testhide(*args: str, env: dict[str, str] = cli.env) -> float:
        command = (sys.executable, "-m", "testhide.cli.main", *args)
        return await _timed(*command, env=env, cwd=cli.cwd)

    async def job() -> float:
        return await testhide("run", "--no-workspace", "--image", JOB_IMAGE, "--", "true")

    submit = ("run", "--detach", "--pool", PARKED_POOL, "--no-workspace", "--image", JOB_IMAGE, "--", "true")

    async def submitted() -> float:
        return await testhide(*submit)

    async def submitted_cold() -> float:
        return await testhide(*submit, env=cold_env)

    async def docker() -> float:
        return await _timed("docker", "run", "--rm", "--network", "none", JOB_IMAGE, "true")

    async def python() -> float:
        return await _timed(sys.executable, "-c", "pass")

    await job()  # warm every path: image cache, init image, bytecode
    await docker()
    await submitted()
    await submitted_cold()
    values, baselines = await alternate(repetitions, job, docker)
    to_submit, pythons = await alternate(repetitions, submitted, python)
    cold = [await submitted_cold() for _ in range(repetitions)]
    run_help = [await testhide("run", "--help") for _ in range(3)]
    return [
        _overhead(values, baselines, median(to_submit), repetitions),
        _startup(to_submit, pythons, run_help, cold),
    ]


def _overhead(values: list[float], baselines: list[float], cli_s: float, repetitions: int) -> Figure:
    value, baseline = median(values), median(baselines)
    ratio, without_cli = value / baseline, (value - cli_s) / baseline
    return Figure(
        name="job_overhead",
        title="Job overhead",
        value=round(value, 3),
        unit="s",
        baseline=round(baseline, 3),
        baseline_unit="s",
        baseline_what="docker run --rm --network none IMAGE true",
        ratio=round(ratio, 3),
        goal=f"ratio <= {GOAL}; <= {GOAL_WITHOUT_CLI} without the CLI (details.without_cli_startup_ratio)",
        met=ratio <= GOAL and without_cli <= GOAL_WITHOUT_CLI,
        details={
            "repetitions": repetitions,
            "testhide_s": [round(v, 3) for v in values],
            "docker_s": [round(v, 3) for v in baselines],
            "cli_startup_s": round(cli_s, 3),
            "cli_startup_what": "warm testhide run --detach into a pool with no agent: start, submit, exit",
            "without_cli_startup_ratio": round(without_cli, 3),
            "image": JOB_IMAGE,
        },
    )


def _startup(
    to_submit: list[float], pythons: list[float], run_help: list[float], cold: list[float]
) -> Figure:
    value, baseline = median(to_submit), median(pythons)
    return Figure(
        name="cli_startup",
        title="CLI start-up (run, to the submit)",
        value=round(value, 3),
        unit="s",
        baseline=round(baseline, 3),
        baseline_unit="s",
        baseline_what="python -c pass (the CLI's interpreter)",
        ratio=round(value / baseline, 1),
        goal="none set (reported)",
        met=None,
        details={
            "command": "testhide run --detach --pool (no agents) --no-workspace --image IMAGE -- true",
            "submit_s": [round(v, 3) for v in to_submit],
            "warm": "the user's warm process runs the command (cli/main.py), as for a user after login",
            "cold_submit_s": round(median(cold), 3),
            "cold_what": "the same with TESTHIDE_CLI_WARM=off: the command in a process of its own",
            "python_s": [round(v, 4) for v in pythons],
            "run_help_s": round(median(run_help), 3),
            "bytecode": "cached, as installed",
        },
    )
