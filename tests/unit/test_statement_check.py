"""The control plane's check of a job's statement against what it stored (jobs/statements.py):
a statement that agrees passes, and each field that does not is named, the first one first;
the outcomes map onto the statuses the control plane records as the agent port does; and
statements are recorded after their results commit, before their agents hear."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from testhide.common.isolation import Isolation
from testhide.common.statement import FileDigest, Statement, isolation_facts, rfc3339
from testhide.controlplane.ca.statement_store import JobStatementRecord
from testhide.controlplane.errors import NotHeld
from testhide.controlplane.jobs.model import (
    BlobInfo,
    Job,
    JobReport,
    JobSpec,
    JobStatus,
    SubmittedStatement,
)
from testhide.controlplane.jobs.reports import ReportCommitter
from testhide.controlplane.jobs.statements import (
    MAX_STATEMENT_BYTES,
    StatementRecorder,
    field_mismatch,
    recorded_status,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
ISOLATION = Isolation(runtime="runc", network_mode="none", cpus=2.0, image_digest="sha256:" + "a" * 64)
HEAD = bytes(range(32))
SPEC_DIGEST = "5" * 64


def stored_job(**changes: object) -> Job:
    job = Job(
        id="j1",
        org="acme",
        spec=JobSpec(image="busybox", command=("true",)),
        status=JobStatus.FAILED,
        created_at=NOW,
        exit_code=3,
        agent_id="a1",
        epoch=2,
        isolation=ISOLATION,
        log_chain_head=HEAD,
    )
    return replace(job, **changes)  # type: ignore[arg-type]


def statement(**changes: object) -> Statement:
    made = Statement(
        job_id="j1",
        org="acme",
        agent_id="a1",
        attempt=1,
        epoch=2,
        spec_digest=SPEC_DIGEST,
        image_digest=ISOLATION.image_digest,
        isolation=isolation_facts(ISOLATION),
        outcome="EXITED",
        exit_code=3,
        reason="",
        log_chain_head=HEAD.hex(),
        junit_reports=(FileDigest("report.xml", "1" * 64),),
        artifacts=(FileDigest("out/a", "2" * 64),),
        started_at=rfc3339(NOW),
        finished_at=rfc3339(NOW),
    )
    return replace(made, **changes)  # type: ignore[arg-type]


JUNIT = [BlobInfo("b1", "acme", "junit", "j1", "report.xml", 10, "1" * 64)]
FILES = [BlobInfo("b2", "acme", "artifact", "j1", "out/a", 10, "2" * 64)]


def test_a_statement_that_agrees_passes() -> None:
    assert field_mismatch(statement(), stored_job(), SPEC_DIGEST, JUNIT, FILES) == ""


@pytest.mark.parametrize(
    ("job", "made", "spec", "files", "field"),
    [
        (stored_job(exit_code=0, status=JobStatus.SUCCEEDED), statement(), SPEC_DIGEST, FILES, "outcome"),
        (stored_job(exit_code=4), statement(), SPEC_DIGEST, FILES, "exit_code"),
        (stored_job(status_reason="edited"), statement(), SPEC_DIGEST, FILES, "reason"),
        (stored_job(), statement(), "6" * 64, FILES, "spec_digest"),
        (stored_job(attempt=2), statement(), SPEC_DIGEST, FILES, "attempt"),
        (stored_job(agent_id="b2"), statement(), SPEC_DIGEST, FILES, "agent_id"),
        (stored_job(log_chain_head=b"\x00" * 32), statement(), SPEC_DIGEST, FILES, "log_chain_head"),
        (
            stored_job(isolation=replace(ISOLATION, pids_limit=9)),
            statement(),
            SPEC_DIGEST,
            FILES,
            "isolation",
        ),
        (stored_job(), statement(), SPEC_DIGEST, [replace(FILES[0], sha256="3" * 64)], "artifacts"),
        (stored_job(), statement(), SPEC_DIGEST, [], "artifacts"),
    ],
)
def test_each_field_that_disagrees_is_named(
    job: Job, made: Statement, spec: str, files: list[BlobInfo], field: str
) -> None:
    assert field_mismatch(made, job, spec, JUNIT, files).startswith(f"{field}: the statement says ")


def test_a_junit_report_the_control_plane_does_not_have_is_named() -> None:
    assert field_mismatch(statement(), stored_job(), SPEC_DIGEST, [], FILES).startswith("junit_reports:")


@pytest.mark.parametrize(
    ("outcome", "exit_code", "expected"),
    [
        ("EXITED", 0, (JobStatus.SUCCEEDED, 0)),
        ("EXITED", 1, (JobStatus.FAILED, 1)),
        ("TIMED_OUT", 137, (JobStatus.TIMED_OUT, 137)),
        ("CANCELED", 143, (JobStatus.CANCELED, 143)),
        ("ERROR", -1, (JobStatus.ERROR, None)),
    ],
)
def test_outcomes_map_onto_recorded_statuses(
    outcome: str, exit_code: int, expected: tuple[JobStatus, int | None]
) -> None:
    assert recorded_status(statement(outcome=outcome, exit_code=exit_code)) == expected


class CommittingStore:
    """Records the order of the commit and the statements' recording."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def report_jobs(self, reports: list[JobReport], now: datetime) -> list[tuple[Job, bool] | NotHeld]:
        self.events.append("commit")
        return [
            NotHeld(r.job_id) if r.job_id == "stale" else (stored_job(id=r.job_id), True) for r in reports
        ]


