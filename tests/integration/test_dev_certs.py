"""Development material from certs-dev/ is refused unless asked for."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from tests.harness import REPO


async def run(*args: str, cwd: Path = REPO) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_dev_ca_needs_the_dev_flag_at_init_and_serve(tmp_path: Path) -> None:
    shutil.copytree(REPO / "certs-dev", tmp_path / "certs-dev", ignore=shutil.ignore_patterns("out"))
    code, out = await run("bash", str(tmp_path / "certs-dev" / "generate.sh"))
    assert code == 0, out
    cert, key = tmp_path / "certs-dev/out/dev-ca.pem", tmp_path / "certs-dev/out/dev-ca.key"
    cp = [sys.executable, "-m", "testhide.controlplane.cli"]

    code, out = await run(*cp, "init", "--data-dir", str(tmp_path / "a"), "--import-ca", str(cert), str(key))
    assert code == 1
    assert "development material" in out
    assert not (tmp_path / "a").exists()

    code, out = await run(
        *cp, "init", "--data-dir", str(tmp_path / "b"), "--import-ca", str(cert), str(key), "--dev"
    )
    assert code == 0, out
    assert (tmp_path / "b" / "ca.pem").read_bytes() == cert.read_bytes()

    code, out = await run(*cp, "serve", "--data-dir", str(tmp_path / "b"), "--listen", "127.0.0.1:0")
    assert code == 1
    assert "--dev" in out
    assert "Traceback" not in out
