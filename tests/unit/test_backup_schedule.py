"""When scheduled backups are taken and what pruning deletes, on a fake clock
and a fake backup (the real one runs in tests/integration/test_backup_schedule.py)."""

from __future__ import annotations

import asyncio
import os
import tomllib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from testhide.controlplane.backup import BackupSummary
from testhide.controlplane.backup_schedule import (
    BackupSchedule,
    backup_name,
    beyond,
    first_due,
    scheduled_backups,
    taken_at,
)
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.metrics import ControlPlaneMetrics

T0 = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
HOUR = timedelta(hours=1)


class Horizon(Exception):
    """The fake clock reached the end of the test's time."""


class FakeClock:
    """Sleeping moves the time on at once; past ``until`` it ends the run.
    ``early``: timers fire that much before they are due, as a real one may."""

    def __init__(self, now: datetime, until: datetime, early: timedelta = timedelta(0)) -> None:
        self._now, self.until, self.early = now, until, early

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self._now += max(timedelta(seconds=seconds) - self.early, timedelta(milliseconds=1))
        if self._now > self.until:
            raise Horizon
        await asyncio.sleep(0)


class FakeBackups:
    """Writes a small file where the schedule asks; the first ``failures`` attempts fail."""

    def __init__(self, clock: FakeClock, failures: int = 0) -> None:
        self.clock, self.failures, self.attempts = clock, failures, list[datetime]()

    async def __call__(self, out: Path) -> BackupSummary:
        self.attempts.append(self.clock.now())
        if len(self.attempts) <= self.failures:
            raise OSError(28, "No space left on device")
        await asyncio.to_thread(out.write_bytes, b"backup")
        return BackupSummary("b-id", "mk-id", 6, "0" * 64, 2)


async def run_until(schedule: BackupSchedule) -> None:
    with pytest.raises(Horizon):
        await schedule.run()


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_an_empty_directory_gets_a_backup_at_once_then_one_every_interval(tmp_path: Path) -> None:
    clock = FakeClock(T0, until=T0 + 5 * HOUR + timedelta(minutes=30))
    take = FakeBackups(clock)
    await run_until(BackupSchedule(tmp_path / "backups", HOUR, 3, take, clock=clock))
    started = T0.replace(microsecond=0)
    assert take.attempts == [T0] + [started + n * HOUR for n in range(1, 6)]
    assert names(tmp_path / "backups") == [backup_name(started + n * HOUR) for n in (3, 4, 5)]
    assert backup_name(started) == "testhide-20300102T030405Z.thb"
    assert (tmp_path / "backups").stat().st_mode & 0o777 == 0o700


async def test_pruning_deletes_only_scheduled_backups(tmp_path: Path) -> None:
    directory = tmp_path / "backups"
    directory.mkdir()
    foreign = [
        "pre-migrate-x.thb",
        "pre-migrate-20000101T000000Z.thb",
        "pre-migrate-x.backup",
        "pre-migrate-schema-7-to-8-20300102T030405Z.thb",
        "pre-migrate-schema-4-to-5-20300102T030405Z.pgdump.thb",
        "testhide-20000101T000000Z.pgdump.thb",
        "notes.txt",
        "testhide-latest.thb",
        "testhide-20000101T000000Z.thb.tmp",
        ".testhide-20000101T000000Z.thb.k2j3",  # an unfinished write's temporary file
        "testhide-20001301T000000Z.thb",  # month 13: no time, not ours
        "xtesthide-20000101T000000Z.thb",
    ]
    for name in foreign:
        (directory / name).write_text("keep me")
    (directory / "testhide-20000102T000000Z.thb").mkdir()  # our name, but a directory
    (tmp_path / "elsewhere").write_text("keep me")
    os.symlink(tmp_path / "elsewhere", directory / "testhide-20000103T000000Z.thb")
    old = [backup_name(T0 - n * HOUR) for n in (30, 20, 10)]
    for name in old:
        (directory / name).write_text("old")

    clock = FakeClock(T0, until=T0 + timedelta(minutes=1))
    await run_until(BackupSchedule(directory, HOUR, 2, FakeBackups(clock), clock=clock))

    assert names(directory) == sorted(
        [*foreign, "testhide-20000102T000000Z.thb", "testhide-20000103T000000Z.thb", old[2], backup_name(T0)]
    )
    assert (tmp_path / "elsewhere").read_text() == "keep me"


