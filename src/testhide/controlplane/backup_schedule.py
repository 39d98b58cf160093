"""Backups on a schedule (``serve --backup-every``): the same encrypted file and
``backup_created`` audit entry as ``testhide-controlplane backup``, written into
one directory as ``testhide-YYYYmmddTHHMMSSZ.thb`` (UTC, when it was started).

When: ``every`` after the newest scheduled backup already in the directory (the
time is read from its name, not from the file's mtime, which a copy changes), at
once if there is none or it is overdue. So a restart neither takes an extra
backup nor skips one. A failed backup is logged with its reason, counted, and
tried again after min(every, 5 min); serve serves on: an unwritable disk must not
take the control plane down with it.

What is pruned: after each backup that succeeded, the scheduled backups beyond
the newest ``keep``, and only files named exactly as this module names them.
Anything else in the directory (backups taken before a migration, an operator's
own, notes) is never deleted, and a failure never thins what is there.

PostgreSQL data dirs are refused at start (``check_data_dir``): their database
is backed up with pg_dump, and starting only to fail at every backup would hide that."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.backup import BackupSummary, take_backup
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.store.base import Store

if TYPE_CHECKING:
    from testhide.controlplane.metrics import BackupMetrics, ControlPlaneMetrics

log = structlog.get_logger("testhide.backups")

ACTOR = "controlplane:schedule"
MAX_RETRY_DELAY = timedelta(minutes=5)
_STAMP = "%Y%m%dT%H%M%SZ"
_NAME = re.compile(r"testhide-(\d{8}T\d{6}Z)\.thb")


def backup_name(started: datetime) -> str:
    return f"testhide-{started.astimezone(UTC).strftime(_STAMP)}.thb"


def taken_at(name: str) -> datetime | None:
    """When the scheduled backup ``name`` was started; None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), _STAMP).replace(tzinfo=UTC)
    except ValueError:  # the shape, but no such time (month 13): not one of ours
        return None


def scheduled_backups(directory: Path) -> list[tuple[datetime, Path]]:
    """The scheduled backups in ``directory``, oldest first: regular files of our naming only."""
    found = []
    for path in directory.iterdir():
        at = taken_at(path.name)
        if at is not None and not path.is_symlink() and path.is_file():
            found.append((at, path))
    return sorted(found)


def first_due(newest: datetime | None, now: datetime, every: timedelta) -> datetime:
    """When the first backup after a start is due: ``every`` after the newest one there, now
    if none or overdue; never later than ``every`` from now (a newest one dated ahead of the
    clock, after the clock was set back, must not hold backups off until that date)."""
    if newest is None:
        return now
    return min(max(newest + every, now), now + every)


def beyond(backups: list[tuple[datetime, Path]], keep: int) -> list[Path]:
    """What pruning deletes from ``backups`` (oldest first): all but the newest ``keep``."""
    return [path for _, path in backups[: max(0, len(backups) - keep)]]


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


TakeBackup = Callable[[Path], Awaitable[BackupSummary]]
"""Writes the backup to the path given, with its audit entry."""


class BackupSchedule:
    """``run()`` takes backups into ``directory`` every ``every``, keeping ``keep``; never returns."""

    def __init__(
        self,
        directory: Path,
        every: timedelta,
        keep: int,
        take: TakeBackup,
        metrics: BackupMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.directory, self.every, self.keep = directory, every, keep
        self._take, self._metrics = take, metrics
        self._clock: Clock = clock or SystemClock()

    @property
    def retry_delay(self) -> timedelta:
        return min(self.every, MAX_RETRY_DELAY)

    async def run(self) -> None:
        due = first_due(self._newest(), self._clock.now(), self.every)
        log.info(
            "backup_schedule_started",
            directory=str(self.directory),
            every_s=self.every.total_seconds(),
            keep=self.keep,
            first_at=due.isoformat(),
        )
        while True:
            await self._sleep_until(due)
            started = self._clock.now()
            if await self.backup_once(started):
                due = started.replace(microsecond=0) + self.every  # the time its name says
            else:
                due = self._clock.now() + self.retry_delay

    async def backup_once(self, started: datetime) -> bool:
        """One backup named for ``started``, then pruning; False (logged, counted) if it failed."""
        out = self.directory / backup_name(started)
        began = time.monotonic()
        try:
            await asyncio.to_thread(self.directory.mkdir, mode=0o700, parents=True, exist_ok=True)
            summary = await self._take(out)
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.failed()
            log.error(
                "backup_failed",
                path=str(out),
                error=str(exc) or type(exc).__name__,
                retry_in_s=self.retry_delay.total_seconds(),
            )
            return False
        seconds = time.monotonic() - began
        if self._metrics is not None:
            self._metrics.succeeded(self._clock.now(), seconds, summary.size)
        log.info(
            "backup_created",
            path=str(out),
            size=summary.size,
            seconds=round(seconds, 3),
            backup_id=summary.backup_id,
        )
        await asyncio.to_thread(self.prune)
        return True

    def prune(self) -> None:
        """Delete the scheduled backups beyond the newest ``keep``; nothing else, ever."""
        try:
            old = beyond(scheduled_backups(self.directory), self.keep)
        except OSError as exc:
            log.warning("backup_prune_failed", directory=str(self.directory), error=str(exc))
            return
        for path in old:
            try:
                path.unlink()
            except OSError as exc:  # kept: the next backup tries again
                log.warning("backup_prune_failed", path=str(path), error=str(exc))
            else:
                log.debug("backup_pruned", path=str(path))

    def _newest(self) -> datetime | None:
        try:
            backups = scheduled_backups(self.directory)
        except OSError:  # absent, or unusable: the first backup says why
            return None
        return backups[-1][0] if backups else None

    async def _sleep_until(self, due: datetime) -> None:
        # Again while short: a timer may fire a little early, and the name is by the second.
        while (left := (due - self._clock.now()).total_seconds()) > 0:
            await self._clock.sleep(left)


def check_data_dir(directory: DataDir) -> None:
    """Refuse backups of a PostgreSQL data dir before anything starts."""
    if directory.uses_postgres:
        raise ConfigError(
            "--backup-every covers SQLite data dirs, and this one keeps its store in PostgreSQL:"
            " back the database up with pg_dump instead (README: replicated deployment)"
        )


def backup_schedule(
    config: ControlPlaneConfig,
    directory: DataDir,
    master: MasterKey,
    store: Store,
    auditor: Auditor,
    metrics: ControlPlaneMetrics | None,
) -> BackupSchedule:
    """The daemon's schedule (``config.backup_every`` set): each backup as the backup command takes it."""
    assert config.backup_every is not None

    async def take(out: Path) -> BackupSummary:
        return await take_backup(directory, master, store, auditor, out, ACTOR)

    return BackupSchedule(
        config.resolved_backup_dir,
        config.backup_every,
        config.backup_keep,
        take,
        metrics.backup_metrics() if metrics is not None else None,
    )
