"""Group commit of submitted jobs: the jobs submitted while a store transaction
runs are written together in the next one, so a lone submission is written at
once and a busy control plane writes many per transaction (and crosses to the
store's thread once per batch, not once per job). Each job's pool policy is
read in the transaction that writes the job, so a policy changed a moment ago,
here or by another process or replica, applies to the very next submission;
each job is still checked on its own against it (``admit``), in its own
organisation. A caller hears its job's outcome only once the transaction that
holds it has committed: ``Submit`` never answers for a job not yet stored."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from typing import Protocol

from testhide.controlplane.errors import ControlPlaneError, StorageUnavailable
from testhide.controlplane.jobs.model import Job, PoolPolicy

Outcome = PoolPolicy | ControlPlaneError
Pending = tuple[Job, bytes, asyncio.Future[PoolPolicy]]

MAX_BATCH = 64
"""Jobs per transaction: bounds how long one holds the write lock (SQLite)."""


class CreationStore(Protocol):
    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[Outcome]: ...


class JobCreator:
    def __init__(
        self, store: CreationStore, admit: Callable[[Job, PoolPolicy], None], max_batch: int = MAX_BATCH
    ) -> None:
        self._store = store
        self._admit = admit
        """Refuses a job (raising a ControlPlaneError) given its pool's current policy."""
        self._max_batch = max_batch
        self._waiting: list[Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, job: Job, data_key_wrapped: bytes) -> PoolPolicy:
        """The job's pool policy once the job is stored; the refusal (or store error) raises."""
        future: asyncio.Future[PoolPolicy] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, data_key_wrapped, future))
        if self._writer is None:
            self._start_writer()
        return await future

    def _start_writer(self) -> None:
        # In a context of its own: the batch is everyone's, not the first caller's (principal, log context).
        self._writer = asyncio.get_running_loop().create_task(self._write(), context=contextvars.Context())

    async def _write(self) -> None:
        batch: list[Pending] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._commit(batch)
        finally:
            self._writer = None
            for _, _, future in batch:  # stopped mid-transaction (shutdown): its callers do not wait on
                future.cancel()
            if self._waiting:
                self._start_writer()

    async def _commit(self, batch: list[Pending]) -> None:
        try:
            outcomes = await self._store.create_jobs([(job, key) for job, key, _ in batch], self._admit)
        except StorageUnavailable as exc:  # nothing was written: every caller hears it
            for _, _, future in batch:
                _settle(future, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][2], exc)
                return
            # Unexpected (not a refusal): one job must not fail the others, so each goes alone.
            for item in batch:
                await self._commit([item])
            return
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)


def _settle(future: asyncio.Future[PoolPolicy], outcome: Outcome | BaseException) -> None:
    if future.done():  # its caller went away (cancelled): the job is stored all the same
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
