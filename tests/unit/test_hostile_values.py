"""Hostile values at the control plane's edge, without sockets (issue 12, points 7 to 10):
how errors quote input, numbers that would overflow a conversion, unbounded labels, ids
of the wrong form, and the guard's tolerant deserializer."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from testhide.controlplane.errors import InvalidArgument, quoted
from testhide.controlplane.jobs.model import JobFilter, JobSpec, Resources
from testhide.controlplane.jobs.validation import (
    MAX_LABELS,
    validate_job_id,
    validate_relative_path,
    validate_spec,
)
from testhide.controlplane.rpc.convert import (
    check_agent_message,
    check_artifact_header,
    page_from_pb,
    spec_from_pb,
)
from testhide.controlplane.rpc.guard import UNDECODABLE, UndecodableRequest, tolerant
from testhide.controlplane.rpc.status import MAX_DETAILS_BYTES, bounded
from testhide.protos.v1 import agent_pb2, jobs_pb2

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)


# Echoes ---------------------------------------------------------------------------------------------


def test_quoted_keeps_short_input_and_cuts_long_input_to_a_prefix() -> None:
    assert quoted("abc") == "'abc'"
    assert quoted("a\nb") == "'a\\nb'"
    cut = quoted("x" * 1_000_000)
    assert cut.startswith("'" + "x" * 64 + "'")
    assert "1000000 characters" in cut
    assert len(cut) < 100
    assert "bytes" in quoted(b"y" * 100)


@given(st.text(min_size=0, max_size=5000))
def test_bounded_details_never_exceed_the_limit(text: str) -> None:
    assert len(bounded(text).encode()) <= MAX_DETAILS_BYTES
    if len(text.encode()) <= MAX_DETAILS_BYTES:
        assert bounded(text) == text


@pytest.mark.parametrize(
    "check",
    [
        lambda v: validate_job_id("job_id", v),
        lambda v: validate_relative_path("path", "/" + v),
        lambda v: validate_spec(JobSpec(image=v, command=("true",))),
        lambda v: validate_spec(JobSpec(image="busybox", command=("true",), env={v: "x"})),
        lambda v: validate_spec(JobSpec(image="busybox", command=("true",), labels={v: "x"})),
        lambda v: validate_spec(JobSpec(image="busybox", command=("true",), pool=v)),
        lambda v: validate_spec(JobSpec(image="busybox", command=("true",), secrets=(v,))),
    ],
    ids=["job_id", "path", "image", "env-name", "label-key", "pool", "secret-name"],
)
def test_a_megabyte_of_input_is_never_echoed_by_a_validator(check: Any) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check("\u00e9" * (1 << 20))
    assert len(str(refused.value)) < 250


@pytest.mark.parametrize("job_id", ["", "j", "j" + "0" * 23, "j" + "0" * 25, "J" + "0" * 24, "j" + "g" * 24])
def test_malformed_job_ids_are_refused(job_id: str) -> None:
    with pytest.raises(InvalidArgument, match="job_id"):
        validate_job_id("job_id", job_id)


def test_a_well_formed_job_id_passes() -> None:
    assert validate_job_id("job_id", "j01a22ca93de19a25a63a877f") == "j01a22ca93de19a25a63a877f"


# Overflow -------------------------------------------------------------------------------------------


@given(
    seconds=INT64,
    nanos=INT32,
    cpus=st.floats(allow_nan=True, allow_infinity=True),
    memory=INT64,
    pids=INT64,
    retries=INT32,
)
def test_any_numbers_in_a_job_spec_are_accepted_or_refused_as_invalid_argument(
    seconds: int, nanos: int, cpus: float, memory: int, pids: int, retries: int
) -> None:
    """No OverflowError, ValueError or anything else: every number is range-checked
    before it is converted."""
    spec = jobs_pb2.JobSpec(image="busybox", command=["true"], retries=retries)
    spec.timeout.seconds, spec.timeout.nanos = seconds, nanos
    spec.resources.cpus, spec.resources.memory_bytes, spec.resources.pids = cpus, memory, pids
    with contextlib.suppress(InvalidArgument):
        validate_spec(spec_from_pb(spec))


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(2**62, 0), (-(2**63), 0), (2**63 - 1, 0), (60, -1), (60, 10**9), (86_401, 0)]
)
def test_timeouts_beyond_range_are_refused_before_conversion(seconds: int, nanos: int) -> None:
    spec = jobs_pb2.JobSpec(image="busybox", command=["true"])
    spec.timeout.seconds, spec.timeout.nanos = seconds, nanos
    with pytest.raises(InvalidArgument, match="timeout"):
        validate_spec(spec_from_pb(spec))


@pytest.mark.parametrize("cpus", [1e-12, 5e-324, 0.009])
def test_a_cpu_limit_docker_would_read_as_unlimited_is_refused(cpus: float) -> None:
    """nano_cpus = int(cpus * 1e9) rounds to 0 for tiny values: Docker reads 0 as no limit."""
    with pytest.raises(InvalidArgument, match="cpus"):
        validate_spec(JobSpec(image="busybox", command=("true",), resources=Resources(cpus=cpus)))


def test_the_smallest_docker_cpu_limit_is_accepted() -> None:
    validate_spec(JobSpec(image="busybox", command=("true",), resources=Resources(cpus=0.01)))


@pytest.mark.parametrize("page_size", [-1, -(2**31)])
def test_a_negative_page_size_is_refused(page_size: int) -> None:
    with pytest.raises(InvalidArgument, match="page_size"):
        page_from_pb(jobs_pb2.ListJobsRequest(page_size=page_size))


def test_a_page_token_must_be_a_job_id() -> None:
    assert page_from_pb(jobs_pb2.ListJobsRequest(page_size=10)) == (10, "", JobFilter())
    with pytest.raises(InvalidArgument, match="page_token"):
        page_from_pb(jobs_pb2.ListJobsRequest(page_token="x" * 100))


JOB = "j01a22ca93de19a25a63a877f"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=JOB, epoch=0)), "started.epoch"),
        (agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=JOB, epoch=-(2**63))), "started.epoch"),
        (
            agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id="x" * 10_000, epoch=1)),
            "started.job_id",
        ),
        (agent_pb2.AgentMessage(log_batch=agent_pb2.LogBatch(job_id=JOB, epoch=1, seq=0)), "log_batch.seq"),
        (
            agent_pb2.AgentMessage(log_batch=agent_pb2.LogBatch(job_id=JOB, epoch=1, seq=2**63 - 1)),
            "log_batch.seq",
        ),
        (
            agent_pb2.AgentMessage(result=agent_pb2.JobResult(job_id=JOB, epoch=1, last_seq=-1)),
            "result.last_seq",
        ),
        (
            agent_pb2.AgentMessage(
                heartbeat=agent_pb2.Heartbeat(
                    running_jobs=[agent_pb2.RunningJob(job_id=JOB, epoch=2**63 - 1)]
                )
            ),
            "heartbeat.running_jobs.epoch",
        ),
        (agent_pb2.AgentMessage(refused=agent_pb2.JobRefused(job_id="", epoch=1)), "refused.job_id"),
    ],
)
def test_agent_messages_with_numbers_or_ids_out_of_range_are_refused(
    message: agent_pb2.AgentMessage, field: str
) -> None:
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        check_agent_message(message)


def test_agent_messages_in_range_pass() -> None:
    check_agent_message(agent_pb2.AgentMessage(log_batch=agent_pb2.LogBatch(job_id=JOB, epoch=1, seq=1)))
    check_agent_message(agent_pb2.AgentMessage(result=agent_pb2.JobResult(job_id=JOB, epoch=3, last_seq=0)))
    check_agent_message(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
    check_agent_message(agent_pb2.AgentMessage())
    check_artifact_header(agent_pb2.ArtifactHeader(job_id=JOB, epoch=1, size=0))
    with pytest.raises(InvalidArgument, match=r"header\.size"):
        check_artifact_header(agent_pb2.ArtifactHeader(job_id=JOB, epoch=1, size=-1))


# Unbounded labels -----------------------------------------------------------------------------------


def _labelled(labels: dict[str, str]) -> JobSpec:
    return JobSpec(image="busybox", command=("true",), labels=labels)


def test_as_many_labels_as_an_agent_announces_are_accepted_and_no_more() -> None:
    validate_spec(_labelled({f"l{i}": "v" * 256 for i in range(MAX_LABELS)}))
    with pytest.raises(InvalidArgument, match="at most 64 labels"):
        validate_spec(_labelled({f"l{i}": "v" for i in range(MAX_LABELS + 1)}))
    with pytest.raises(InvalidArgument, match="at most 64 labels"):
        validate_spec(_labelled({f"l{i}": "v" for i in range(10_000)}))


@pytest.mark.parametrize("value", ["x" * 257, "\u00e9" * 129, "a\x00b", "a\nb", "a\x7fb", "a\u0085b"])
def test_label_values_are_bounded_in_bytes_and_free_of_control_characters(value: str) -> None:
    with pytest.raises(InvalidArgument, match="label team"):
        validate_spec(_labelled({"team": value}))


def test_label_values_may_be_any_printable_text() -> None:
    validate_spec(_labelled({"team": "Ünïcode ok, spaces too", "empty": ""}))


# Undecodable requests -------------------------------------------------------------------------------


def _refuse(data: bytes) -> Any:
    raise DecodeError("Error parsing message with type 'testhide.v1.GetJobRequest'")


def test_an_undecodable_unary_request_becomes_the_marker() -> None:
    assert tolerant(_refuse, streaming=False)(b"\xff") is UNDECODABLE
    assert tolerant(jobs_pb2.GetJobRequest.FromString, streaming=False)(b"\x0a\x02\xff\xfe") is UNDECODABLE


def test_an_undecodable_streamed_request_raises_where_it_is_read() -> None:
    with pytest.raises(UndecodableRequest, match="the request could not be decoded") as raised:
        tolerant(_refuse, streaming=True)(b"\xff")
    assert raised.value.__cause__ is None  # nothing of the parser's text travels on
    assert isinstance(raised.value, InvalidArgument)


def test_a_decodable_request_passes_unchanged() -> None:
    data = jobs_pb2.GetJobRequest(job_id=JOB).SerializeToString()
    assert tolerant(jobs_pb2.GetJobRequest.FromString, streaming=False)(data).job_id == JOB
