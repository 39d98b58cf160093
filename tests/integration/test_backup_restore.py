"""Nothing lost: a backup taken while the control plane serves, the data dir
destroyed, the backup restored: the same jobs, logs (byte for byte), test
results, artifacts and agents are back, and the agent enrolled before the
backup runs a new job on the restored control plane."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from docker import DockerClient

from testhide.agent.config import AgentConfig
from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from tests.harness import JOB_IMAGE, Cli, control_plane, operator, running_agent, serving

pytestmark = [pytest.mark.chaos, pytest.mark.docker]

JOB = (
    'echo "line-$((6 * 7))"; echo "to-stderr" >&2; mkdir -p out r; echo "artifact-$((7 * 8))" > out/a.txt;'
    ' echo \'<testsuite name="s"><testcase name="ok"/><testcase name="bad"><failure message="no"/>'
    "</testcase></testsuite>' > r/junit.xml"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_backup_while_serving_then_restore_after_losing_the_data_dir(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    ports = {"listen": f"127.0.0.1:{free_port()}", "agent_listen": f"127.0.0.1:{free_port()}"}
    runtime = DockerRuntime(docker_client)
    cli = Cli(tmp_path / "config")
    backup, kept_key = tmp_path / "offsite" / "cp.thb", tmp_path / "key-safe" / "master.key"
    async with (
        control_plane(tmp_path, **ports) as cp,
        running_agent(cp, tmp_path, runtime, name="old", stop_grace=timedelta(seconds=1)) as agent,
    ):
        assert (await cli.login(cp)).returncode == 0
        first = await cli(
            "run", "--artifacts", "out/*", "--junit", "r/*.xml", "--image", JOB_IMAGE, "--", "sh", "-c", JOB
        )
        assert first.returncode == 0, first.stderr
        job_id = first.stderr.split(b"job ")[1].split()[0].decode()
        jobs_before = json.loads((await cli("jobs", "list", "--json")).stdout)
        tests_before = (await cli("tests", job_id, "--json")).stdout
        code, _, err = await operator("backup", "--data-dir", str(cp.data_dir), "--out", str(backup))
        assert code == 0, err
        assert "master key is NOT in this backup" in err
        agent_id, data_dir = agent.agent_id, cp.data_dir
    kept_key.parent.mkdir()
    shutil.copy(data_dir / "master.key", kept_key)
    shutil.rmtree(data_dir)  # the disk is gone

    code, _, err = await operator(
        "restore", "--from", str(backup), "--data-dir", str(data_dir), "--master-key-file", str(kept_key)
    )
    assert code == 0, err
    async with serving(data_dir, cp.admin_key, **ports) as restored:
        assert restored.daemon.scheduler is not None
        old_agent = Agent(
            AgentConfig(data_dir=tmp_path / "agent-old", stop_grace=timedelta(seconds=1)), runtime
        )
        task = asyncio.create_task(old_agent.run())
        try:
            await asyncio.wait_for(restored.daemon.scheduler.wait_for_agent(agent_id), 30)
            assert json.loads((await cli("jobs", "list", "--json")).stdout) == jobs_before
            logs = await cli("logs", job_id)
            assert (logs.stdout, logs.stderr) == (first.stdout, b"to-stderr\n")
            assert (await cli("tests", job_id, "--json")).stdout == tests_before
            assert (await cli("artifacts", job_id, "-o", str(tmp_path / "dl"))).returncode == 0
            assert (tmp_path / "dl" / "out" / "a.txt").read_text() == "artifact-56\n"
            again = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "echo after-restore")
            assert again.returncode == 0, again.stderr
            assert again.stdout == b"after-restore\n", again.stderr
        finally:
            old_agent.shutdown()
            await asyncio.wait_for(task, 60)
    _, listed, _ = await operator("agents", "list", "--json", "--data-dir", str(data_dir))
    assert [a["id"] for a in json.loads(listed)] == [agent_id]
    code, _, err = await operator("audit", "verify", "--data-dir", str(data_dir))
    assert code == 0, err
    _, exported, _ = await operator("audit", "export", "--data-dir", str(data_dir))
    assert '"backup_restored"' in exported


async def test_a_tampered_backup_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        backup = tmp_path / "cp.thb"
        code, _, err = await operator("backup", "--data-dir", str(cp.data_dir), "--out", str(backup))
        assert code == 0, err
        assert backup.stat().st_mode & 0o777 == 0o600
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x10
    backup.write_bytes(bytes(data))
    target = tmp_path / "restore-here"
    code, _, err = await operator(
        "restore",
        "--from",
        str(backup),
        "--data-dir",
        str(target / "dd"),
        "--master-key-file",
        str(cp.data_dir / "master.key"),
    )
    assert code == 1, err
    assert "failed authentication" in err or "damaged" in err, err
    assert not target.exists() or list(target.iterdir()) == []
