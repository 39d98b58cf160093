"""``migrate-store``: a SQLite control plane moved into PostgreSQL. What the
engineer's CLI shows is the same before and after, the enrolled agent
reconnects and runs the next job, sessions, users and secrets keep working,
the audit chain goes on with one more entry, and testhide.db is left as it
was. A running serve, a target that already holds data, a URL that is not
PostgreSQL's and a database nobody answers for are refused with nothing changed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane.commands.migrate_store import migrate_store
from testhide.controlplane.datadir import DATABASE_URL_ENV, DataDir, initialise
from testhide.controlplane.errors import FailedPrecondition
from tests.harness import (
    JOB_IMAGE,
    Cli,
    CliResult,
    RunningControlPlane,
    agent_running,
    control_plane,
    enrolled,
    free_port,
    operator,
    serving,
)

SECRET = "migrated-Secret-0123456789"
JOB = (
    'echo "line-$((6 * 7))"; echo "to-stderr" >&2; mkdir -p out r; echo "artifact-$((7 * 8))" > out/a.txt;'
    ' echo \'<testsuite name="s"><testcase name="ok"/><testcase name="bad"><failure message="no"/>'
    '</testcase></testsuite>\' > r/junit.xml; [ "$DEPLOY_TOKEN" = "' + SECRET + '" ] && echo secret-ok'
)


def fixed_ports() -> dict[str, str]:
    """The same addresses before and after, where the CLI and the agent expect them."""
    return {"listen": f"127.0.0.1:{free_port()}", "agent_listen": f"127.0.0.1:{free_port()}"}


async def connected(cp: RunningControlPlane, agent: Agent, within: float = 60) -> None:
    assert cp.daemon.scheduler is not None
    await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent.agent_id), within)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def audit_export(data_dir: Path) -> list[dict[str, object]]:
    code, out, err = await operator("audit", "export", "--data-dir", str(data_dir))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def migrate(data_dir: Path, *args: str) -> tuple[int, str, str]:
    return await operator("migrate-store", "--data-dir", str(data_dir), *args, within=120)


def assert_still_on_sqlite(data_dir: Path, db_digest: str) -> None:
    assert json.loads((data_dir / "state.json").read_text()).get("store", "sqlite") == "sqlite"
    assert not (data_dir / "database.url").exists()
    assert digest(data_dir / "testhide.db") == db_digest


def assert_switched(data_dir: Path, url: str, db_digest: str) -> None:
    assert json.loads((data_dir / "state.json").read_text())["store"] == "postgresql"
    url_file = data_dir / "database.url"
    assert url_file.read_text().strip() == url
    assert url_file.stat().st_mode & 0o777 == 0o600
    assert digest(data_dir / "testhide.db") == db_digest  # left exactly as it was


async def has_testhide_schema(url: str) -> bool:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return bool(await conn.fetchval("SELECT to_regclass('orgs') IS NOT NULL"))
    finally:
        await conn.close()


# The round trip -----------------------------------------------------------------------------------------


async def what_the_cli_shows(cli: Cli, job_id: str, download: Path) -> dict[str, object]:
    shown: dict[str, object] = {}
    for name, args in {
        "jobs list": ("jobs", "list", "--json"),
        "jobs show": ("jobs", "show", job_id, "--json"),
        "logs": ("logs", job_id),
        "tests": ("tests", job_id, "--json"),
        "secrets": ("secrets", "list"),
    }.items():
        result: CliResult = await cli(*args)
        shown[name] = (result.returncode, result.stdout, result.stderr)
    result = await cli("artifacts", job_id, "-o", str(download))
    shown["artifacts"] = (result.returncode, result.stdout, result.stderr, files_under(download))
    return shown


@pytest.mark.docker
@pytest.mark.timeout(300)
async def test_what_the_cli_shows_is_the_same_after_moving_to_postgresql(
    tmp_path: Path, docker_client: DockerClient, pg_url: str
) -> None:
    from testhide.agent.runtime.docker import DockerRuntime

    ports, cli = fixed_ports(), Cli(tmp_path / "config")
    async with control_plane(tmp_path, **ports) as cp:  # SQLite, test pools never pull
        data_dir, admin_key = cp.data_dir, cp.admin_key
        agent_dir = await enrolled(cp, tmp_path)
    async with agent_running(
        agent_dir, DockerRuntime(docker_client), stop_grace=timedelta(seconds=1)
    ) as agent:
        async with serving(data_dir, admin_key, **ports) as on_sqlite:
            await connected(on_sqlite, agent)
            assert (await cli.login(on_sqlite)).returncode == 0
            assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=SECRET.encode())).returncode == 0
            first = await cli(
                "run",
                "--artifacts",
                "out/*",
                "--junit",
                "r/*.xml",
                "--secret",
                "DEPLOY_TOKEN",
                "--image",
                JOB_IMAGE,
                "--",
                "sh",
                "-c",
                JOB,
            )
            assert first.returncode == 0, first.stderr
            assert first.stdout == b"line-42\nsecret-ok\n"
            job_id = first.stderr.split(b"job ")[1].split()[0].decode()
            before = await what_the_cli_shows(cli, job_id, tmp_path / "before")
        audit_before = await audit_export(data_dir)
        _, agents_before, _ = await operator("agents", "list", "--json", "--data-dir", str(data_dir))
        db_digest = digest(data_dir / "testhide.db")

        code, out, err = await migrate(data_dir, "--to", pg_url, "--json")
        assert code == 0, err
        summary = json.loads(out)
        tables = summary["tables"]
        assert tables["jobs"] == 1
        assert tables["agents"] == 1
        assert tables["secrets"] == 1
        assert tables["test_cases"] == 2
        assert tables["log_entries"] >= 2
        assert tables["blobs"] >= 1
        assert tables["blob_chunks"] >= 1
        assert tables["audit_log"] == len(audit_before)
        assert summary["audit_entries"] == len(audit_before) + 1
        password = urlsplit(pg_url).password
        assert password
        assert password not in out + err
        assert_switched(data_dir, pg_url, db_digest)

        audit_after = await audit_export(data_dir)
        assert audit_after[:-1] == audit_before  # the same chain, entry for entry
        assert audit_after[-1]["action"] == "store_migrated"
        assert audit_after[-1]["details"]["counts"] == tables  # type: ignore[index]
        code, _, err = await operator("audit", "verify", "--data-dir", str(data_dir))
        assert code == 0, err
        assert f"audit log intact: {len(audit_before) + 1} entries" in err

        async with serving(data_dir, admin_key, **ports) as on_postgres:
            assert on_postgres.daemon._store is not None
            assert type(on_postgres.daemon._store).__name__ == "PgStore"
            await connected(on_postgres, agent)  # the same agent, reconnected on its own
            after = await what_the_cli_shows(cli, job_id, tmp_path / "after")  # the same session
            assert after == before
            again = await cli(
                "run",
                "--secret",
                "DEPLOY_TOKEN",
                "--image",
                JOB_IMAGE,
                "--",
                "sh",
                "-c",
                f'[ "$DEPLOY_TOKEN" = "{SECRET}" ] && echo after-migration',
            )
            assert (again.returncode, again.stdout) == (0, b"after-migration\n"), again.stderr
            assert len(json.loads((await cli("jobs", "list", "--json")).stdout)) == 2
    _, agents_after, _ = await operator("agents", "list", "--json", "--data-dir", str(data_dir))
    assert [a["id"] for a in json.loads(agents_after)] == [a["id"] for a in json.loads(agents_before)]
    code, _, err = await operator("audit", "verify", "--data-dir", str(data_dir))
    assert code == 0, err
    assert digest(data_dir / "testhide.db") == db_digest


async def test_sessions_users_secrets_and_agents_keep_working_after_the_move(
    tmp_path: Path, pg_url: str
) -> None:
    """Without Docker: the agent runs on a scripted runtime; the URL comes from a file."""
    ports, cli = fixed_ports(), Cli(tmp_path / "config")
    async with control_plane(tmp_path, **ports) as cp:
        data_dir, admin_key = cp.data_dir, cp.admin_key
        agent_dir = await enrolled(cp, tmp_path)
        assert (await cli.login(cp)).returncode == 0
        assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=SECRET.encode())).returncode == 0
        secrets_before = await cli("secrets", "list")
        code, _, err = await operator(
            "users", "create", "--data-dir", str(data_dir), "ada", stdin=b"Correct-Horse-42\n"
        )
        assert code == 0, err
    code, _, err = await operator("orgs", "create", "--data-dir", str(data_dir), "acme")
    assert code == 0, err
    listings = [
        ("orgs", "list"),
        ("users", "list", "--json"),
        ("enroll-token", "list", "--json"),
        ("agents", "list", "--json"),
    ]
    before = [await operator(*args, "--data-dir", str(data_dir)) for args in listings]
    db_digest = digest(data_dir / "testhide.db")
    url_file = tmp_path / "database-url"
    url_file.write_text(pg_url + "\n")
    url_file.chmod(0o600)

    code, out, err = await migrate(data_dir, "--to-file", str(url_file))
    assert code == 0, err
    assert "orgs" in out
    assert "audit_log" in out
    assert "now uses PostgreSQL" in err
    assert "testhide.db was left as it was" in err
    password = urlsplit(pg_url).password
    assert password
    assert password not in out + err
    assert_switched(data_dir, pg_url, db_digest)
    assert [await operator(*args, "--data-dir", str(data_dir)) for args in listings] == before

    async with (
        serving(data_dir, admin_key, **ports) as on_postgres,
        agent_running(agent_dir, FakeRuntime(), stop_grace=timedelta(seconds=1)) as agent,
    ):
        await connected(on_postgres, agent)
        assert await cli("secrets", "list") == secrets_before  # the session from before
        ran = await cli("run", "--image", JOB_IMAGE, "--", "true")
        assert ran.returncode == 0, ran.stderr
        ada = Cli(tmp_path / "ada")
        ada.env["TESTHIDE_PASSWORD"] = "Correct-Horse-42"
        logged_in = await ada(
            "login",
            "--server",
            on_postgres.api_target,
            "--user",
            "ada",
            "--ca-file",
            str(data_dir / "ca.pem"),
        )
        assert logged_in.returncode == 0, logged_in.stderr
        assert (await ada("jobs", "list")).returncode == 0


# Refusals: nothing changed ------------------------------------------------------------------------------


async def test_a_target_that_already_holds_testhide_data_is_refused(tmp_path: Path, pg_url: str) -> None:
    await initialise(tmp_path / "other", ["localhost"], database_url=pg_url)  # another install's database
    await initialise(tmp_path / "cp", ["localhost"])
    db_digest = digest(tmp_path / "cp" / "testhide.db")
    code, _out, err = await migrate(tmp_path / "cp", "--to", pg_url)
    assert code == 1
    assert "already holds testhide data (organisations default)" in err, err
    assert "Nothing was changed" in err
    assert_still_on_sqlite(tmp_path / "cp", db_digest)
    _, listed, _ = await operator("orgs", "list", "--data-dir", str(tmp_path / "other"))
    assert listed.split() == ["default"]  # the other install's data is untouched
    code, _, err = await operator("audit", "verify", "--data-dir", str(tmp_path / "other"))
    assert code == 0, err


async def test_a_running_control_plane_is_refused(tmp_path: Path, pg_url: str) -> None:
    async with control_plane(tmp_path) as cp:
        db_digest = digest(cp.data_dir / "testhide.db")
        code, _, err = await migrate(cp.data_dir, "--to", pg_url)
        assert code == 1
        assert f"the control plane is running on {cp.data_dir}" in err, err
        assert "stop it first" in err
        assert_still_on_sqlite(cp.data_dir, db_digest)
    assert not await has_testhide_schema(pg_url)  # refused before the database was touched


@pytest.mark.parametrize(
    "url", ["mysql://user:pw@127.0.0.1/testhide", "sqlite:///var/lib/testhide/testhide.db", "/tmp/db"]
)
async def test_a_url_that_is_not_postgresql_is_refused(tmp_path: Path, url: str) -> None:
    await initialise(tmp_path / "cp", ["localhost"])
    db_digest = digest(tmp_path / "cp" / "testhide.db")
    code, _, err = await migrate(tmp_path / "cp", "--to", url)
    assert code == 1
    assert "the target must be a PostgreSQL URL" in err, err
    assert "pw@" not in err
    assert_still_on_sqlite(tmp_path / "cp", db_digest)


async def test_an_unreachable_database_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await initialise(tmp_path / "cp", ["localhost"])
    db_digest = digest(tmp_path / "cp" / "testhide.db")
    port = free_port()  # closed: nothing listens there
    monkeypatch.setenv(DATABASE_URL_ENV, f"postgresql://testhide:hunter2-secret@127.0.0.1:{port}/testhide")
    code, out, err = await migrate(tmp_path / "cp")
    assert code == 1
    assert f"cannot reach the PostgreSQL database at 127.0.0.1:{port}/testhide" in err, err
    assert "nothing was changed" in err
    assert "hunter2-secret" not in out + err
    assert "Traceback" not in err
    assert_still_on_sqlite(tmp_path / "cp", db_digest)


async def test_the_url_is_given_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    await initialise(tmp_path / "cp", ["localhost"])
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://127.0.0.1/x\n")
    code, _, err = await migrate(
        tmp_path / "cp", "--to", "postgresql://127.0.0.1/x", "--to-file", str(url_file)
    )
    assert code == 2
    assert "give --to or --to-file, not both" in err
    code, _, err = await migrate(tmp_path / "cp")
    assert code == 2
    assert "give the PostgreSQL URL" in err


async def pg_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608
    finally:
        await conn.close()


async def test_a_write_to_sqlite_during_the_copy_undoes_it(tmp_path: Path, pg_url: str) -> None:
    """An operator command run meanwhile would be lost: the copy is emptied again."""
    data_dir = tmp_path / "cp"
    await initialise(data_dir, ["localhost"])
    code, _, err = await operator("orgs", "create", "--data-dir", str(data_dir), "acme")
    assert code == 0, err

    def meanwhile(table: str, copied: int, total: int) -> None:
        if table == "pools":  # as if `orgs create` ran now, from another shell
            with closing(sqlite3.connect(data_dir / "testhide.db")) as db, db:
                db.execute("INSERT INTO orgs (name, created_at) VALUES ('late', '2030-01-01T00:00:00+00:00')")

    with pytest.raises(FailedPrecondition, match="was written to during the copy"):
        await migrate_store(DataDir(data_dir), pg_url, "operator:test", meanwhile)
    assert json.loads((data_dir / "state.json").read_text()).get("store", "sqlite") == "sqlite"
    assert not (data_dir / "database.url").exists()
    assert [await pg_rows(pg_url, t) for t in ("orgs", "pools", "audit_log", "audit_head")] == [0, 0, 0, 0]
    code, out, err = await migrate(data_dir, "--to", pg_url, "--json")  # once nothing else writes
    assert code == 0, err
    assert json.loads(out)["tables"]["orgs"] == 3


async def test_an_audit_log_damaged_before_the_move_is_refused(tmp_path: Path, pg_url: str) -> None:
    data_dir = tmp_path / "cp"
    await initialise(data_dir, ["localhost"])
    for org in ("acme", "globex"):
        code, _, err = await operator("orgs", "create", "--data-dir", str(data_dir), org)
        assert code == 0, err
    with closing(sqlite3.connect(data_dir / "testhide.db")) as db, db:
        db.execute("UPDATE audit_log SET actor = 'operator:nobody' WHERE seq = 1")
    db_digest = digest(data_dir / "testhide.db")
    code, _, err = await migrate(data_dir, "--to", pg_url)
    assert code == 1
    assert "the SQLite audit log is already damaged (entry 1 was altered" in err, err
    assert_still_on_sqlite(data_dir, db_digest)
    assert await pg_rows(pg_url, "orgs") == 0
