"""What the control plane stores is encrypted: a search of every file of the
data dir (database, WAL, keys) for known plaintext finds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane

pytestmark = pytest.mark.docker

SECRET = "plaintext-canary-secret-7f3a9c"
WORKSPACE_TEXT = "plaintext-canary-workspace-51be"


async def test_secrets_logs_workspaces_and_artifacts_are_not_stored_in_the_clear(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    assert (await cli("secrets", "set", "CANARY", stdin=SECRET.encode())).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "input.txt").write_text(WORKSPACE_TEXT + "\n")
    # The log line and the artifact are computed in the job, so the command line holds neither.
    script = (
        'echo "log-canary-$((6 * 7))-line"; mkdir -p out; echo "artifact-canary-$((7 * 8))" > out/a.txt;'
        ' cat input.txt; echo "$CANARY" | wc -c'
    )
    result = await cli(
        "run",
        "--secret",
        "CANARY",
        "--artifacts",
        "out/*",
        "--image",
        JOB_IMAGE,
        "--",
        "sh",
        "-c",
        script,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert b"log-canary-42-line" in result.stdout
    assert WORKSPACE_TEXT.encode() in result.stdout
    job_id = (await cli("jobs", "list", "--json")).stdout.split(b'"id": "')[1].split(b'"')[0].decode()
    downloaded = await cli("artifacts", job_id, "-o", str(tmp_path / "dl"))
    assert downloaded.returncode == 0
    assert (tmp_path / "dl" / "out" / "a.txt").read_text() == "artifact-canary-56\n"

    canaries = [SECRET.encode(), b"log-canary-42-line", WORKSPACE_TEXT.encode(), b"artifact-canary-56"]
    files = [p for p in cp.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("testhide.db") for p in files)
    for path in files:
        content = path.read_bytes()
        for canary in canaries:
            assert canary not in content, f"{canary!r} in clear in {path.relative_to(cp.data_dir)}"
