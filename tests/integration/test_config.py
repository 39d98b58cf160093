"""The daemons as operators run them: settings from a TOML file, and SIGHUP,
which reloads the file and the certificates instead of killing the process.
Real processes, real signals; the in-process control plane for what a signal
cannot show (that the certificate reload happens at once, not at the next tick)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.credentials import Credentials
from testhide.controlplane import daemon as daemon_module
from testhide.controlplane.datadir import initialise
from tests.harness import (
    REPO,
    Cli,
    ControlPlaneProcess,
    RunningControlPlane,
    control_plane,
    enrolled,
    eventually,
    free_port,
    operator,
)


class Daemon:
    """``python -m MODULE ARGS`` in its own process, with its log in a file and
    none of the caller's TESTHIDE_* variables."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, module: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESTHIDE_")}
        with await asyncio.to_thread(self.log_path.open, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                cwd=REPO,
                env={**env, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=log,
            )

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of event ``name`` (key=value lines are skipped)."""
        found = [json.loads(line) for line in self.lines() if line.startswith("{")]
        return [event for event in found if event.get("event") == name]

    async def logged(self, name: str, count: int = 1, within: float = 30) -> dict[str, Any]:
        """The ``count``-th JSON line of event ``name``, once it is there."""
        events = await eventually(lambda: len(self.events(name)) >= count, within, f"{count}x {name}")
        assert events
        return self.events(name)[count - 1]

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)


def settings(path: Path, **values: str | int) -> Path:
    """A config file of these settings (a JSON string or integer is TOML too)."""
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


async def test_serve_reloads_its_config_file_on_sighup(tmp_path: Path) -> None:
    data_dir = tmp_path / "controlplane"
    await initialise(data_dir, ["localhost", "127.0.0.1"])
    base = {"data-dir": str(data_dir), "listen": "127.0.0.1:0", "agent-listen": "127.0.0.1:0"}
    config = settings(tmp_path / "serve.toml", **base, **{"log-level": "warning"})
    ports = tmp_path / "ports.json"
    serve = Daemon(tmp_path / "serve.log")
    await serve.start(
        "testhide.controlplane.cli", "serve", "--config", str(config), "--port-file", str(ports)
    )
    try:
        await eventually(lambda: ports.exists() or not serve.alive, 60, "the control plane serving")
        assert serve.alive, serve.lines()
        assert not [line for line in serve.lines() if "controlplane_started" in line], "logged below warning"

        settings(config, **base, **{"log-level": "info", "log-format": "json", "job-lease": "30s"})
        serve.signal(signal.SIGHUP)
        reloaded = await serve.logged("config_reloaded")
        assert (reloaded["config_file"], reloaded["new_level"], reloaded["new_format"]) == (
            str(config),
            "info",
            "json",
        )
        [restart] = serve.events("config_change_needs_restart")
        assert restart["settings"] == ["job-lease"]

        config.write_text('log-level = "debug"\nnot_a_setting = 1\n')
        serve.signal(signal.SIGHUP)
        failed = await serve.logged("config_reload_failed")  # still JSON: the old settings stay
        assert "unknown setting not_a_setting" in failed["error"]
        assert str(config) in failed["error"]
        assert serve.alive
    finally:
        code = await serve.stop()
    assert code == 0, serve.lines()
    assert serve.events("controlplane_stopped"), "an info line, logged at the level kept from before"
    assert not [line for line in serve.lines() if "Traceback" in line], serve.lines()


async def test_sighup_without_a_config_file_leaves_serve_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    process = ControlPlaneProcess(data_dir, free_port(), free_port())
    await process.start()

    def reloads() -> int:
        return process.log_path.read_text().count("config_reloaded")

    try:
        for count in (1, 2):
            assert process.process is not None
            process.process.send_signal(signal.SIGHUP)
            await eventually(lambda: reloads() >= count, 30, f"reload {count}")  # noqa: B023
        # Still serving: an operator logs in.
        result = await Cli(tmp_path / "cli")(
            "login",
            "--server",
            f"127.0.0.1:{process.api_port}",
            "--api-key",
            admin_key,
            "--ca-file",
            str(data_dir / "ca.pem"),
        )
        assert result.returncode == 0, result.stderr
    finally:
        code = await process.terminate()
    assert code == 0


async def test_reload_picks_up_a_rotated_server_certificate_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the reload, the watcher would look again only in an hour.
    monkeypatch.setattr(daemon_module, "WATCH_INTERVAL", timedelta(hours=1))
    async with control_plane(tmp_path) as cp:
        certs = cp.daemon.certificates
        assert certs is not None
        before = certs.current.server_certificate.serial_number
        code, _, err = await operator("server-cert", "rotate", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        assert certs.current.server_certificate.serial_number == before
        cp.daemon.reload()
        await eventually(
            lambda: certs.current.server_certificate.serial_number != before, 10, "the new certificate in use"
        )


@pytest.mark.docker
async def test_agent_run_reloads_its_config_and_checks_its_credentials_on_sighup(
    cp: RunningControlPlane, tmp_path: Path, docker_client: Any
) -> None:
    data_dir = await enrolled(cp, tmp_path)
    agent_id = Credentials.load(data_dir).agent_id
    base: dict[str, str | int] = {"data-dir": str(data_dir), "log-format": "json"}
    config = settings(tmp_path / "agent.toml", **base, **{"log-level": "warning"})
    agent = Daemon(tmp_path / "agent.log")
    await agent.start("testhide.agent.cli", "run", "--config", str(config))
    try:
        assert cp.daemon.scheduler is not None
        await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent_id), 60)
        assert not agent.events("runtimes_offered"), "an info line, logged below warning"

        settings(config, **base, **{"log-level": "info"}, max_jobs=2)
        agent.signal(signal.SIGHUP)
        reloaded = await agent.logged("config_reloaded")
        assert reloaded["new_level"] == "info"
        [restart] = agent.events("config_change_needs_restart")
        assert restart["settings"] == ["max-jobs"]
        checked = await agent.logged("credentials_checked")
        assert (checked["agent_id"], checked["newer"]) == (agent_id, False)

        (data_dir / "agent.key").chmod(0o644)  # a mistake an operator can make
        config.write_text("max-jobs = 'many'\n")
        agent.signal(signal.SIGHUP)
        failed = await agent.logged("config_reload_failed")
        assert "max-jobs" in failed["error"]
        unreadable = await agent.logged("credentials_unreadable")
        assert "chmod 600" in unreadable["error"]
        assert agent.alive
        (data_dir / "agent.key").chmod(0o600)
        session = cp.daemon.scheduler.session_of(agent_id)
        assert session is not None, "the agent is still connected"
    finally:
        code = await agent.stop()
    assert code == 0, agent.lines()
