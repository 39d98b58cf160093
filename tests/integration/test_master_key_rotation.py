"""Master-key rotation while the control plane serves and an agent runs jobs:
everything stored before stays readable, new jobs work, and afterwards no
stored key or sealed file is wrapped by the old key."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from testhide.agent.daemon import Agent
from testhide.controlplane.atrest import sealed_by
from testhide.controlplane.datadir import DataDir
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, operator

pytestmark = pytest.mark.docker

BEFORE = (
    'echo "before-$((6 * 7))"; mkdir -p out; echo "artifact-$((7 * 8))" > out/a.txt;'
    ' printf %s "$TOKEN" | wc -c'
)
DURING = 'i=0; while [ $i -lt 25 ]; do echo "tick-$i"; i=$((i + 1)); sleep 0.1; done'


def stored_key_ids(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "testhide.db") as conn:
        wrapped = [
            r[0]
            for query in (
                "SELECT data_key FROM jobs",
                "SELECT data_key FROM blobs",
                "SELECT data_key FROM secrets",
            )
            for r in conn.execute(query)
        ]
    directory = DataDir(data_dir)
    return {sealed_by(bytes(w)) for w in wrapped} | {
        sealed_by((data_dir / name).read_bytes()) for name in directory.sealed_files()
    }


async def test_rotation_while_serving_keeps_old_data_readable_and_leaves_no_old_key(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    assert (await cli("secrets", "set", "TOKEN", stdin=b"s3cret!")).returncode == 0
    before = await cli(
        "run", "--secret", "TOKEN", "--artifacts", "out/*", "--image", JOB_IMAGE, "--", "sh", "-c", BEFORE
    )
    assert before.returncode == 0, before.stderr
    assert b"before-42\n" in before.stdout
    assert b"7\n" in before.stdout
    old_job = before.stderr.split(b"job ")[1].split()[0].decode()
    old_key = DataDir(cp.data_dir).master_key().current_id

    during = await cli.start("run", "--image", JOB_IMAGE, "--", "sh", "-c", DURING)
    code, _, err = await operator("master-key", "rotate", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    during_out, during_err = await during.communicate()
    assert during.returncode == 0, during_err
    assert during_out == b"".join(f"tick-{i}\n".encode() for i in range(25))

    new_key = DataDir(cp.data_dir).master_key().key_ids
    assert len(new_key) == 1
    assert new_key[0] != old_key
    assert f"{old_key} removed from the ring" in err
    assert stored_key_ids(cp.data_dir) == {new_key[0]}

    logs = await cli("logs", old_job)
    assert logs.returncode == 0
    assert logs.stdout == before.stdout
    downloaded = await cli("artifacts", old_job, "-o", str(tmp_path / "dl"))
    assert downloaded.returncode == 0
    assert (tmp_path / "dl" / "out" / "a.txt").read_text() == "artifact-56\n"
    # The log masks the value itself, so the job prints it transformed.
    after = await cli(
        "run", "--secret", "TOKEN", "--image", JOB_IMAGE, "--", "sh", "-c", 'printf %s "$TOKEN" | tr a-z A-Z'
    )
    assert after.returncode == 0
    assert after.stdout == b"S3CRET!"
    assert stored_key_ids(cp.data_dir) == {new_key[0]}

    code, _, err = await operator("audit", "verify", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    _, exported, _ = await operator("audit", "export", "--data-dir", str(cp.data_dir))
    rotated = [json.loads(line) for line in exported.splitlines() if '"master_key_rotated"' in line]
    assert rotated
    assert rotated[0]["target"] == new_key[0]
    assert rotated[0]["details"]["retired"] == [old_key]


async def test_a_second_rotation_and_status(cp: RunningControlPlane) -> None:
    """Back-to-back rotations while serving; status names what each key seals."""
    for _ in range(2):
        code, _, err = await operator("master-key", "rotate", "--data-dir", str(cp.data_dir))
        assert code == 0, err
    ring = DataDir(cp.data_dir).master_key()
    code, out, _ = await operator("master-key", "status", "--data-dir", str(cp.data_dir))
    assert code == 0
    assert f"current {ring.current_id}" in out
    assert "serve pid" in out
    assert f"holds {ring.current_id}" in out
    assert stored_key_ids(cp.data_dir) == {ring.current_id}
