"""Every `--json` of `testhide` follows one convention (README.md, "JSON
output"): snake_case fields, enum values by their short upper-case name,
RFC 3339 UTC times with microseconds, null for what does not exist."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli

pytestmark = pytest.mark.docker

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
JOB_STATUSES = {
    "QUEUED",
    "ASSIGNED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "TIMED_OUT",
    "CANCELED",
    "ERROR",
    "LOST",
}

REPORT = (
    '<testsuite name="s">'
    '<testcase classname="c" name="ok" time="0.25"/>'
    '<testcase classname="c" name="bad"><failure message="boom">trace</failure></testcase>'
    '<testcase classname="c" name="later"><skipped/></testcase>'
    "</testsuite>"
)


def field_names(document: Any) -> set[str]:
    if isinstance(document, dict):
        return set(document) | {k for v in document.values() for k in field_names(v)}
    if isinstance(document, list):
        return {k for v in document for k in field_names(v)}
    return set()


async def test_jobs_and_tests_json_share_one_convention(docker_agent: Agent, cli: Cli) -> None:
    script = f"mkdir -p r && echo '{REPORT}' > r/junit.xml && exit 1"
    run = await cli("run", "--junit", "r/*.xml", "--image", JOB_IMAGE, "--", "sh", "-c", script)
    assert run.returncode == 1, run.stderr

    listed = json.loads((await cli("jobs", "list", "--json")).stdout)
    job_id = listed[0]["id"]
    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    tests = await cli("tests", job_id, "--json")
    assert tests.returncode == 1  # a test failed
    results = json.loads(tests.stdout)

    assert listed == [shown]
    assert shown["status"] == "FAILED"
    assert shown["exit_code"] == 1
    assert [t["status"] for t in shown["transitions"]] == ["QUEUED", "ASSIGNED", "RUNNING", "FAILED"]
    times = [shown["created_at"], shown["started_at"], shown["finished_at"]]
    assert all(TIME.match(t) for t in times + [t["at"] for t in shown["transitions"]]), shown
    assert times == sorted(times)
    assert (shown["retry_of"], shown["retried_as"]) == (None, None)
    assert {t["status"] for t in shown["transitions"]} <= JOB_STATUSES

    cases = {case["name"]: case for case in results["cases"]}
    assert {name: case["status"] for name, case in cases.items()} == {
        "ok": "PASSED",
        "bad": "FAILED",
        "later": "SKIPPED",
    }
    assert cases["ok"]["duration_s"] == 0.25
    assert cases["bad"]["message"].startswith("boom")
    assert (results["total"], results["passed"], results["failed"], results["skipped"]) == (3, 1, 1, 1)
    assert results["rejected_reports"] == []

    for document in (shown, results):
        assert all(SNAKE.match(name) for name in field_names(document)), document
