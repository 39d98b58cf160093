"""Errors that point the right way: each failure below is one line on stderr
that names the cause and the fix, printed once, with none of gRPC's own
C-core lines (unless --debug). The CLI is a subprocess and its stderr is
read whole, against a real control plane."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "fresh-config")


async def test_an_untrusted_certificate_says_so_and_names_ca_file(
    cp: RunningControlPlane, fresh: Cli
) -> None:
    result = await fresh("login", "--server", cp.api_target, "--api-key", cp.admin_key)
    assert result.returncode == 125
    line = one_line(result.stderr)
    assert line.startswith(f"Error: the control plane at {cp.api_target} presented a certificate")
    assert "this machine does not trust" in line
    assert "'testhide login --ca-file FILE'" in line
    assert "is the control plane running" not in line


async def test_debug_shows_what_the_one_line_leaves_out(cp: RunningControlPlane, fresh: Cli) -> None:
    """The silence is ours: with --debug gRPC's C core speaks again, and the traceback shows."""
    result = await fresh("--debug", "login", "--server", cp.api_target, "--api-key", cp.admin_key)
    assert result.returncode == 125
    err = result.stderr.decode()
    assert "ssl_transport_security" in err or "Handshake failed" in err, err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("Error: the control plane at")


async def test_a_ca_file_that_is_not_pem_is_refused_at_login(
    cp: RunningControlPlane, fresh: Cli, tmp_path: Path
) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a not a certificate")
    result = await fresh(
        "login", "--server", cp.api_target, "--api-key", cp.admin_key, "--ca-file", str(not_pem)
    )
    assert result.returncode == 125
    assert one_line(result.stderr) == (
        f"Error: {not_pem} is not a PEM CA certificate (expected -----BEGIN CERTIFICATE-----)"
    )


async def test_the_agent_port_is_named_with_the_port_to_use(cp: RunningControlPlane, fresh: Cli) -> None:
    ca_file = str(cp.data_dir / "ca.pem")
    result = await fresh(
        "login", "--server", cp.agent_target, "--api-key", cp.admin_key, "--ca-file", ca_file
    )
    assert result.returncode == 125
    line = one_line(result.stderr)
    assert f"{cp.agent_target} is the control plane's agent port (mutual TLS, for agents)" in line
    assert "API port" in line
    assert "--listen" in line
    assert "Socket closed" not in line


async def test_a_password_without_a_terminal_asks_for_another_way(
    cp: RunningControlPlane, fresh: Cli
) -> None:
    fresh.env.pop("TESTHIDE_PASSWORD", None)
    result = await fresh("login", "--server", cp.api_target, "--user", "ada")
    assert result.returncode == 125
    assert one_line(result.stderr) == (
        "Error: no terminal to ask for the password: set TESTHIDE_PASSWORD or use --password-stdin"
    )


async def test_a_password_from_stdin_logs_in(cp: RunningControlPlane, fresh: Cli) -> None:
    from tests.harness import operator

    code, _, err = await operator(
        "users", "create", "--data-dir", str(cp.data_dir), "ada", stdin=b"Correct-Horse-42\n"
    )
    assert code == 0, err
    ca_file = str(cp.data_dir / "ca.pem")
    result = await fresh(
        "login", "--server", cp.api_target, "--user", "ada", "--password-stdin", "--ca-file", ca_file,
        stdin=b"Correct-Horse-42\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    who = json.loads((await fresh("whoami", "--json")).stdout)
    assert (who["principal_kind"], who["principal_id"], who["amr"]) == ("user", "ada", ["pwd"])


@pytest.mark.docker
async def test_a_command_missing_from_the_image_is_one_line_once(docker_agent: Agent, cli: Cli) -> None:
    result = await cli("run", "--image", JOB_IMAGE, "--no-workspace", "--", "nosuch")
    assert result.returncode == 127, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert lines[0].startswith("job "), lines
    assert lines[0].endswith(" queued"), lines
    job_id = lines[0].split()[1]
    assert lines[1:] == [f"job {job_id} ERROR: command 'nosuch' not found in image {JOB_IMAGE}"]
    shown = await cli("jobs", "show", job_id)
    assert b"OCI runtime" not in shown.stdout


@pytest.mark.docker
async def test_an_image_the_agent_does_not_have_is_said_once(docker_agent: Agent, cli: Cli) -> None:
    """The agent logs a job it could not set up as a `testhide:` line; `run` does not repeat it."""
    result = await cli("run", "--image", "testhide/nosuch:1", "--no-workspace", "--", "true")
    assert result.returncode == 125, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert lines[0].endswith(" queued"), lines
    job_id = lines[0].split()[1]
    reason, status = lines[1:]
    assert reason.startswith("testhide: "), lines
    assert "testhide/nosuch:1" in reason, lines
    assert status == f"job {job_id} ERROR"
