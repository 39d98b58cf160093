"""Everything the agent owes the control plane about its jobs, kept until
acknowledged and replayed in order on every reconnect: nothing lost across a
disconnect, and the control plane stores each batch once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.model import JobResult, JobStarted, LogBatch, LogStream, Outcome, Report

Send = Callable[[Report], None]


@dataclass
class _JobReports:
    epoch: int
    started: JobStarted | None = None
    next_seq: int = 1
    unacked: dict[int, LogBatch] = field(default_factory=dict)
    result: JobResult | None = None


class Outbox:
    def __init__(self) -> None:
        self._jobs: dict[str, _JobReports] = {}
        self._send: Send | None = None

    def attach(self, send: Send) -> None:
        """A new connection: replay everything unacknowledged, in order, then
        send new reports straight away."""
        for reports in self._jobs.values():
            for message in self._pending(reports):
                send(message)
        self._send = send

    def detach(self) -> None:
        self._send = None

    @staticmethod
    def _pending(reports: _JobReports) -> list[Report]:
        out: list[Report] = [reports.started] if reports.started else []
        out.extend(reports.unacked[seq] for seq in sorted(reports.unacked))
        if reports.result:
            out.append(reports.result)
        return out

    def _emit(self, message: Report) -> None:
        if self._send is not None:
            self._send(message)

    def open(self, job_id: str, epoch: int) -> None:
        """Start reporting on a job; a second open of the same assignment keeps what it has."""
        existing = self._jobs.get(job_id)
        if existing is None or existing.epoch != epoch:
            self._jobs[job_id] = _JobReports(epoch)

    def running(self) -> dict[str, int]:
        """Jobs whose result is not yet acknowledged, with their epochs."""
        return {job_id: r.epoch for job_id, r in self._jobs.items()}

    def started(self, job_id: str) -> None:
        reports = self._jobs[job_id]
        reports.started = JobStarted(job_id, reports.epoch)
        self._emit(reports.started)

    def log(self, job_id: str, entries: list[tuple[LogStream, bytes]]) -> None:
        reports = self._jobs[job_id]
        batch = LogBatch(job_id, reports.epoch, reports.next_seq, tuple(entries))
        reports.unacked[batch.seq] = batch
        reports.next_seq += 1
        self._emit(batch)

    def finish(self, job_id: str, outcome: Outcome, exit_code: int, reason: str = "") -> None:
        reports = self._jobs[job_id]
        reports.result = JobResult(job_id, reports.epoch, reports.next_seq - 1, outcome, exit_code, reason)
        self._emit(reports.result)

    def ack_log(self, job_id: str, seq: int) -> None:
        reports = self._jobs.get(job_id)
        if reports is None:
            return
        reports.started = None  # the control plane has seen the job running
        for acked in [s for s in reports.unacked if s <= seq]:
            del reports.unacked[acked]

    def ack_result(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def drop(self, job_id: str) -> None:
        """The control plane no longer assigns this job to us: report nothing more."""
        self._jobs.pop(job_id, None)

    def sent_batches(self, job_id: str) -> int:
        """Log batches made for a job so far (0 if unknown or finished)."""
        reports = self._jobs.get(job_id)
        return reports.next_seq - 1 if reports else 0

    def unacked_bytes(self) -> int:
        return sum(len(d) for r in self._jobs.values() for b in r.unacked.values() for _, d in b.entries)
