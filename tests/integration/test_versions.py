"""Every program says its version, and the control plane shows what each agent runs."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from testhide import __version__
from testhide.agent.runtime.fake import FakeRuntime
from tests.harness import REPO, RunningControlPlane, operator, running_agent


@pytest.mark.parametrize(
    ("module", "program"),
    [
        ("testhide.cli.main", "testhide"),
        ("testhide.controlplane.cli", "testhide-controlplane"),
        ("testhide.agent.cli", "testhide-agent"),
    ],
)
async def test_each_program_prints_its_version(module: str, program: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--version", cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert out.decode() == f"{program} {__version__}\n"


async def test_agents_list_shows_the_version_from_the_agents_hello(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    async with running_agent(cp, tmp_path, FakeRuntime()) as agent:
        code, listed, err = await operator("agents", "list", "--json", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        versions = {a["id"]: a["version"] for a in json.loads(listed)}
        assert versions == {agent.agent_id: __version__}
        code, table, err = await operator("agents", "list", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        assert "VERSION" in table.splitlines()[0]
        assert __version__ in table
