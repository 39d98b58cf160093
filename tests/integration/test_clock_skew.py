"""An agent whose clock is a minute off still enrolls, connects and renews:
certificates are backdated (agent certificates 30 s, server certificates 5
minutes). The agent runs as a real process under libfaketime."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tests.harness import REPO, RunningControlPlane, control_plane, operator

LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None and not os.environ.get("CI"),
    reason="libfaketime (Debian package faketime) not installed",
)


async def agent_process(skew: str, *args: str) -> asyncio.subprocess.Process:
    """The agent with its clock shifted. The library is preloaded directly (the
    faketime wrapper forks, and a signal to it would orphan the agent)."""
    assert LIBFAKETIME is not None, "install Debian's faketime"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": skew,
        "FAKETIME_DONT_RESET": "1",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testhide.agent.cli",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def enroll_skewed(cp: RunningControlPlane, skew: str, data_dir: Path) -> tuple[int, str]:
    process = await agent_process(
        skew,
        "enroll",
        "--server",
        cp.api_target,
        "--token",
        await cp.enrollment_token(),
        "--data-dir",
        str(data_dir),
        "--name",
        "skewed",
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


@pytest.mark.parametrize("skew", ["-60s", "+60s"])
@pytest.mark.timeout(120)
async def test_a_minute_of_skew_still_enrolls_connects_and_renews(tmp_path: Path, skew: str) -> None:
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=20)) as cp:
        # A server certificate issued this instant: the hardest case for a slow clock.
        code, _, err = await operator("server-cert", "rotate", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        scheduler = cp.daemon.scheduler
        assert scheduler is not None
        code, out = await enroll_skewed(cp, skew, tmp_path / "agent")
        assert code == 0, out
        agent_id = json.loads((tmp_path / "agent" / "agent.json").read_text())["agent_id"]
        process = await agent_process(skew, "run", "--data-dir", str(tmp_path / "agent"))
        try:
            first = await asyncio.wait_for(scheduler.wait_for_agent(agent_id), 30)
            renewed = await asyncio.wait_for(scheduler.wait_for_agent(agent_id, replacing=first), 60)
            assert renewed.cert_serial != first.cert_serial  # it renewed and reconnected with the new one
        finally:
            process.terminate()
            output, _ = await asyncio.wait_for(process.communicate(), 30)
            print(output.decode())


async def test_ten_minutes_behind_is_refused_by_the_tls_stack(tmp_path: Path) -> None:
    """The control for the test above: beyond the backdate gRPC's own TLS
    handshake refuses the server certificate, so the faked clock really
    reaches the TLS stack and the minute of skew above was really tested."""
    async with control_plane(tmp_path) as cp:
        code, out = await enroll_skewed(cp, "+0s", tmp_path / "agent")
        assert code == 0, out
        process = await agent_process("-10m", "run", "--data-dir", str(tmp_path / "agent"))
        try:
            assert process.stdout is not None
            while True:
                line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
                assert line, "agent exited without trying to connect"
                assert "agent_connected" not in line
                if "controlplane_unreachable" in line:
                    break
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