@pytest.mark.parametrize(
    ("newest", "due"),
    [
        (None, T0),  # none yet: at once
        (T0 - timedelta(minutes=10), T0 + timedelta(minutes=50)),  # a restart takes no extra one
        (T0 - 3 * HOUR, T0),  # overdue: at once, never skipped
        (T0 - HOUR, T0),
        (T0 + 24 * HOUR, T0 + HOUR),  # dated ahead (the clock was set back): not held off for a day
    ],
)
def test_the_first_backup_after_a_start_is_due_an_interval_after_the_newest(
    newest: datetime | None, due: datetime
) -> None:
    assert first_due(newest, T0, HOUR) == due


async def test_a_restart_continues_from_the_newest_backup_in_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "backups"
    directory.mkdir()
    newest = (T0 - timedelta(minutes=10)).replace(microsecond=0)
    (directory / backup_name(newest - HOUR)).write_text("older")
    (directory / backup_name(newest)).write_text("newest")
    (directory / "pre-migrate-20300102T030000Z.thb").write_text("not a scheduled one")  # newer, not counted
    clock = FakeClock(T0, until=T0 + 2 * HOUR)
    take = FakeBackups(clock)
    await run_until(BackupSchedule(directory, HOUR, 14, take, clock=clock))
    assert take.attempts == [newest + HOUR, newest + 2 * HOUR]


async def test_a_timer_that_fires_early_takes_no_backup_before_it_is_due(tmp_path: Path) -> None:
    clock = FakeClock(T0, until=T0 + timedelta(seconds=10), early=timedelta(milliseconds=300))
    take = FakeBackups(clock)
    await run_until(BackupSchedule(tmp_path, timedelta(seconds=1), 100, take, clock=clock))
    started = T0.replace(microsecond=0)
    for n, attempt in enumerate(take.attempts):
        assert attempt >= started + n * timedelta(seconds=1)
    assert len(names(tmp_path)) == len(take.attempts) == 11  # :05 to :15, one name each: none overwritten


async def test_a_failure_is_logged_counted_and_retried_and_prunes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "backups"
    directory.mkdir()
    old = [backup_name(T0 - n * 2 * HOUR) for n in (3, 2)]  # overdue
    for name in old:
        (directory / name).write_text("old")
    metrics = ControlPlaneMetrics()
    clock = FakeClock(T0, until=T0 + timedelta(minutes=11))
    take = FakeBackups(clock, failures=2)
    with capture_logs() as events:
        await run_until(BackupSchedule(directory, HOUR, 1, take, metrics.backup_metrics(), clock=clock))
    # Tried at once, then after 5 minutes (the cap), twice; pruned only after the success.
    assert take.attempts == [T0, T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)]
    assert names(directory) == [backup_name(T0 + timedelta(minutes=10))]
    failed = [e for e in events if e["event"] == "backup_failed"]
    assert len(failed) == 2
    assert failed[0]["log_level"] == "error"
    assert "No space left on device" in failed[0]["error"]
    assert failed[0]["retry_in_s"] == 300
    created = [e for e in events if e["event"] == "backup_created"]
    assert [e["size"] for e in created] == [6]
    assert [e["log_level"] for e in events if e["event"] == "backup_pruned"] == ["debug", "debug"]

    registry = metrics.registry
    assert registry.get_sample_value("testhide_backup_failures_total") == 2
    assert registry.get_sample_value("testhide_backup_last_success_timestamp_seconds") == pytest.approx(
        (T0 + timedelta(minutes=10)).timestamp()
    )
    assert registry.get_sample_value("testhide_backup_size_bytes") == 6
    duration = registry.get_sample_value("testhide_backup_duration_seconds")
    assert duration is not None
    assert 0 <= duration < 5


async def test_a_short_interval_is_retried_after_the_interval(tmp_path: Path) -> None:
    clock = FakeClock(T0, until=T0 + timedelta(minutes=2, seconds=30))
    take = FakeBackups(clock, failures=1)
    await run_until(BackupSchedule(tmp_path, timedelta(minutes=1), 14, take, clock=clock))
    retried = T0 + timedelta(minutes=1)
    assert take.attempts == [T0, retried, retried.replace(microsecond=0) + timedelta(minutes=1)]


