"""What `testhide` prints: tables and summaries for people, and JSON with
one convention for every `--json`:

- one JSON document on stdout; every field always present, in a fixed order;
- field names in snake_case, as in the contract (`exit_code`, `rejected_reports`);
- enum values by their short upper-case name, without the type's prefix
  (`SUCCEEDED`, not `JOB_STATUS_SUCCEEDED`; `PASSED`, not `TEST_STATUS_PASSED`);
- times in RFC 3339, UTC, with microseconds and `Z` (`2030-01-02T03:04:05.000000Z`),
  so that they also sort as text;
- durations in seconds as numbers, in fields ending `_s`; sizes in bytes as integers;
- `null` for a value that does not exist (the exit code of a running job, a time
  not reached yet, the agent of a queued job); text that may be empty is `""`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from testhide.cli.model import Job, TestResults, TestStatus


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "status_reason": job.status_reason,
        "image": job.image,
        "command": list(job.command),
        "pool": job.pool,
        "agent_id": job.agent_id,
        "attempt": job.attempt,
        "retry_of": job.retry_of,
        "retried_as": job.retried_as,
        "created_at": timestamp(job.created_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "log_size": job.log_size,
        "transitions": [
            {"status": t.status.value, "at": timestamp(t.at), "reason": t.reason} for t in job.transitions
        ],
    }


def results_json(results: TestResults) -> dict[str, Any]:
    return {
        "total": results.total,
        "passed": results.passed,
        "failed": results.failed,
        "errors": results.errors,
        "skipped": results.skipped,
        "cases": [
            {
                "suite": case.suite,
                "classname": case.classname,
                "name": case.name,
                "duration_s": case.duration_s,
                "status": case.status.value,
                "message": case.message,
            }
            for case in results.cases
        ],
        "rejected_reports": list(results.rejected_reports),
    }


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


def jobs_table(jobs: list[Job]) -> list[str]:
    lines = [f"{'ID':<30} {'STATUS':<10} {'EXIT':>4}  {'CREATED':<20} {'IMAGE':<24} COMMAND"]
    for job in jobs:
        exit_code = "" if job.exit_code is None else str(job.exit_code)
        created = (timestamp(job.created_at) or "")[:19]
        command = " ".join(" ".join(job.command).split())[:60]
        status, image = job.status.value, job.image[:24]
        lines.append(f"{job.id:<30} {status:<10} {exit_code:>4}  {created:<20} {image:<24} {command}")
    return lines


def job_details(job: Job) -> list[str]:
    shown = job_json(job)
    lines = []
    for key in (
        "id",
        "status",
        "exit_code",
        "status_reason",
        "image",
        "command",
        "pool",
        "agent_id",
        "created_at",
        "started_at",
        "finished_at",
    ):
        value = shown[key]
        lines.append(f"{key + ':':<15} {value if value not in (None, '') else '-'}")
    lines.extend(f"  {t['at']}  {t['status']:<10} {t['reason']}" for t in shown["transitions"])
    return lines


def results_summary(results: TestResults) -> list[str]:
    lines = [
        f"tests: {results.total} total, {results.passed} passed, {results.failed} failed, "
        f"{results.errors} errors, {results.skipped} skipped"
    ]
    for case in results.cases:
        if case.status in (TestStatus.FAILED, TestStatus.ERROR):
            where = ".".join(p for p in (case.classname, case.name) if p)
            first_line = case.message.splitlines()[0] if case.message else ""
            lines.append(f"  {case.status.value} {where}: {first_line}")
    lines.extend(f"  report refused: {path}" for path in results.rejected_reports)
    return lines
