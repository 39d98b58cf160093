"""``testhide-agent doctor`` and ``testhide-controlplane doctor`` as operators run
them: healthy, both exit 0 with every check ok; then one thing broken at a
time, and the line that names it says FAIL and the exit status is 1."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from docker import DockerClient

from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.controlplane.datadir import DataDir
from tests.harness import REPO, RunningControlPlane, control_plane, enrolled, free_port, unavailable


async def doctor(
    program: str, *args: str, env: dict[str, str] | None = None, within: float = 90
) -> tuple[int, str, str]:
    """``testhide-agent doctor`` or ``testhide-controlplane doctor`` in a subprocess."""
    module = {"agent": "testhide.agent.cli", "controlplane": "testhide.controlplane.cli"}[program]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "doctor",
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), within)
    return process.returncode or 0, out.decode(), err.decode()


def line(out: str, check: str) -> str:
    """The one line of ``check``."""
    found = [text for text in out.splitlines() if text[6:].startswith(f"{check}:")]
    assert len(found) == 1, f"no single line for {check!r} in:\n{out}"
    return found[0]


def listening(cp: RunningControlPlane) -> tuple[str, ...]:
    return ("--data-dir", str(cp.data_dir), "--listen", cp.api_target, "--agent-listen", cp.agent_target)


def no_docker(tmp_path: Path) -> dict[str, str]:
    """For checks that do not need Docker: an engine address where none answers."""
    return {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}


@pytest.mark.docker
async def test_healthy_control_plane_and_agent_pass_every_check(
    cp: RunningControlPlane, tmp_path: Path, docker_client: DockerClient
) -> None:
    agent_dir = await enrolled(cp, tmp_path)

    code, out, err = await doctor("controlplane", *listening(cp), "--json", "--strict")
    report = json.loads(out)
    assert code == 0, out + err
    assert report["ok"] is True
    assert [c for c in report["checks"] if c["status"] != "OK"] == []
    checks = {c["check"] for c in report["checks"]}
    assert {"data dir", "files", "master key", "store", "server certificate", "disk"} <= checks
    assert f"API port {cp.api_target}" in checks
    assert f"agent port {cp.agent_target}" in checks

    code, out, err = await doctor("agent", "--data-dir", str(agent_dir), "--strict")
    assert code == 0, out + err
    assert all(text.startswith("ok    ") for text in out.splitlines()), out
    assert "health SERVING" in line(out, f"API {cp.api_target}")
    assert "mutual TLS" in line(out, f"agent port {cp.agent_target}")
    assert "seccomp enforced" in line(out, "runtime runc")
    assert "API 1." in line(out, "docker")
    for check in ("data dir", "credentials", "certificate", "clock", "disk spool"):
        line(out, check)


async def test_control_plane_data_dir_0755_fails(cp: RunningControlPlane) -> None:
    cp.data_dir.chmod(0o755)
    try:
        code, out, _ = await doctor("controlplane", *listening(cp))
    finally:
        cp.data_dir.chmod(0o700)
    assert code == 1
    assert line(out, "data dir").startswith("FAIL  data dir:")
    assert "mode 0755" in out
    assert f"fix: chmod 700 {cp.data_dir}" in out
    assert line(out, "store").startswith("ok")


async def test_missing_master_key_fails(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        pass
    (cp.data_dir / "master.key").rename(tmp_path / "master.key")
    ports = ("--listen", f"127.0.0.1:{free_port()}", "--agent-listen", f"127.0.0.1:{free_port()}")

    code, out, _ = await doctor("controlplane", "--data-dir", str(cp.data_dir), *ports)
    assert code == 1
    assert line(out, "master key").startswith("FAIL  master key:")
    assert "TESTHIDE_MASTER_KEY is not set" in out
    assert line(out, f"API port {ports[1]}").startswith("ok")  # no serve runs: the ports are free

    # Another key opens nothing: the line says so.
    wrong = base64.b64encode(os.urandom(32)).decode()
    env = {"TESTHIDE_MASTER_KEY": wrong}
    code, out, _ = await doctor("controlplane", "--data-dir", str(cp.data_dir), *ports, env=env)
    assert code == 1
    assert "it does not open" in line(out, "master key")

    # The right key in front of another, as during a rotation: a warning, which only --strict fails.
    right = (tmp_path / "master.key").read_text().strip()
    env = {"TESTHIDE_MASTER_KEY": f"{wrong},{right}"}
    code, out, _ = await doctor("controlplane", "--data-dir", str(cp.data_dir), *ports, env=env)
    assert code == 0, out
    assert line(out, "master key").startswith("warn  master key:")
    code, _, _ = await doctor("controlplane", "--data-dir", str(cp.data_dir), *ports, "--strict", env=env)
    assert code == 1


async def test_port_held_by_another_process_fails(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        pass
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = f"127.0.0.1:{squatter.getsockname()[1]}"
        code, out, _ = await doctor(
            "controlplane", "--data-dir", str(cp.data_dir), "--listen", taken, "--agent-listen", "127.0.0.1:0"
        )
    assert code == 1
    assert line(out, f"API port {taken}").startswith("FAIL")
    assert "in use by another process" in out


async def test_postgres_store_is_checked_without_migrating(tmp_path: Path, pg_url: str) -> None:
    async with control_plane(tmp_path, database_url=pg_url) as cp:
        code, out, _ = await doctor("controlplane", *listening(cp))
        assert code == 0, out
        assert "PostgreSQL" in line(out, "store")
        assert "(current)" in out
        assert line(out, "clock").startswith("ok    clock: the database server's clock is")

        (cp.data_dir / "database.url").chmod(0o644)
        code, out, _ = await doctor("controlplane", *listening(cp))
    assert code == 1
    assert line(out, "files").startswith("FAIL")
    assert "database.url (0644)" in out
    assert line(out, "store").startswith("FAIL  store:")


async def test_unreachable_control_plane_address_fails(cp: RunningControlPlane, tmp_path: Path) -> None:
    agent_dir = await enrolled(cp, tmp_path)
    closed = f"127.0.0.1:{free_port()}"
    credentials = Credentials.load(agent_dir)
    replace(credentials, api_endpoints=(cp.api_target, closed)).save(agent_dir)

    code, out, _ = await doctor("agent", "--data-dir", str(agent_dir), env=no_docker(tmp_path))
    assert code == 1
    assert line(out, f"API {closed}").startswith(f"FAIL  API {closed}: cannot connect: Connection refused")
    assert "is serve running there?" in line(out, f"API {closed}")
    assert line(out, f"API {cp.api_target}").startswith("ok")
    assert line(out, f"agent port {cp.agent_target}").startswith("ok")


async def test_expired_agent_certificate_fails(cp: RunningControlPlane, tmp_path: Path) -> None:
    agent_dir = await enrolled(cp, tmp_path)
    credentials = Credentials.load(agent_dir)
    # A certificate the control plane's CA issued two hours ago for one hour: an agent offline since.
    directory = DataDir(cp.data_dir)
    ca = directory.load_ca(directory.master_key())
    key_pem, csr_pem = new_key_and_csr()
    issued_at = datetime.now(UTC) - timedelta(hours=2)
    issued = ca.issue_agent(
        csr_pem, AgentIdentity.from_certificate(credentials.certificate), timedelta(hours=1), issued_at
    )
    replace(credentials, key_pem=key_pem, certificate_pem=issued.certificate_pem, received_at=issued_at).save(
        agent_dir
    )

    code, out, _ = await doctor("agent", "--data-dir", str(agent_dir), env=no_docker(tmp_path))
    assert code == 1
    certificate = line(out, "certificate")
    assert certificate.startswith("FAIL  certificate:")
    assert "expired at" in certificate
    assert "enroll this agent again" in certificate
    # The control plane refuses it too.
    assert line(out, f"agent port {cp.agent_target}").startswith("FAIL")
    assert line(out, "clock").startswith("ok")


async def test_docker_host_pointing_nowhere_fails(cp: RunningControlPlane, tmp_path: Path) -> None:
    agent_dir = await enrolled(cp, tmp_path)
    env = no_docker(tmp_path)
    code, out, _ = await doctor("agent", "--data-dir", str(agent_dir), env=env)
    assert code == 1
    docker = line(out, "docker")
    assert docker.startswith(f"FAIL  docker: cannot reach the Docker engine at {env['DOCKER_HOST']}")
    assert "fix: start it" in docker


async def test_agent_data_dir_open_to_others_fails(cp: RunningControlPlane, tmp_path: Path) -> None:
    agent_dir = await enrolled(cp, tmp_path)
    agent_dir.chmod(0o755)
    (agent_dir / "agent.key").chmod(0o644)
    code, out, _ = await doctor("agent", "--data-dir", str(agent_dir), "--json", env=no_docker(tmp_path))
    checks: dict[str, Any] = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 1
    assert checks["data dir"]["status"] == "FAIL"
    assert checks["data dir"]["fix"] == f"chmod 700 {agent_dir}"
    assert checks["credentials"]["status"] == "FAIL"
    assert checks["credentials"]["fix"] == f"chmod 600 {agent_dir / 'agent.key'}"


async def test_spool_on_nearly_full_filesystem_fails(cp: RunningControlPlane, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    agent_dir = await enrolled(cp, tmp_path)
    spool = agent_dir / "spool"
    spool.mkdir(mode=0o700)
    mounted = await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(spool)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (spool / "filler").write_bytes(b"\0" * 6 * 1024 * 1024)
        code, out, _ = await doctor(
            "agent", "--data-dir", str(agent_dir), "--spool-max", "4MiB", env=no_docker(tmp_path)
        )
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(spool)], check=True)
    assert code == 1
    spool_line = line(out, "disk spool")
    assert spool_line.startswith("FAIL  disk spool:")
    assert "less than --spool-max (4MiB)" in spool_line