class Recorder:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def record(self, signed: list[tuple[JobReport, Job]]) -> None:
        self.events.extend(f"statement {job.id}" for _, job in signed)


async def test_statements_are_recorded_after_the_commit_and_before_the_caller_hears() -> None:
    events: list[str] = []
    committer = ReportCommitter(CommittingStore(events), statements=Recorder(events))  # type: ignore[arg-type]
    signed = SubmittedStatement(b"{}", b"sig", b"cert")
    reports = [
        JobReport("acme", "a1", "j1", 2, JobStatus.FAILED, exit_code=3, statement=signed),
        JobReport("acme", "a1", "j2", 2, JobStatus.FAILED, exit_code=3),  # an older agent: none
        JobReport("acme", "a1", "j3", 2, JobStatus.FAILED, exit_code=3, statement=signed),
        JobReport("acme", "a1", "stale", 2, JobStatus.FAILED, exit_code=3, statement=signed),  # refused
    ]
    outcomes = await committer.report(reports)
    events.append("heard")
    assert events == ["commit", "statement j1", "statement j3", "heard"]  # one call, for the batch
    assert isinstance(outcomes[3], NotHeld)


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, object]]] = []

    async def record(self, action: str, actor: str, **details: object) -> None:
        self.entries.append((action, actor, details))


class KeepNothing:
    async def jobs_blobs(self, *args: object) -> dict[str, list[BlobInfo]]:
        raise AssertionError("an oversized statement is not checked")

    async def add_job_statements(self, records: object) -> list[bool]:
        raise AssertionError("an oversized statement is not kept")


async def test_an_oversized_statement_is_not_kept_but_audited() -> None:
    audit = Audit()
    recorder = StatementRecorder(KeepNothing(), None, tuple, audit, lambda spec: "")  # type: ignore[arg-type]
    huge = SubmittedStatement(b"x" * (MAX_STATEMENT_BYTES + 1), b"sig", b"cert")
    await recorder.record(
        [(JobReport("acme", "a1", "j1", 2, JobStatus.FAILED, statement=huge), stored_job())]
    )
    [(action, actor, details)] = audit.entries
    assert (action, actor, details["target"], details["field"]) == (
        "statement_mismatch",
        "agent:a1",
        "j1",
        "statement",
    )


class RefusesOne:
    """A store whose transaction fails whenever it holds job ``bad``'s statement."""

    def __init__(self) -> None:
        self.kept: list[str] = []

    async def jobs_blobs(self, org: str, ids: list[str], kinds: object) -> dict[str, list[BlobInfo]]:
        return {}

    async def add_job_statements(self, records: list[JobStatementRecord]) -> list[bool]:
        if any(record.job_id == "bad" for record in records):
            raise RuntimeError("constraint failed")
        self.kept += [record.job_id for record in records]
        return [True] * len(records)


async def test_a_batch_that_fails_is_kept_one_statement_at_a_time() -> None:
    store, audit = RefusesOne(), Audit()
    recorder = StatementRecorder(store, None, tuple, audit, lambda spec: "")  # type: ignore[arg-type]
    undecodable = SubmittedStatement(b"not a statement", b"sig", b"cert")  # kept, as a mismatch
    batch = [
        (JobReport("acme", "a1", job_id, 2, JobStatus.FAILED, statement=undecodable), stored_job(id=job_id))
        for job_id in ("j1", "bad", "j3")
    ]
    with capture_logs() as logs:
        await recorder.record(batch)
    assert store.kept == ["j1", "j3"]
    assert [details["target"] for _, _, details in audit.entries] == ["j1", "j3"]
    events = [(entry["event"], entry.get("job_ids")) for entry in logs if entry["log_level"] != "warning"]
    assert events == [("job_statements_not_recorded", ["bad"])]
    assert any(entry["event"] == "job_statements_batch_failed" for entry in logs)
