"""Upgrading from the previous release. A data dir that release's own programs made
and used (its init, operator commands, serve, agent and CLI, installed in a venv
of their own by scripts/release-venv) is migrated by this checkout's serve, which
then serves the same jobs, logs, agents, audit log and API keys; the release's
agent, restarted on this checkout's code with the credentials it has, runs a new
job. On SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from docker import DockerClient

from testhide import __version__
from testhide.controlplane.store.migrations import MIGRATIONS
from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
from tests.harness import (
    JOB_IMAGE,
    REPO,
    Cli,
    ControlPlaneProcess,
    assert_same_bytes,
    free_port,
    operator,
    program_command,
    unavailable,
)
from tests.pg import fresh_database

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

VENV_ENV = "TESTHIDE_UPGRADE_FROM_VENV"
RELEASE_FILE = REPO / "tests" / "upgrade_from.txt"
PROGRAMS = ("testhide-controlplane", "testhide-agent", "testhide")
# Both streams, a byte that is not UTF-8 and a last line without its newline: the log must come back
# byte for byte, stream for stream.
SCRIPT = "echo first line; echo to stderr >&2; printf 'caf\\351\\ttab\\n'; printf 'no newline at the end'"
STDOUT = b"first line\ncaf\xe9\ttab\nno newline at the end"


@dataclass(frozen=True)
class Release:
    tag: str
    bin_dir: Path

    @property
    def version(self) -> str:
        return self.tag.removeprefix("v")

    def program(self, name: str) -> Path:
        return self.bin_dir / name


def recorded_tag() -> str:
    """The release tests/upgrade_from.txt names (its first line that is not a comment)."""
    lines = [line for line in RELEASE_FILE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert lines, f"{RELEASE_FILE} names no release"
    return lines[0].split()[0]


@pytest.fixture(scope="module")
def release() -> Release:
    tag = recorded_tag()
    venv = os.environ.get(VENV_ENV, "")
    if not venv:
        unavailable(
            f"{VENV_ENV} is unset: export {VENV_ENV}=$(scripts/release-venv {tag}), as scripts/test does"
        )
    bin_dir = Path(venv) / "bin"
    missing = [p for p in PROGRAMS if not (bin_dir / p).is_file()]
    if missing:
        unavailable(f"{VENV_ENV}={venv} has no {', '.join(missing)}: scripts/release-venv {tag} makes it")
    return Release(tag, bin_dir)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """None for SQLite in the data dir; else a fresh database of the test cluster."""
    if request.param == "sqlite":
        yield None
        return
    async with fresh_database() as url:
        yield url


async def operated(*args: str, program: Path | None = None) -> str:
    """An operator command that must succeed; its stdout (its stderr, when it says only that)."""
    code, out, err = await operator(*args, program=program)
    assert code == 0, f"testhide-controlplane {' '.join(args[:2])} ({program or 'current'}): {err}"
    return out or err


async def succeeded(cli: Cli, *args: str) -> bytes:
    result = await cli(*args)
    assert result.returncode == 0, f"testhide {' '.join(args[:2])}: {result.stderr.decode(errors='replace')}"
    return result.stdout


async def start_agent(program: Path | None, data_dir: Path) -> asyncio.subprocess.Process:
    """``testhide-agent run`` (this checkout's, or ``program``), its log beside its data dir."""
    with await asyncio.to_thread((data_dir.parent / f"{data_dir.name}.log").open, "ab") as log:
        return await asyncio.create_subprocess_exec(
            *program_command("testhide.agent.cli", program),
            "run",
            "--data-dir",
            str(data_dir),
            cwd=REPO,
            stdout=log,
            stderr=log,
        )


async def stop_agent(agent: asyncio.subprocess.Process) -> int:
    """SIGTERM, as an operator stops it: with no job running it drains at once."""
    if agent.returncode is None:
        agent.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(agent.wait(), 60)


async def schema_version(data_dir: Path, database_url: str | None) -> int:
    if database_url is not None:
        connection = await asyncpg.connect(database_url, timeout=10)
        try:
            return int(await connection.fetchval("SELECT max(version) FROM schema_migrations"))
        finally:
            await connection.close()
    with sqlite3.connect(f"file:{data_dir / 'testhide.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])


@dataclass(frozen=True)
class Served:
    """What a release's CLI shows of the job, through that release's serve."""

    job: dict[str, Any]
    listed: list[dict[str, Any]]
    stdout: bytes
    stderr: bytes


async def served(cli: Cli, job_id: str) -> Served:
    log = await cli("logs", job_id)
    assert log.returncode == 0, log.stderr
    return Served(
        json.loads(await succeeded(cli, "jobs", "show", job_id, "--json")),
        json.loads(await succeeded(cli, "jobs", "list", "--json")),
        log.stdout,
        log.stderr,
    )


@dataclass(frozen=True)
class Operated:
    """What a release's operator commands show of the data dir."""

    agents: list[dict[str, Any]]
    audit: list[str]


async def operated_view(data_dir: Path, program: Path | None) -> Operated:
    at = ("--data-dir", str(data_dir))
    return Operated(
        json.loads(await operated("agents", "list", *at, "--json", program=program)),
        (await operated("audit", "export", *at, program=program)).splitlines(),
    )


# Fields of `agents list --json` renamed since the release, when every --json got one schema.
RENAMED = {"cert_not_after": "cert_expires_at"}


def _moment(value: Any) -> Any:
    """A time as the same moment whichever RFC 3339 form shows it (+00:00 before, Z now)."""
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T":
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


def assert_kept(old: dict[str, Any], new: dict[str, Any], what: str) -> None:
    """Every field the release showed is shown, unchanged (this checkout may show more; a
    renamed field under its new name, a time in the format every --json uses now)."""
    changed = {
        k: (v, new.get(RENAMED.get(k, k), "(gone)"))
        for k, v in old.items()
        if _moment(new.get(RENAMED.get(k, k), "(gone)")) != _moment(v)
    }
    assert not changed, f"{what}, field: (before, after): {changed}"


async def test_a_data_dir_of_the_previous_release_is_migrated_and_serves_what_it_held(
    release: Release, database_url: str | None, docker_client: DockerClient, tmp_path: Path
) -> None:
    data_dir, agent_dir = tmp_path / "controlplane", tmp_path / "agent"
    at = ("--data-dir", str(data_dir))
    old_operator = release.program("testhide-controlplane")
    version = (await operated("--version", program=old_operator)).strip()
    assert version == f"testhide-controlplane {release.version}", f"{VENV_ENV} is not {release.tag}"

    # The release makes the data dir and uses it: an agent, an API key, a job.
    await operated("init", *at, *(("--database", database_url) if database_url else ()), program=old_operator)
    await operated("pools", "set", "default", *at, "--pull-policy", "never", program=old_operator)
    token = (await operated("enroll-token", "create", *at, program=old_operator)).strip()
    api_key = (await operated("api-keys", "create", *at, "--name", "ci", program=old_operator)).strip()
    api_port, agent_port = free_port(), free_port()
    server = ("--server", f"127.0.0.1:{api_port}")
    login = ("login", *server, "--api-key", api_key, "--ca-file", str(data_dir / "ca.pem"))
    old_cp = ControlPlaneProcess(data_dir, api_port, agent_port, name=release.tag, program=old_operator)
    await old_cp.start()
    try:
        enrolling = await asyncio.create_subprocess_exec(
            release.program("testhide-agent"),
            "enroll",
            *server,
            "--token",
            token,
            "--data-dir",
            str(agent_dir),
            "--name",
            "upgraded",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, enroll_err = await asyncio.wait_for(enrolling.communicate(), 60)
        assert enrolling.returncode == 0, enroll_err.decode(errors="replace")
        old_agent = await start_agent(release.program("testhide-agent"), agent_dir)
        try:
            old_cli = Cli(tmp_path / "release-cli", program=release.program("testhide"))
            await succeeded(old_cli, *login)
            run = ("run", "-d", "--no-workspace", "--image", JOB_IMAGE, "--", "sh", "-c", SCRIPT)
            job_id = (await succeeded(old_cli, *run)).decode().strip()
            await succeeded(old_cli, "logs", "--follow", job_id)  # until the job ends
        finally:
            old_agent_exit = await stop_agent(old_agent)
        assert old_agent_exit == 0
        before = await served(old_cli, job_id)
        assert await old_cp.terminate() == 0
    finally:
        await old_cp.stop()
    before_operated = await operated_view(data_dir, old_operator)
    assert (before.job["status"], before.stdout) == ("SUCCEEDED", STDOUT)
    assert b"to stderr\n" in before.stderr
    [agent] = before_operated.agents
    assert (agent["name"], agent["version"]) == ("upgraded", release.version)
    assert (await operator("audit", "verify", *at, program=old_operator))[0] == 0
    old_schema = await schema_version(data_dir, database_url)
    current_schema = max(v for v, _ in (PG_MIGRATIONS if database_url else MIGRATIONS))
    assert old_schema < current_schema, "the release's schema is the current one: nothing to migrate"
    backups = data_dir / "backups"
    assert not list(backups.glob("pre-migrate-*"))

    # This checkout's serve on the same data dir and ports: it migrates, then serves what was there.
    cp = ControlPlaneProcess(data_dir, api_port, agent_port, name="current")
    await cp.start()
    try:
        assert await schema_version(data_dir, database_url) == current_schema
        assert list(backups.glob("pre-migrate-*")), f"no pre-migrate backup in {backups}"
        cli = Cli(tmp_path / "cli")
        await succeeded(cli, *login)  # the release's API key
        after, after_operated = await served(cli, job_id), await operated_view(data_dir, None)
        assert_kept(before.job, after.job, f"job {job_id}")
        assert [(j["id"], j["status"]) for j in after.listed] == [(job_id, "SUCCEEDED")]
        assert_same_bytes(after.stdout, before.stdout)
        assert_same_bytes(after.stderr, before.stderr, "stderr")
        [agent_now] = after_operated.agents
        assert_kept(agent, agent_now, f"agent {agent['id']}")
        old_audit, audit = before_operated.audit, after_operated.audit
        assert audit[: len(old_audit)] == old_audit
        code, _, err = await operator("audit", "verify", *at)
        assert code == 0, err
        assert f"audit log intact: {len(audit)} entries" in err

        # The release's agent, on this checkout's code with the credentials it has, runs a new job.
        agent_process = await start_agent(None, agent_dir)
        try:
            new_id = (await succeeded(cli, *run)).decode().strip()
            assert (await succeeded(cli, "logs", "--follow", new_id)) == STDOUT
            shown = json.loads(await succeeded(cli, "jobs", "show", new_id, "--json"))
            [now] = json.loads(await operated("agents", "list", *at, "--json"))
        finally:
            agent_exit = await stop_agent(agent_process)
        assert agent_exit == 0
        assert (shown["status"], shown["agent_id"]) == ("SUCCEEDED", agent["id"])
        assert (now["id"], now["name"], now["state"], now["version"]) == (
            agent["id"],
            "upgraded",
            "active",
            __version__,
        )
        assert await cp.terminate() == 0
    finally:
        await cp.stop()
