"""Everything the agent owes the control plane about its jobs, kept until
acknowledged and replayed in order on every reconnect: nothing lost across a
disconnect, and the control plane stores each batch once.

Flow control: at most ``window_bytes`` of log batches are in flight (sent,
not yet acknowledged; kept in memory for a replay). Batches that cannot go out
at once wait in the spool: in memory while connected, up to ``memory_bytes``
(they go out within moments, as acknowledgements come), else on disk; when it
holds ``max_spool_bytes``, ``log()`` waits, which stops the job's output being
read: the job slows down, its output is not dropped.

A full disk is the same, one step later: what the spool's disk refuses is held
in memory, up to ``window_bytes`` more, and then ``log()`` waits, trying the
disk again every ``disk_retry_s``; acknowledgements after a reconnect drain
memory and disk as usual. So the job resumes when space returns or when the
control plane is back, whichever comes first, and cancel and timeout stop
its container meanwhile (the executor does not wait on the log for that).

Each batch continues the job's log hash chain (common/evidence.py) when it takes
its sequence number, over its entries exactly as they go out (masked, SYSTEM
lines included), so the head is known when the job ends, before its last
batches have left the spool. The result carries that head; the control plane
computes the same chain over what it stores. Only a spooled batch the disk
cannot give back goes out as something else (a line saying so): its bytes are
lost, and the heads then differ, as they should."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import structlog

from testhide.agent.model import (
    FetchStep,
    Isolation,
    JobFetched,
    JobRefused,
    JobResult,
    JobStarted,
    LogBatch,
    LogStream,
    Outcome,
    Report,
    ServiceIsolation,
    SignedStatement,
)
from testhide.agent.spool import Spool
from testhide.common.evidence import log_chain_next, log_chain_start

log = structlog.get_logger("testhide.agent.outbox")

Send = Callable[[Report], None]

DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
DEFAULT_SPOOL_BYTES = 512 * 1024 * 1024
DEFAULT_MEMORY_BYTES = 8 * 1024 * 1024
"""Batches kept in memory, while connected, when they wait only for the window."""
DISK_RETRY_S = 1.0
"""While the spool's disk refuses writes, how often a waiting job's output tries it again."""


def batch_size(batch: LogBatch) -> int:
    return sum(len(data) for _, data in batch.entries)


def _made(reports: _JobReports, batch: LogBatch) -> None:
    """``batch`` takes its sequence number (none is skipped) and continues the job's chain."""
    reports.next_seq += 1
    reports.log_chain = log_chain_next(
        reports.log_chain, batch.seq, [(int(stream), data) for stream, data in batch.entries]
    )


@dataclass
class _JobReports:
    epoch: int
    started: JobStarted | None = None
    fetched: JobFetched | None = None
    """Sent again on every new connection while the job is ours (storing it twice changes nothing)."""
    next_seq: int = 1
    log_chain: bytes = b""
    """The log hash chain's head over the batches made so far."""
    inflight: dict[int, LogBatch] = field(default_factory=dict)
    result: JobResult | None = None
    result_sent: bool = False
    """On the current connection."""


