"""``serve --backup-every``: backups taken on time while serving, the newest
``--backup-keep`` kept and nothing else in the directory touched, the newest
one restored into a control plane that serves the data it held; a backup that
cannot be written leaves serve serving, counted and logged; a PostgreSQL data
dir is refused in one line."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from structlog.testing import capture_logs

from testhide.controlplane.backup_schedule import ACTOR, scheduled_backups
from testhide.controlplane.datadir import initialise
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc
from tests.harness import REPO, eventually, operator, serving
from tests.integration.test_metrics import sample, scrape

LOOPBACK = "127.0.0.1:0"
BACKUP_FAMILIES = (
    "testhide_backup_last_success_timestamp_seconds",
    "testhide_backup_failures_total",
    "testhide_backup_duration_seconds",
    "testhide_backup_size_bytes",
)


async def test_backups_on_time_pruned_to_the_newest_and_the_newest_restores(tmp_path: Path) -> None:
    data_dir, restored = tmp_path / "controlplane", tmp_path / "restored"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    backups = data_dir / "backups"  # the default place, which pre-migration backups share
    backups.mkdir(mode=0o700)
    others = {"pre-migrate-x.backup": b"m1", "pre-migrate-x.thb": b"m2", "notes.txt": b"n"}
    for name, data in others.items():
        (backups / name).write_bytes(data)

    started = time.time()
    with capture_logs() as events:
        async with serving(
            data_dir, admin_key, backup_every=timedelta(seconds=1), backup_keep=2, metrics_listen=LOOPBACK
        ) as cp:
            code, key, err = await operator(
                "api-keys", "create", "--name", "kept-bot", "--data-dir", str(data_dir)
            )
            assert code == 0, err
            key_made = time.time()

            def two_kept_of_three_newest_after_the_key() -> list[Path] | None:
                made = [e for e in events if e["event"] == "backup_created"]
                kept = scheduled_backups(backups)
                if len(made) >= 3 and len(kept) == 2 and kept[-1][0].timestamp() > key_made:
                    return [path for _, path in kept]
                return None

            kept = await eventually(two_kept_of_three_newest_after_the_key, 30, "3 backups made, 2 kept")
            newest = tmp_path / "offsite" / kept[-1].name
            newest.parent.mkdir()
            shutil.copy(kept[-1], newest)  # before a later backup prunes it
            assert kept[-1].stat().st_mode & 0o777 == 0o600

            served = await scrape(cp.daemon.metrics_port)
            assert started <= sample(served, "testhide_backup_last_success_timestamp_seconds") <= time.time()
            assert sample(served, "testhide_backup_failures_total") == 0
            assert sample(served, "testhide_backup_size_bytes") > 0
            assert 0 < sample(served, "testhide_backup_duration_seconds") < 30

    for name, data in others.items():
        assert (backups / name).read_bytes() == data
    assert not [e for e in events if e["event"] == "backup_failed"]

    code, _, err = await operator(
        "restore",
        "--from",
        str(newest),
        "--data-dir",
        str(restored),
        "--master-key-file",
        str(data_dir / "master.key"),
    )
    assert code == 0, err
    assert not (restored / "backups").exists()  # a backup never holds the earlier ones
    code, _, err = await operator("audit", "verify", "--data-dir", str(restored))
    assert code == 0, err
    _, listed, _ = await operator("api-keys", "list", "--json", "--data-dir", str(restored))
    assert sorted(k["name"] for k in json.loads(listed)) == ["admin", "kept-bot"]
    _, exported, _ = await operator("audit", "export", "--data-dir", str(restored))
    entries = [json.loads(line) for line in exported.splitlines()]
    assert any(e["action"] == "backup_created" and e["actor"] == ACTOR for e in entries), exported
    async with serving(restored, admin_key) as again:
        assert await again.access_token(key.strip().splitlines()[-1])


class ServeProcess:
    """``testhide-controlplane serve`` with these flags, logging JSON to a file."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.tmp, self.flags = tmp, flags
        self.log, self.ports = tmp / "serve.log", tmp / "ports.json"
        self.process: asyncio.subprocess.Process | None = None
        self.exit_status: int | None = None

    async def __aenter__(self) -> dict[str, int]:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "testhide.controlplane.cli",
                "serve",
                *self.flags,
                "--listen",
                LOOPBACK,
                "--metrics-listen",
                LOOPBACK,
                "--port-file",
                str(self.ports),
                "--log-format",
                "json",
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
        process = self.process

        def ports() -> dict[str, int] | None:
            assert process.returncode is None, self.log.read_text()
            return json.loads(self.ports.read_text()) if self.ports.exists() else None

        found: dict[str, int] = await eventually(ports, 30, "serve to listen")
        return found

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        self.exit_status = await asyncio.wait_for(self.process.wait(), 30)

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e["event"] == name]


async def test_a_backup_dir_that_cannot_be_written_leaves_serve_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"])
    (tmp_path / "a-file").write_text("not a directory")
    unwritable = tmp_path / "a-file" / "backups"
    serve = ServeProcess(
        tmp_path, "--data-dir", str(data_dir), "--backup-every", "1s", "--backup-dir", str(unwritable)
    )
    async with serve as ports:

        async def failed_twice() -> bool:
            served = await scrape(ports["metrics_port"])
            return sample(served, "testhide_backup_failures_total") >= 2

        await eventually(failed_twice, 30, "two failed backups")
        served = await scrape(ports["metrics_port"])
        assert sample(served, "testhide_backup_last_success_timestamp_seconds") == 0
        await login(ports["api_port"], (data_dir / "ca.pem").read_bytes(), admin_key)  # still serving
    assert serve.exit_status == 0  # it stopped on SIGTERM, not on its own
    failed = serve.events("backup_failed")
    assert len(failed) >= 2
    assert failed[0]["level"] == "error"
    assert "Not a directory" in failed[0]["error"], failed[0]
    assert failed[0]["path"].startswith(str(unwritable / "testhide-"))


async def login(api_port: int, ca_pem: bytes, api_key: str) -> None:
    credentials = grpc.ssl_channel_credentials(ca_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{api_port}", credentials) as channel:
        pair = await auth_pb2_grpc.AuthStub(channel).Login(auth_pb2.LoginRequest(api_key=api_key), timeout=30)
    assert pair.access_token


async def test_a_postgresql_data_dir_is_refused_in_one_line(tmp_path: Path, pg_url: str) -> None:
    data_dir = tmp_path / "controlplane"
    await initialise(data_dir, ["localhost", "127.0.0.1"], database_url=pg_url)
    code, _, err = await operator(
        "serve", "--data-dir", str(data_dir), "--listen", LOOPBACK, "--backup-every", "24h"
    )
    assert code == 1
    assert err.strip().splitlines() == [
        "Error: --backup-every covers SQLite data dirs, and this one keeps its store in PostgreSQL:"
        " back the database up with pg_dump instead (README: replicated deployment)"
    ]


def test_the_backup_metrics_are_named_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for family in BACKUP_FAMILIES:
        assert f"`{family}`" in readme, family
