"""Every line `serve --log-format json` writes is JSON: gRPC's C core, which
writes its own lines to stderr (a refused TLS handshake, say), is silent
unless GRPC_VERBOSITY asks for it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from testhide.controlplane.datadir import initialise
from tests.harness import REPO, free_port

pytestmark = pytest.mark.timeout(120)


def refused_handshake(port: int) -> None:
    """Plain HTTP at a TLS port, read until the server closes: it has given up on the handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: testhide\r\n\r\n")
        while sock.recv(4096):
            pass


async def serve_json_lines(tmp_path: Path, verbosity: str | None) -> list[str]:
    data_dir = tmp_path / "controlplane"
    if not data_dir.exists():
        await initialise(data_dir, ["localhost", "127.0.0.1"])
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if verbosity is not None:
        env["GRPC_VERBOSITY"] = verbosity
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testhide.controlplane.cli",
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{api_port}",
        "--log-format",
        "json",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        started, line = b"", b""
        while b"controlplane_started" not in line:  # logged once both ports serve, with their numbers
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, f"serve ended before it started: {started!r}"
            started += line
        bound = json.loads(line)
        for port in (bound["api_port"], bound["agent_port"]):
            await asyncio.to_thread(refused_handshake, port)
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    return [line for line in (started + rest).decode().splitlines() if line.strip()]


async def test_every_line_of_serve_log_format_json_is_json(tmp_path: Path) -> None:
    lines = await serve_json_lines(tmp_path, verbosity=None)
    for line in lines:
        json.loads(line)  # raises on a line that is not JSON
    events = [json.loads(line)["event"] for line in lines]
    assert events[0] == "controlplane_started"
    assert events[-1] == "controlplane_stopped"


async def test_gRPC_core_lines_come_back_when_asked_for(tmp_path: Path) -> None:
    """The control: the same refused handshakes with the C core's logging on write non-JSON lines."""
    lines = await serve_json_lines(tmp_path, verbosity="INFO")
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert any("Handshake failed" in line for line in not_json), lines
