"""The agent signs each job's statement with its current key when the result is made
(agent/statements.py on the FakeRuntime): the statement says what the result says, carries
the log chain head of the batches sent and the isolation read back, and verifies with the
agent's certificate; a job that fails before it runs is signed too."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.executor import Executor
from testhide.agent.model import Assignment, Isolation, JobResult, LogStream, Outcome, Report
from testhide.agent.outbox import Outbox
from testhide.agent.runtime.fake import FakeRuntime, Script
from testhide.agent.spool import Spool
from testhide.common.evidence import log_chain_head
from testhide.common.identity import AgentIdentity
from testhide.common.statement import Statement, isolation_facts, signature_valid
from testhide.controlplane.ca.authority import CertificateAuthority

WAIT = 5.0


def credentials(agent_id: str = "a1") -> Credentials:
    ca = CertificateAuthority.create("test.local")
    key_pem, csr_pem = new_key_and_csr()
    issued = ca.issue_agent(
        csr_pem, AgentIdentity("test.local", "acme", "default", agent_id), timedelta(hours=1)
    )
    return Credentials(agent_id, ("cp:1",), ("cp:2",), key_pem, issued.certificate_pem, ca.certificate_pem)


async def run(tmp_path: Path, job: Assignment, script: Script | None) -> tuple[JobResult, Credentials]:
    reports: list[Report] = []
    outbox = Outbox(Spool(tmp_path / "spool"))
    outbox.attach(reports.append)
    runtime = FakeRuntime()
    if script is not None:
        runtime.scripts[job.job_id] = script
    made = credentials()
    executor = Executor(AgentConfig(data_dir=tmp_path), runtime, outbox, credentials=lambda: made)
    await asyncio.wait_for(executor.run(job), WAIT)
    [result] = [r for r in reports if isinstance(r, JobResult)]
    return result, made


def job(**changes: object) -> Assignment:
    return Assignment("j1", 4, "alpine:3", ("true",), attempt=2, spec_digest="5" * 64, **changes)  # type: ignore[arg-type]


async def test_the_result_carries_a_statement_signed_by_the_agents_key(tmp_path: Path) -> None:
    output = [(LogStream.STDOUT, b"hello\n")]
    isolation = Isolation(runtime="runc", network_mode="none", cpus=1.5, image_digest="sha256:" + "a" * 64)
    result, made = await run(tmp_path, job(), Script(output=output, exit_code=3, isolation=isolation))
    assert result.signed is not None
    statement = Statement.decode(result.signed.payload)
    assert (statement.job_id, statement.org, statement.agent_id, statement.attempt, statement.epoch) == (
        "j1",
        "acme",
        "a1",
        2,
        4,
    )
    assert (statement.outcome, statement.exit_code, statement.spec_digest) == ("EXITED", 3, "5" * 64)
    assert statement.log_chain_head == log_chain_head("j1", [(1, [(1, b"hello\n")])]).hex()
    assert statement.log_chain_head == result.log_chain_head.hex()
    assert statement.isolation == isolation_facts(isolation)
    assert statement.image_digest == isolation.image_digest
    cert = x509.load_der_x509_certificate(result.signed.certificate_der)
    assert cert == made.certificate
    assert signature_valid(cert, result.signed.payload, result.signed.signature)


async def test_a_job_refused_before_it_runs_is_signed_too(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, job(allowed_images=("debian:*",)), None)
    assert result.outcome == Outcome.ERROR
    assert result.signed is not None
    statement = Statement.decode(result.signed.payload)
    assert (statement.outcome, statement.exit_code, statement.isolation) == ("ERROR", -1, {})
    assert statement.reason == result.reason