class Outbox:
    def __init__(
        self,
        spool: Spool,
        max_spool_bytes: int = DEFAULT_SPOOL_BYTES,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        disk_retry_s: float = DISK_RETRY_S,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        self._spool = spool
        self._memory = memory_bytes
        self._disk_retry_s = disk_retry_s
        self._max_spool = max_spool_bytes
        self._window = window_bytes
        self._jobs: dict[str, _JobReports] = {}
        self._abandoned: set[tuple[str, int]] = set()
        self._inflight_bytes = 0
        self._send: Send | None = None
        self._space = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    # connections ----------------------------------------------------------------
    def attach(self, send: Send) -> None:
        """A new connection: replay everything unacknowledged, in order, then
        send new reports straight away."""
        self._send = send
        started = resent = 0
        for reports in self._jobs.values():
            reports.result_sent = False
            if reports.started:
                send(reports.started)
                started += 1
            if reports.fetched:
                send(reports.fetched)
            for seq in sorted(reports.inflight):
                send(reports.inflight[seq])
            resent += len(reports.inflight)
        from_spool, results = self._pump()
        log.debug(
            "outbox_replayed",
            jobs=len(self._jobs),
            started=started,
            batches_resent=resent,
            batches_from_spool=from_spool,
            results=results,
            spooled_bytes=self._spool.size,
        )

    def detach(self) -> None:
        self._send = None

    def _pump(self) -> tuple[int, int]:
        """Send spooled batches while the window allows, then results that are due;
        how many of each went out."""
        send = self._send
        if send is None:
            return 0, 0
        batches = results = 0
        for job_id, reports in list(self._jobs.items()):
            while self._spool.pending(job_id) and self._fits(self._spool.next_size(job_id)):
                self._send_batch(reports, self._spool.take(job_id), send)
                batches += 1
            if reports.result and not reports.result_sent and not self._spool.pending(job_id):
                reports.result_sent = True
                send(reports.result)
                results += 1
        self._space.set()
        return batches, results

    def _send_batch(self, reports: _JobReports, batch: LogBatch, send: Send) -> None:
        reports.inflight[batch.seq] = batch
        self._inflight_bytes += batch_size(batch)
        send(batch)

    # reports -------------------------------------------------------------------
    def open(self, job_id: str, epoch: int) -> None:
        """Start reporting on a job; a second open of the same assignment keeps
        what it has, and an abandoned one stays abandoned."""
        if (job_id, epoch) in self._abandoned:
            return
        existing = self._jobs.get(job_id)
        if existing is None or existing.epoch != epoch:
            if existing is not None:
                self.drop(job_id)
            self._jobs[job_id] = _JobReports(epoch, log_chain=log_chain_start(job_id))
            self._empty.clear()

    def running(self) -> dict[str, int]:
        """Jobs whose result is not yet acknowledged, with their epochs."""
        return {job_id: r.epoch for job_id, r in self._jobs.items()}

    def started(
        self, job_id: str, isolation: Isolation | None = None, services: tuple[ServiceIsolation, ...] = ()
    ) -> None:
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        reports.started = JobStarted(job_id, reports.epoch, isolation, services)
        if self._send is not None:
            self._send(reports.started)

    def fetched(self, job_id: str, fetch: FetchStep) -> None:
        """What the fetch step did (or that its cache was restored), before the job step."""
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        reports.fetched = JobFetched(job_id, reports.epoch, fetch)
        if self._send is not None:
            self._send(reports.fetched)

    async def log(self, job_id: str, entries: list[tuple[LogStream, bytes]]) -> None:
        """Send the batch, or spool it behind what waits; while neither can take
        it, wait (the job's output is read more slowly, never dropped)."""
        size = sum(len(data) for _, data in entries)
        reports = self._jobs.get(job_id)
        warned = False
        while reports is not None and self._jobs.get(job_id) is reports:
            # The sequence number is taken only once the batch is out or kept: none is skipped.
            batch = LogBatch(job_id, reports.epoch, reports.next_seq, tuple(entries))
            if self._send is not None and self._sendable(job_id, size):
                _made(reports, batch)
                self._send_batch(reports, batch, self._send)
                return
            in_memory = self._send is not None and self._spool.kept + size <= self._memory
            if not self._spool_full(size) and self._spool.put(
                batch, may_hold=self._may_hold(size), in_memory=in_memory
            ):
                _made(reports, batch)
                return
            if not warned and self._spool.failing is not None:
                warned = True
                log.warning(
                    "job_output_waiting",
                    job_id=job_id,
                    held_bytes=self._spool.held,
                    note="the spool's disk refuses writes and memory holds what it may: the job's"
                    " output is read more slowly until space returns or the control plane is back",
                )
            await self._room()
        # Dropped meanwhile: the control plane no longer gives us this job.

    def _spool_full(self, size: int) -> bool:
        return bool(self._spool.size) and self._spool.size + size > self._max_spool

    def _may_hold(self, size: int) -> bool:
        """Memory takes what the disk refuses, up to the in-flight bound."""
        return self._spool.held == 0 or self._spool.held + size <= self._window

    async def _room(self) -> None:
        """Until acknowledgements or a new connection make room; while the disk
        refuses writes, at most ``disk_retry_s``, then it is tried again."""
        self._space.clear()
        if self._spool.failing is None:
            await self._space.wait()
            return
        with suppress(TimeoutError):
            async with asyncio.timeout(self._disk_retry_s):
                await self._space.wait()

    def _sendable(self, job_id: str, size: int) -> bool:
        """Straight out, or behind what already waits?"""
        return self._send is not None and not self._spool.pending(job_id) and self._fits(size)

    def _fits(self, size: int) -> bool:
        return self._inflight_bytes == 0 or self._inflight_bytes + size <= self._window

    def log_chain_head(self, job_id: str) -> bytes:
        """The job's log hash chain head over every batch made for it so far (empty for a
        job this outbox does not report on)."""
        reports = self._jobs.get(job_id)
        return reports.log_chain if reports else b""

    def finish(
        self,
        job_id: str,
        outcome: Outcome,
        exit_code: int,
        reason: str = "",
        signed: SignedStatement | None = None,
    ) -> None:
        """The result, after every log batch of the job was made (it goes once they are sent)."""
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        reports.result = JobResult(
            job_id,
            reports.epoch,
            reports.next_seq - 1,
            outcome,
            exit_code,
            reason,
            signed=signed,
            log_chain_head=reports.log_chain,
        )
        self._pump()

    # acknowledgements ----------------------------------------------------------
    def ack_log(self, job_id: str, seq: int) -> None:
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        reports.started = None  # the control plane has seen the job running
        for acked in [s for s in reports.inflight if s <= seq]:
            self._inflight_bytes -= batch_size(reports.inflight.pop(acked))
        self._pump()

    def ack_result(self, job_id: str) -> None:
        self._forget(job_id)

    def refuse(self, job_id: str, reason: str) -> None:
        """Give back an assignment that never started: the control plane queues it
        again (and does so on its own if this message is lost with the connection)."""
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        self.drop(job_id)
        if self._send is not None:
            self._send(JobRefused(job_id, reports.epoch, reason))

    def drop(self, job_id: str) -> None:
        """The control plane no longer gives us this job: report nothing more about it."""
        reports = self._jobs.get(job_id)
        if reports is not None:
            self._abandoned.add((job_id, reports.epoch))
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        reports = self._jobs.pop(job_id, None)
        if reports is not None:
            self._inflight_bytes -= sum(batch_size(b) for b in reports.inflight.values())
        self._spool.discard(job_id)
        if not self._jobs:
            self._empty.set()
        self._pump()
        self._space.set()

    async def wait_empty(self) -> None:
        """Until every job's result has been acknowledged (or the job dropped)."""
        await self._empty.wait()

    # introspection ---------------------------------------------------------------
    def sent_batches(self, job_id: str) -> int:
        """Log batches made for a job so far (0 if unknown or finished)."""
        reports = self._jobs.get(job_id)
        return reports.next_seq - 1 if reports else 0

    def unacked_bytes(self) -> int:
        """Log bytes not yet acknowledged: in flight plus spooled."""
        return self._inflight_bytes + self._spool.size

    @property
    def spooled_bytes(self) -> int:
        """Log bytes waiting in the spool (on disk, kept in memory while connected, or held
        while the disk refuses writes)."""
        return self._spool.size
