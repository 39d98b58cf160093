"""Test results from a real test run inside a job, and hostile reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli

pytestmark = pytest.mark.docker

SUITE = """
import pytest

def test_adds():
    assert 1 + 1 == 2

def test_breaks():
    assert "expected" == "actual"

@pytest.mark.skip(reason="not today")
def test_later():
    pass
"""


async def test_a_real_pytest_run_comes_back_as_cases(
    docker_agent: Agent, cli: Cli, python_image: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_sample.py").write_text(SUITE)
    result = await cli(
        "run",
        "--image",
        python_image,
        "--junit",
        "reports/*.xml",
        "--",
        "python3",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--junitxml=reports/junit.xml",
        cwd=project,
        within=180,
    )
    assert result.returncode == 1  # pytest's own exit code: a test failed
    assert b"1 failed, 1 passed, 1 skipped" in result.stdout
    assert b"tests: 3 total, 1 passed, 1 failed, 0 errors, 1 skipped" in result.stderr
    assert b"FAILED test_sample.test_breaks: AssertionError" in result.stderr

    job_id = json.loads((await cli("jobs", "list", "--json")).stdout)[0]["id"]
    shown = await cli("tests", job_id, "--json")
    assert shown.returncode == 1  # failures make `testhide tests` fail too
    cases = {c["name"]: c for c in json.loads(shown.stdout)["cases"]}
    assert set(cases) == {"test_adds", "test_breaks", "test_later"}
    assert cases["test_adds"]["status"] == "PASSED"
    assert cases["test_later"]["status"] == "SKIPPED"
    assert "expected" in cases["test_breaks"]["message"]
    assert cases["test_breaks"]["classname"] == "test_sample"


async def test_hostile_reports_are_refused_without_expansion(docker_agent: Agent, cli: Cli) -> None:
    xxe = (
        '<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<testsuite name="x"><testcase name="&x;"/></testsuite>'
    )
    script = (
        f"mkdir -p r && printf '%s' '{xxe}' > r/evil.xml"
        ' && echo \'<testsuite name="s"><testcase name="ok"/></testsuite>\' > r/good.xml'
    )
    result = await cli("run", "--junit", "r/*.xml", "--image", JOB_IMAGE, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert b"report refused: r/evil.xml" in result.stderr
    assert b"tests: 1 total, 1 passed" in result.stderr
    assert b"root:" not in result.stderr + result.stdout
