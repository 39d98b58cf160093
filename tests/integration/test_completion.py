"""Shell completion through click's protocol, as bash runs it: the script
`testhide completion bash` prints calls `testhide` back with COMP_WORDS and
COMP_CWORD. Subcommands complete without any server; a JOB_ID offers the
organisation's jobs from a real control plane, and nothing (quickly) when the
control plane cannot be reached."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.harness import JOB_IMAGE, Cli, RunningControlPlane


async def complete(cli: Cli, words: str, within: float = 30) -> list[str]:
    """bash's completion of the last word of ``words`` (a trailing space: a new word)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    cli.env.update({"_TESTHIDE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    try:
        result = await cli(within=within)
    finally:
        for name in ("_TESTHIDE_COMPLETE", "COMP_WORDS", "COMP_CWORD"):
            del cli.env[name]
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return [line for line in result.stdout.decode().splitlines() if line]


async def test_subcommands_and_options_complete_without_a_server(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "no-login")
    assert await complete(cli, "testhide jo") == ["plain,jobs"]
    assert await complete(cli, "testhide who") == ["plain,whoami"]
    assert "plain,--api-key-stdin" in await complete(cli, "testhide login --api")
    assert await complete(cli, "testhide run --fetch") == ["plain,--fetch", "plain,--fetch-secret"]
    assert await complete(cli, "testhide run --service-") == [
        "plain,--service-command",
        "plain,--service-env",
        "plain,--service-tmpfs",
    ]
    assert await complete(cli, "testhide logs --serv") == ["plain,--service"]
    assert await complete(cli, "testhide admin pools set ci --no-e") == ["plain,--no-egress"]
    assert await complete(cli, "testhide jobs show ") == []  # not logged in: nothing, silently


async def test_the_completion_command_prints_the_script(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "no-login")
    for shell, mark in [("bash", b"_TESTHIDE_COMPLETE=bash_complete"), ("zsh", b"#compdef testhide")]:
        result = await cli("completion", shell)
        assert result.returncode == 0, result.stderr
        assert mark in result.stdout
    fish = await cli("completion", "fish")
    assert b"complete --no-files --command testhide" in fish.stdout


async def test_a_job_id_is_offered_from_the_control_plane(cp: RunningControlPlane, cli: Cli) -> None:
    submitted = await cli("run", "--detach", "--no-workspace", "--image", JOB_IMAGE, "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.decode().strip()
    assert await complete(cli, "testhide jobs show ") == [f"plain,{job_id}"]
    assert await complete(cli, f"testhide logs {job_id[:6]}") == [f"plain,{job_id}"]
    assert await complete(cli, "testhide cancel zzz") == []


async def test_an_unreachable_control_plane_offers_nothing_quickly(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "config")
    config = tmp_path / "config" / "testhide"
    config.mkdir(parents=True)
    # A listener that accepts and never answers: the completion must not wait on it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        (config / "credentials.json").write_text(
            f'{{"servers": ["{server}"], "ca_pem": null, "refresh_token": "x"}}'
        )
        started = time.monotonic()
        assert await complete(cli, "testhide jobs show ", within=15) == []
    assert time.monotonic() - started < 5  # the deadline is 2 s, and nothing waits past it
