"""One JSON convention for every `--json` of `testhide` (see cli/output.py
and README.md): snake_case fields, short upper-case enum names, RFC 3339 UTC
times with microseconds, null for what does not exist."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from testhide.cli.output import dumps, job_json, results_json
from testhide.cli.wire_convert import job_from_pb, results_from_pb
from testhide.protos.v1 import jobs_pb2

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
ENUM = re.compile(r"^[A-Z][A-Z_]*$")


def stamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def keys(document: Any) -> set[str]:
    if isinstance(document, dict):
        return set(document) | {k for v in document.values() for k in keys(v)}
    if isinstance(document, list):
        return {k for v in document for k in keys(v)}
    return set()


CREATED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)  # a whole second: protobuf would print no fraction


def finished_job() -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id="j1",
        org="default",
        spec=jobs_pb2.JobSpec(image="busybox", command=["sh", "-c", "exit 3"], pool="default"),
        status=jobs_pb2.JOB_STATUS_FAILED,
        exit_code=3,
        created_at=stamp(CREATED),
        started_at=stamp(CREATED + timedelta(microseconds=5)),
        finished_at=stamp(CREATED + timedelta(seconds=1, milliseconds=500)),
        agent_id="a1",
        transitions=[
            jobs_pb2.StatusTransition(status=jobs_pb2.JOB_STATUS_QUEUED, at=stamp(CREATED)),
            jobs_pb2.StatusTransition(
                status=jobs_pb2.JOB_STATUS_FAILED, at=stamp(CREATED + timedelta(seconds=1)), reason="exit 3"
            ),
        ],
        log_size=12,
        attempt=1,
    )


def test_a_job_in_json() -> None:
    shown = job_json(job_from_pb(finished_job()))
    assert shown["status"] == "FAILED"
    assert [t["status"] for t in shown["transitions"]] == ["QUEUED", "FAILED"]
    assert shown["created_at"] == "2030-01-02T03:04:05.000000Z"
    assert shown["started_at"] == "2030-01-02T03:04:05.000005Z"
    assert shown["finished_at"] == "2030-01-02T03:04:06.500000Z"
    # Fixed-width times sort as text, which protobuf's own JSON ("...05Z" after "...05.000005Z") does not.
    assert shown["created_at"] < shown["started_at"] < shown["finished_at"]
    assert shown["exit_code"] == 3
    assert shown["command"] == ["sh", "-c", "exit 3"]
    assert (shown["retry_of"], shown["retried_as"]) == (None, None)
    assert all(SNAKE.match(k) for k in keys(shown))


def test_what_does_not_exist_is_null() -> None:
    queued = jobs_pb2.Job(
        id="j2", spec=jobs_pb2.JobSpec(image="busybox", command=["true"]), status=jobs_pb2.JOB_STATUS_QUEUED
    )
    shown = job_json(job_from_pb(queued))
    assert shown["status"] == "QUEUED"
    assert shown["exit_code"] is None
    assert shown["agent_id"] is None
    assert (shown["started_at"], shown["finished_at"]) == (None, None)
    assert shown["status_reason"] == ""


def test_test_results_in_json_follow_the_same_convention() -> None:
    results = jobs_pb2.TestResults(
        total=2,
        passed=1,
        failed=1,
        cases=[
            jobs_pb2.TestCase(
                suite="s", classname="c", name="ok", duration_s=0.25, status=jobs_pb2.TEST_STATUS_PASSED
            ),
            jobs_pb2.TestCase(
                suite="s", name="bad", status=jobs_pb2.TEST_STATUS_FAILED, message="assert 1 == 2"
            ),
        ],
        rejected_reports=["r/evil.xml"],
    )
    shown = results_json(results_from_pb(results))
    assert [c["status"] for c in shown["cases"]] == ["PASSED", "FAILED"]
    assert shown["cases"][0]["duration_s"] == 0.25
    assert shown["rejected_reports"] == ["r/evil.xml"]
    assert (shown["total"], shown["passed"], shown["failed"], shown["errors"]) == (2, 1, 1, 0)
    assert all(SNAKE.match(k) for k in keys(shown))
    assert all(ENUM.match(c["status"]) for c in shown["cases"])


def test_an_enum_value_from_a_newer_server_is_unspecified_not_a_crash() -> None:
    newer = jobs_pb2.Job(id="j3", status=99)  # type: ignore[arg-type]
    assert job_json(job_from_pb(newer))["status"] == "UNSPECIFIED"


def test_dumps_is_one_document_that_round_trips() -> None:
    shown = job_json(job_from_pb(finished_job()))
    assert json.loads(dumps([shown])) == [shown]
    assert all(TIME.match(t["at"]) for t in shown["transitions"])


def test_a_job_in_json_has_its_spec_agent_and_isolation_in_a_fixed_order() -> None:
    job = finished_job()
    job.spec.env["B"] = "2"
    job.spec.env["A"] = "1"
    job.spec.secrets.append("TOKEN")
    job.spec.timeout.FromTimedelta(timedelta(minutes=5))
    job.agent.CopyFrom(
        jobs_pb2.JobAgent(id="a1", name="box-1", host="build-7", version="1.0", pool="default")
    )
    job.isolation.CopyFrom(
        jobs_pb2.Isolation(runtime="runc", network_mode="none", interfaces=["lo"], cap_drop=["ALL"], cpus=1.5)
    )
    shown = job_json(job_from_pb(job))
    assert list(shown) == [
        "id", "status", "exit_code", "status_reason", "image", "command", "pool", "agent_id", "attempt",
        "retries", "retry_of", "retried_as", "created_at", "started_at", "finished_at", "log_size", "spec",
        "agent", "isolation", "fetch", "service_isolation", "transitions",
    ]  # fmt: skip
    assert list(shown["spec"]) == [
        "image", "command", "env", "pool", "workdir", "timeout_s", "labels", "secrets", "runtime", "cpus",
        "memory_bytes", "pids", "artifact_globs", "junit_globs", "workspace_id", "fetch", "fetch_secrets",
        "cache", "services",
    ]  # fmt: skip
    assert shown["spec"]["env"] == {"A": "1", "B": "2"}
    assert (shown["spec"]["secrets"], shown["spec"]["timeout_s"]) == (["TOKEN"], 300.0)
    assert shown["agent"] == {
        "id": "a1",
        "name": "box-1",
        "host": "build-7",
        "version": "1.0",
        "pool": "default",
    }
    assert list(shown["isolation"]) == [
        "runtime", "network_mode", "interfaces", "user", "cap_add", "cap_drop", "no_new_privileges",
        "seccomp", "read_only_root", "pids_limit", "memory_bytes", "cpus", "image_id", "image_digest",
        "mounts",
    ]  # fmt: skip
    assert (shown["isolation"]["interfaces"], shown["isolation"]["cap_add"]) == (["lo"], [])
    # Every key but the job's own env and labels (its data, named as the job names them).
    assert all(SNAKE.match(k) for k in keys({**shown, "spec": list(shown["spec"])}))
    assert json.loads(dumps(shown)) == shown


def test_a_job_not_yet_assigned_has_null_agent_and_isolation() -> None:
    shown = job_json(job_from_pb(jobs_pb2.Job(id="j2", status=jobs_pb2.JOB_STATUS_QUEUED)))
    assert (shown["agent"], shown["isolation"], shown["fetch"]) == (None, None, None)
