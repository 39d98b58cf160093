"""The scope of an incident without a server: each job's verdict from its stored evidence
(fakes of the log book and the statements), and the report as both programs print it: the
operator's document and the one the CLI decodes from the Admin API are the same, match their
example, and the text ends with the summary line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from testhide.cli.wire_admin_agents import incident_from_pb
from testhide.common.evidence import log_chain_head, log_chain_next, log_chain_start
from testhide.common.incident_text import incident_lines
from testhide.common.statement import Statement, rfc3339
from testhide.controlplane.ca.statement_store import JobStatementRecord
from testhide.controlplane.commands.incident import incident_json
from testhide.controlplane.errors import IntegrityError
from testhide.controlplane.jobs.model import (
    BlobInfo,
    Job,
    JobSpec,
    JobStatus,
    LogBatchRecord,
    LogStream,
    SecretInfo,
)
from testhide.controlplane.operations.agents import agent_view
from testhide.controlplane.operations.incident import IncidentReport, JobScope, SecretExposure
from testhide.controlplane.operations.verdict import PREDATES, Verdict, job_verdict
from testhide.controlplane.rpc.admin_agents import agent_to_pb
from testhide.controlplane.rpc.convert_incident import incident_to_pb
from testhide.controlplane.store.base import AgentRecord
from testhide.controlplane.store.incident import CERTIFICATE_EVENTS, AgentCertificate, AgentJob, TestSummary
from tests.json_schema import assert_matches_example

AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
Entries = tuple[tuple[LogStream, bytes], ...]
BATCHES: list[tuple[int, Entries]] = [
    (1, ((LogStream.STDOUT, b"hello\n"),)),
    (2, ((LogStream.STDERR, b"oops\n"),)),
]


def chained(job_id: str, batches: list[tuple[int, Entries]]) -> list[LogBatchRecord]:
    records, value = [], log_chain_start(job_id)
    for seq, entries in batches:
        value = log_chain_next(value, seq, ((int(s), d) for s, d in entries))
        records.append(LogBatchRecord(seq, value, entries))
    return records


def finished(job_id: str = "j1", **changes: Any) -> Job:
    head = log_chain_head(job_id, ((seq, ((int(s), d) for s, d in e)) for seq, e in BATCHES))
    job = Job(
        id=job_id,
        org="acme",
        spec=JobSpec(image="alpine:3", command=("true",), secrets=("DEPLOY_TOKEN",)),
        status=JobStatus.SUCCEEDED,
        created_at=AT,
        exit_code=0,
        last_seq=2,
        log_chain_head=head,
        agent_log_chain_head=head,
    )
    return replace(job, **changes)


class FakeLogs:
    def __init__(self, records: list[LogBatchRecord], broken: bool = False) -> None:
        self.records, self.broken = records, broken

    async def batches(self, org: str, job_id: str) -> AsyncIterator[LogBatchRecord]:
        for record in self.records:
            if self.broken:
                raise IntegrityError("stored ciphertext failed authentication (tampered, or another key)")
            yield record


class FakeStatements:
    def __init__(self, record: JobStatementRecord | None = None) -> None:
        self.record = record

    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None:
        return self.record


def statement(job: Job, head: str | None = None, **changes: object) -> JobStatementRecord:
    payload = Statement(
        job.id, job.org, "a1", 1, 1, "0" * 64, "", {}, "EXITED", 0, "",
        head if head is not None else job.log_chain_head.hex(), (), (), rfc3339(AT), rfc3339(AT),
    ).encode()  # fmt: skip
    record = JobStatementRecord(job.id, job.org, payload, b"sig", b"der", AT, countersignature=b"counter")
    return replace(record, **changes)  # type: ignore[arg-type]


async def verdict(
    job: Job, logs: FakeLogs | None = None, record: JobStatementRecord | None = None
) -> Verdict:
    return await job_verdict(FakeStatements(record), logs or FakeLogs(chained(job.id, BATCHES)), job)


async def test_a_job_without_evidence_or_unfinished_is_unknown_never_a_pass() -> None:
    assert await verdict(finished(log_chain_head=b"")) == Verdict(None, PREDATES)
    assert PREDATES == "not verifiable: job predates evidence"
    running = finished(status=JobStatus.RUNNING)
    assert await verdict(running) == Verdict(None, "not verifiable yet: the job has not finished")


async def test_an_intact_log_chain_and_statement_verify() -> None:
    job = finished()
    assert await verdict(job) == Verdict(True, "log chain of 2 batch(es) matches; no signed statement stored")
    assert await verdict(job, record=statement(job)) == Verdict(
        True, "log chain of 2 batch(es) matches; the countersigned statement agrees"
    )
    older_agent = finished(
        agent_log_chain_head=b""
    )  # an agent that reported no head: the store's still checks
    assert (await verdict(older_agent)).verifies is True


@pytest.mark.parametrize(
    ("logs", "changes", "reason"),
    [
        (
            [
                replace(chained("j1", BATCHES)[0], entries=((LogStream.STDOUT, b"HELLO\n"),)),
                chained("j1", BATCHES)[1],
            ],
            {},
            "stored log batch 1 does not match its chain link",
        ),
        ([chained("j1", BATCHES)[1]], {}, "log batch 1 is missing from the store"),
        (chained("j1", BATCHES[:1]), {}, "the store holds 1 log batch(es), the job 2"),
        (
            chained("j1", BATCHES),
            {"log_chain_head": b"\x01" * 32},
            "the stored log does not lead to the job's log chain head",
        ),
        (
            chained("j1", BATCHES),
            {"agent_log_chain_head": b"\x02" * 32},
            "the log chain head the agent reported differs from the stored log",
        ),
    ],
)
async def test_an_altered_log_fails(logs: list[LogBatchRecord], changes: dict[str, Any], reason: str) -> None:
    assert await verdict(finished(**changes), FakeLogs(logs)) == Verdict(False, reason)


async def test_a_log_that_no_longer_unseals_fails() -> None:
    result = await verdict(finished(), FakeLogs(chained("j1", BATCHES), broken=True))
    assert result.verifies is False
    assert result.reason.startswith("a stored log batch cannot be read back")


async def test_a_statement_that_disagrees_or_lacks_the_countersignature_fails() -> None:
    job = finished()
    cases = [
        (
            statement(job, mismatch="exit_code"),
            "the agent's signed statement disagrees with the stored job: exit_code",
        ),
        (statement(job, countersignature=None), "the agent's signed statement was not countersigned"),
        (
            statement(job, head="ab" * 32),
            "the signed statement names another log chain head than the stored log's",
        ),
        (statement(job, payload=b"{}"), "the stored statement is not a job statement: "),
    ]
    for record, reason in cases:
        result = await verdict(job, record=record)
        assert result.verifies is False
        assert result.reason.startswith(reason), result.reason


def report() -> IncidentReport:
    agent = AgentRecord(
        "a1", "acme", "default", "build-1", "5e", AT + timedelta(hours=1), AT, AT, AT, host="h1"
    )
    job = finished()
    bare = finished(
        "j0", status=JobStatus.ERROR, exit_code=None, log_chain_head=b"", spec=JobSpec("alpine:3", ("true",))
    )
    artifact = BlobInfo("b1", "acme", "artifact", "j1", "dist/a.whl", 2048, "ab" * 32)
    jobs = [
        JobScope(AgentJob(job, AT, (artifact,), TestSummary(passed=3, failed=1), True), Verdict(True, "ok")),
        JobScope(AgentJob(bare, None, (), None, False), Verdict(None, PREDATES)),
    ]
    secrets = [
        SecretExposure(
            "DEPLOY_TOKEN", ("j1",), AT, SecretInfo("DEPLOY_TOKEN", AT + timedelta(seconds=1), AT, "j1")
        ),
        SecretExposure("OLD", ("j1",), AT, None),
    ]
    certificates = [AgentCertificate("5e", AT, AT + timedelta(hours=1), "agent_enrolled")]
    return IncidentReport(agent_view(agent, set(), AT), certificates, AT, jobs, secrets, False)


def test_both_programs_print_the_same_document_matching_the_example() -> None:
    operators = incident_json(report())
    view = report().agent
    engineers = incident_from_pb(incident_to_pb(report(), agent_to_pb(view)))
    assert operators == engineers
    assert_matches_example("testhide-controlplane incident agent", operators)
    assert_matches_example("testhide admin incident agent", engineers)
    assert [(s["name"], s["deleted"], s["changed_since"]) for s in operators["secrets"]] == [
        ("DEPLOY_TOKEN", False, True),
        ("OLD", True, False),
    ]
    assert operators["summary"] == {
        "jobs": 2,
        "secrets_exposed": 2,
        "artifacts": 1,
        "verified": 1,
        "failed": 0,
        "unknown": 1,
    }


def test_the_text_has_the_agent_jobs_secrets_artifacts_verdicts_and_a_summary() -> None:
    lines = incident_lines(incident_json(report()))
    text = "\n".join(lines)
    assert lines[0] == "agent a1 (build-1), org acme, pool default, host h1: revoked"
    for expected in (
        "DEPLOY_TOKEN: 1 job(s)",
        "changed since",
        "OLD: 1 job(s)",
        "deleted since",
        "dist/a.whl 2048 bytes",
    ):
        assert expected in text
    assert f"j0: unknown: {PREDATES}" in text
    assert "taken back" in text
    assert lines[-1] == "2 jobs, 2 secrets exposed by name, 1 artifacts, 1 verify / 0 fail / 1 unknown"


def test_the_certificate_events_are_those_enrollment_and_renewal_audit() -> None:
    from testhide.controlplane.ca.renewal import RENEWED

    # enrollment's action is checked for real in tests/integration/test_incident.py
    assert CERTIFICATE_EVENTS == ("agent_enrolled", RENEWED)
