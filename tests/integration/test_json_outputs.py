"""Every `--json` of `testhide` a job produces, run for real against a control
plane and an agent, has the shape of its example (tests/json_examples.py) and
follows the one convention (README.md, "JSON output")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.daemon import Agent
from testhide.cli.commands import main as engineers_command
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane
from tests.json_schema import assert_matches_example

pytestmark = pytest.mark.docker

REPORT = (
    '<testsuite name="s">'
    '<testcase classname="c" name="ok" time="0.25"/>'
    '<testcase classname="c" name="bad"><failure message="boom">trace</failure></testcase>'
    "</testsuite>"
)


async def printed(cli: Cli, *args: str, exit_code: int = 0) -> Any:
    result = await cli(*args, "--json")
    assert result.returncode == exit_code, result.stderr
    return json.loads(result.stdout)


async def test_a_finished_jobs_outputs_match_their_examples(
    docker_agent: Agent, cli: Cli, tmp_path: Path
) -> None:
    assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=b"value\n")).returncode == 0
    assert (await cli("secrets", "set", "UNUSED", stdin=b"other\n")).returncode == 0
    script = f"mkdir -p r out && echo '{REPORT}' > r/junit.xml && echo hi > out/a.txt && exit 1"
    run = await cli(
        "run",
        *("--secret", "DEPLOY_TOKEN", "--env", "CI=1"),
        *("--junit", "r/*.xml", "--artifacts", "out/*", "--image", JOB_IMAGE, "--", "sh", "-c", script),
    )
    assert run.returncode == 1, run.stderr

    listed = await printed(cli, "jobs", "list")
    assert_matches_example("testhide jobs list", listed)
    job_id = listed[0]["id"]
    shown = await printed(cli, "jobs", "show", job_id)
    assert_matches_example("testhide jobs show", shown)
    assert listed == [shown]
    assert shown["agent"] is not None
    assert shown["isolation"] is not None

    assert_matches_example("testhide tests", await printed(cli, "tests", job_id, exit_code=1))

    secrets = await printed(cli, "secrets", "list")
    assert_matches_example("testhide secrets list", secrets)
    assert [s["name"] for s in secrets] == ["DEPLOY_TOKEN", "UNUSED"]
    assert secrets[1]["last_used_at"] is None
    assert secrets[1]["last_used_by_job"] is None

    artifacts = await printed(cli, "artifacts", job_id, "--list", "-o", str(tmp_path / "none"))
    assert_matches_example("testhide artifacts --list", artifacts)
    assert [a["path"] for a in artifacts] == ["out/a.txt"]
    assert not (tmp_path / "none").exists()  # --list downloads nothing
    downloaded = await printed(cli, "artifacts", job_id, "-o", str(tmp_path / "dl"))
    assert downloaded == artifacts
    assert (tmp_path / "dl" / "out" / "a.txt").read_text() == "hi\n"


async def test_an_unfinished_job_and_empty_lists_match_their_examples(
    cp: RunningControlPlane, cli: Cli
) -> None:
    assert await printed(cli, "secrets", "list") == []
    job_id = (
        (await cli("run", "-d", "--no-workspace", "--image", JOB_IMAGE, "--", "true")).stdout.decode().strip()
    )
    shown = await printed(cli, "jobs", "show", job_id)
    assert_matches_example("testhide jobs show", shown)
    assert (shown["status"], shown["exit_code"], shown["started_at"], shown["agent"]) == (
        "QUEUED",
        None,
        None,
        None,
    )
    assert await printed(cli, "artifacts", job_id, "--list") == []


async def test_pools_list_matches_its_example(cp: RunningControlPlane, cli: Cli) -> None:
    if "pools" not in engineers_command.commands:
        pytest.skip("`testhide pools list` is not part of the command yet")
    pools = await printed(cli, "pools", "list")
    assert_matches_example("testhide pools list", pools)
    assert "default" in [p["name"] for p in pools]
