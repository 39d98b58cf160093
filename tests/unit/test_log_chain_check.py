"""The control plane's side of the agent's log chain head: a result's head is checked for form
before anything is looked up, and a head that differs from the stored one is said out loud
(``log_chain_mismatch``, in the log and the audit log) while the result is still recorded."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.logs import check_log_chain
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus
from testhide.controlplane.rpc.convert import check_agent_message
from testhide.protos.v1 import agent_pb2
from tests.unit.fakes import MemoryAudit

JOB_ID = "j" + "0" * 24
STORED, OTHER = b"\x01" * 32, b"\x02" * 32


def ended(stored: bytes, reported: bytes) -> Job:
    spec = JobSpec(image="alpine:3", command=("true",), pool="default")
    return Job(
        id="j1",
        org="acme",
        spec=spec,
        status=JobStatus.SUCCEEDED,
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
        agent_id="a1",
        last_seq=4,
        log_chain_head=stored,
        agent_log_chain_head=reported,
    )


async def test_a_head_that_differs_is_logged_and_audited_with_both_values() -> None:
    audit = MemoryAudit()
    with capture_logs() as logs:
        await check_log_chain(ended(STORED, OTHER), Auditor(audit, b"k" * 32))
    assert [e["event"] for e in logs] == ["log_chain_mismatch"]
    assert (logs[0]["stored_head"], logs[0]["agent_head"]) == (STORED.hex(), OTHER.hex())
    assert logs[0]["log_level"] == "warning"
    assert audit.actions() == ["log_chain_mismatch"]
    event = audit.entries[0].event
    assert (event.actor, event.org, event.target) == ("agent:a1", "acme", "j1")
    assert (event.details["stored_head"], event.details["agent_head"]) == (STORED.hex(), OTHER.hex())


@pytest.mark.parametrize(
    ("stored", "reported"),
    [(STORED, STORED), (STORED, b""), (b"", OTHER)],
    ids=["equal", "agent older than the chain", "log older than the chain"],
)
async def test_nothing_is_said_when_there_is_nothing_to_compare_or_they_agree(
    stored: bytes, reported: bytes
) -> None:
    audit = MemoryAudit()
    with capture_logs() as logs:
        await check_log_chain(ended(stored, reported), Auditor(audit, b"k" * 32))
    assert logs == []
    assert audit.entries == []


@pytest.mark.parametrize("head", [b"", STORED])
def test_a_result_with_no_head_or_a_digest_is_taken(head: bytes) -> None:
    result = agent_pb2.JobResult(job_id=JOB_ID, epoch=1, last_seq=0, log_chain_head=head)
    check_agent_message(agent_pb2.AgentMessage(result=result))


@pytest.mark.parametrize("head", [b"\x00", b"\x01" * 31, b"\x01" * 33, b"\x01" * 4096])
def test_a_result_whose_head_is_no_digest_is_refused(head: bytes) -> None:
    result = agent_pb2.JobResult(job_id=JOB_ID, epoch=1, last_seq=0, log_chain_head=head)
    with pytest.raises(InvalidArgument, match="log_chain_head"):
        check_agent_message(agent_pb2.AgentMessage(result=result))
