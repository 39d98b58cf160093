"""Group commit of agents' job reports: every stream's RUNNING and result
reports go into one store transaction per batch. While a transaction runs,
the reports that arrive meanwhile wait for the next one, so a lone report is
written at once and a busy control plane writes many per transaction (a
thousand agents finishing jobs cost a few transactions a second, not two
thousand). Each report is still checked on its own inside the transaction
(its holder at its epoch), and its caller hears its own outcome only once the
transaction that holds it has committed: the acknowledgement never runs ahead
of the write. A result's signed statement is checked and countersigned
(``statements.py``) after its transaction commits and before its caller hears: a result
acknowledged to its agent has its statement kept."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from testhide.controlplane.errors import ControlPlaneError, StorageUnavailable
from testhide.controlplane.jobs.model import Job, JobReport
from testhide.controlplane.jobs.store import JobStore

if TYPE_CHECKING:
    from testhide.controlplane.jobs.statements import StatementRecorder

Outcome = tuple[Job, bool] | ControlPlaneError

MAX_BATCH = 64
"""Reports per transaction: bounds how long one holds the write lock (SQLite) or the rows (PostgreSQL)."""


class ReportCommitter:
    def __init__(
        self, store: JobStore, max_batch: int = MAX_BATCH, statements: StatementRecorder | None = None
    ) -> None:
        self._store = store
        self._statements = statements
        self._max_batch = max_batch
        self._waiting: list[tuple[JobReport, asyncio.Future[Outcome]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def report(self, reports: Sequence[JobReport]) -> list[Outcome]:
        """Each report's outcome, in order, once written (an error of the store raises)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in reports]
        self._waiting.extend(zip(reports, futures, strict=True))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())
        return [await future for future in futures]

    async def _write(self) -> None:
        batch: list[tuple[JobReport, asyncio.Future[Outcome]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._commit(batch)
        finally:
            self._writer = None
            for _, future in batch:  # stopped mid-transaction (shutdown): its callers do not wait on
                future.cancel()
            if self._waiting:
                self._writer = asyncio.ensure_future(self._write())

    async def _commit(self, batch: list[tuple[JobReport, asyncio.Future[Outcome]]]) -> None:
        reports = [report for report, _ in batch]
        try:
            outcomes = await self._store.report_jobs(reports, datetime.now(UTC))
        except StorageUnavailable as exc:  # nothing was written: every caller's stream replays
            for _, future in batch:
                _fail(future, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][1], exc)
                return
            # Unexpected: one report must not fail the others, so each goes alone.
            for item in batch:
                await self._commit([item])
            return
        await self._record_statements(reports, outcomes)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _record_statements(self, reports: list[JobReport], outcomes: list[Outcome]) -> None:
        if self._statements is None:
            return
        signed = [
            (report, outcome[0])
            for report, outcome in zip(reports, outcomes, strict=True)
            if report.statement is not None and not isinstance(outcome, ControlPlaneError)
        ]
        if signed:
            await self._statements.record(signed)


def _fail(future: asyncio.Future[Outcome], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
