"""Whether a job still verifies, from the evidence the control plane stored with it
(``job_verdict``), for the scope of an incident (``operations/incident.py``).

What it checks today:

1. The log hash chain (``common/evidence.py``): every stored batch is unsealed and the chain
   recomputed from the job's start value; each batch's stored link, the job's stored head and
   the head its agent reported with the result (when it did) must all agree with it, and the
   batches must be numbered 1, 2, 3 … up to the job's last one.
2. The job's statement, if one is stored (``job_statements``): the control plane found no
   field disagreeing with the stored job when it recorded it, it was countersigned, and the log
   head it names is the stored one. Its signatures are not checked again here.

A job whose log carries no chain (it began before the chain did, or its agent is older) is
``None`` with the reason "not verifiable: job predates evidence": unknown, never a pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from testhide.common.evidence import log_chain_next, log_chain_start
from testhide.common.statement import Statement, StatementError
from testhide.controlplane.ca.statement_store import JobStatementRecord
from testhide.controlplane.errors import IntegrityError
from testhide.controlplane.jobs.model import Job, LogBatchRecord

PREDATES = "not verifiable: job predates evidence"


class LogBatches(Protocol):
    """A job's stored log batches, unsealed (`jobs.logs.LogBook`)."""

    def batches(self, org: str, job_id: str) -> AsyncIterator[LogBatchRecord]: ...


class Statements(Protocol):
    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None: ...


@dataclass(frozen=True)
class Verdict:
    verifies: bool | None
    """None: unknown (``reason`` says why); never a guess."""
    reason: str


async def job_verdict(store: Statements, logs: LogBatches, job: Job) -> Verdict:
    if not job.status.terminal:
        return Verdict(None, "not verifiable yet: the job has not finished")
    if not job.log_chain_head:
        return Verdict(None, PREDATES)
    try:
        failure, batches = await _log_chain_failure(logs, job)
    except IntegrityError as exc:  # a stored batch altered at rest: it no longer unseals
        return Verdict(False, f"a stored log batch cannot be read back: {exc}")
    if failure is not None:
        return Verdict(False, failure)
    record = await store.job_statement(job.org, job.id)
    if record is None:
        return Verdict(True, f"log chain of {batches} batch(es) matches; no signed statement stored")
    failure = _statement_failure(record, job)
    if failure is not None:
        return Verdict(False, failure)
    return Verdict(True, f"log chain of {batches} batch(es) matches; the countersigned statement agrees")


async def _log_chain_failure(logs: LogBatches, job: Job) -> tuple[str | None, int]:
    value, expected = log_chain_start(job.id), 1
    async for batch in logs.batches(job.org, job.id):
        if batch.seq != expected:
            return f"log batch {expected} is missing from the store", expected - 1
        value = log_chain_next(value, batch.seq, ((int(stream), data) for stream, data in batch.entries))
        if batch.chain != value:
            return f"stored log batch {batch.seq} does not match its chain link", batch.seq
        expected += 1
    batches = expected - 1
    if batches != job.last_seq:
        return f"the store holds {batches} log batch(es), the job {job.last_seq}", batches
    if value != job.log_chain_head:
        return "the stored log does not lead to the job's log chain head", batches
    if job.agent_log_chain_head and job.agent_log_chain_head != value:
        return "the log chain head the agent reported differs from the stored log", batches
    return None, batches


def _statement_failure(record: JobStatementRecord, job: Job) -> str | None:
    if record.mismatch:
        return f"the agent's signed statement disagrees with the stored job: {record.mismatch}"
    if record.countersignature is None:
        return "the agent's signed statement was not countersigned"
    try:
        statement = Statement.decode(record.payload)
    except StatementError as exc:
        return f"the stored statement is not a job statement: {exc}"
    if statement.log_chain_head != job.log_chain_head.hex():
        return "the signed statement names another log chain head than the stored log's"
    return None
