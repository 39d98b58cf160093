"""The control plane's background tasks are supervised: the first that dies stops the daemon
loudly (logged with its cause, a non-zero exit), and shutdown always completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from testhide.controlplane import cli as operator_cli
from testhide.controlplane.errors import BackgroundTaskFailed
from testhide.controlplane.store.sqlite import SqliteStore
from tests.harness import control_plane


class StartupScanFailed(Exception):
    pass


async def _failing_scan(self: SqliteStore) -> list[tuple[str, str]]:
    raise StartupScanFailed("the scheduler's start-up scan failed")


async def test_a_dying_scheduler_stops_the_daemon_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SqliteStore, "queued_pools", _failing_scan)
    with capture_logs() as logs:
        async with control_plane(tmp_path) as cp:
            with pytest.raises(BackgroundTaskFailed) as stopped:
                await asyncio.wait_for(cp.daemon.run(), 10)
            assert isinstance(stopped.value.__cause__, StartupScanFailed)
            # The store was closed on the way out: nothing serves on without a scheduler.
            assert cp.daemon._store is not None
            with pytest.raises(RuntimeError, match="after shutdown"):
                await cp.daemon._store.list_agents()
        # The harness's own shutdown() after the failure returned: it is idempotent and completes.
    failures = [entry for entry in logs if entry["event"] == "background_task_failed"]
    assert [entry["task"] for entry in failures] == ["scheduler"]
    assert isinstance(failures[0]["exc_info"], StartupScanFailed)
    assert [entry["event"] for entry in logs].count("controlplane_stopped") == 1


async def test_shutdown_completes_after_a_task_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: shutdown() re-raised the failed task's exception before closing the store,
    so SIGTERM left `serve` hanging."""
    monkeypatch.setattr(SqliteStore, "queued_pools", _failing_scan)
    async with control_plane(tmp_path) as cp:
        with pytest.raises(BackgroundTaskFailed):
            await asyncio.wait_for(cp.daemon.run(), 10)
        await asyncio.wait_for(cp.daemon.shutdown(), 10)


def test_serve_exits_non_zero_when_a_background_task_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    data_dir = tmp_path / "cp"
    initialised = runner.invoke(operator_cli.main, ["init", "--data-dir", str(data_dir)])
    assert initialised.exit_code == 0, initialised.output
    monkeypatch.setattr(SqliteStore, "queued_pools", _failing_scan)
    served = runner.invoke(
        operator_cli.main,
        ["serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"],
    )
    assert served.exit_code != 0
    assert "a background task failed" in served.output
    assert "the scheduler's start-up scan failed" in served.output