async def test_a_directory_that_cannot_be_made_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    clock = FakeClock(T0, until=T0 + timedelta(minutes=16))
    take = FakeBackups(clock)
    metrics = ControlPlaneMetrics()
    with capture_logs() as events:
        await run_until(
            BackupSchedule(
                tmp_path / "a-file" / "backups", HOUR, 2, take, metrics.backup_metrics(), clock=clock
            )
        )
    assert take.attempts == []  # never reached: the directory is not there
    assert metrics.registry.get_sample_value("testhide_backup_failures_total") == 4  # 0, 5, 10, 15 min
    assert all("Not a directory" in e["error"] for e in events if e["event"] == "backup_failed")


def test_names_and_times() -> None:
    assert taken_at("testhide-20300102T030405Z.thb") == T0.replace(microsecond=0)
    for name in ("pre-migrate-20300102T030405Z.thb", "testhide-20300102T030405Z.thb.tmp", "testhide-x.thb"):
        assert taken_at(name) is None
    in_paris = datetime(2030, 1, 2, 4, 4, 5, tzinfo=timezone(HOUR))
    assert backup_name(in_paris) == "testhide-20300102T030405Z.thb"  # named in UTC, whatever the zone


def test_beyond_keeps_the_newest(tmp_path: Path) -> None:
    for n in range(5):
        (tmp_path / backup_name(T0 + n * HOUR)).write_text("")
    backups = scheduled_backups(tmp_path)
    assert beyond(backups, 2) == [tmp_path / backup_name(T0 + n * HOUR) for n in range(3)]
    assert beyond(backups, 5) == beyond(backups, 9) == []


def test_backup_metrics_exist_only_where_backups_are_scheduled() -> None:
    metrics = ControlPlaneMetrics()
    assert metrics.registry.get_sample_value("testhide_backup_failures_total") is None
    metrics.backup_metrics()
    assert metrics.registry.get_sample_value("testhide_backup_failures_total") == 0
    assert metrics.registry.get_sample_value("testhide_backup_last_success_timestamp_seconds") == 0


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"backup_every": timedelta(milliseconds=500)}, "at least 1s"),
        ({"backup_every": HOUR, "backup_keep": 0}, "at least 1 scheduled backup"),
        ({"backup_every": HOUR, "backup_dir": "DATA/elsewhere"}, "inside the data dir"),
        ({"backup_every": HOUR, "backup_dir": "DATA"}, "inside the data dir"),
    ],
)
def test_backup_settings_are_checked(tmp_path: Path, settings: dict[str, object], says: str) -> None:
    data_dir = tmp_path / "data"
    if isinstance(settings.get("backup_dir"), str):
        settings["backup_dir"] = Path(str(settings["backup_dir"]).replace("DATA", str(data_dir)))
    with pytest.raises(ConfigError, match=says):
        ControlPlaneConfig(data_dir=data_dir, **settings)  # type: ignore[arg-type]


def test_the_default_backup_dir_and_one_outside_are_accepted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert (
        ControlPlaneConfig(data_dir=data_dir, backup_every=HOUR).resolved_backup_dir == data_dir / "backups"
    )
    for where in (data_dir / "backups", tmp_path / "offsite"):
        assert ControlPlaneConfig(data_dir=data_dir, backup_dir=where).resolved_backup_dir == where


def test_the_backup_settings_come_from_a_file_the_environment_or_flags(tmp_path: Path) -> None:
    from testhide.controlplane.cli import main

    config = tmp_path / "serve.toml"
    config.write_text(f'data-dir = "{tmp_path}"\nbackup-every = "24h"\nbackup_keep = 3\n')
    result = CliRunner().invoke(
        main,
        ["serve", "--print-config", "--backup-keep", "5"],
        env={"TESTHIDE_CONFIG": str(config), "TESTHIDE_BACKUP_DIR": str(tmp_path / "offsite")},
    )
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)
    assert (printed["backup-every"], printed["backup-dir"], printed["backup-keep"]) == (
        "24h",
        str(tmp_path / "offsite"),
        5,
    )
    off = CliRunner().invoke(main, ["serve", "--print-config", "--data-dir", str(tmp_path)])
    assert "# backup-every: not set" in off.output
    refused = CliRunner().invoke(main, ["serve", "--print-config", "--data-dir", "x", "--backup-keep", "0"])
    assert refused.exit_code == 2
    assert "--backup-keep" in refused.output
