"""Signed job statements end to end, with a real control plane, agent and Docker job: the
evidence GetEvidence returns verifies offline with nothing but the CA file, a client recomputes
the spec digest from the job it downloads, another organisation learns nothing, an exit code
edited in the database no longer matches the signed statement, a statement signed with
another agent's key is kept but not countersigned, and audited, and after an operator's key
rotation what the old key countersigned still verifies."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf.json_format import MessageToDict

from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.statements import StatementSigner
from testhide.common.statement import Envelope, Signature, Statement, spec_digest, verify_evidence
from testhide.controlplane.ca import statement_keys
from testhide.controlplane.ca.statement_store import JobStatementRecord
from testhide.controlplane.jobs.model import JobSpec
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, RunningControlPlane, enrolled, eventually, operator

pytestmark = pytest.mark.docker

SCRIPT = (
    "echo hello; mkdir -p out; echo data > out/a.txt;"
    ' echo \'<testsuite name="s" tests="1"><testcase classname="c" name="t"/></testsuite>\' > report.xml;'
    " exit 3"
)


async def finished_with_statement(cp: RunningControlPlane, spec: JobSpec) -> tuple[str, JobStatementRecord]:
    assert cp.daemon.jobs is not None
    job_id = (await cp.daemon.jobs.submit("default", spec)).id
    store = cp.daemon._store
    assert store is not None
    record = await eventually(lambda: store.job_statement("default", job_id), 90, "the job's statement")
    return job_id, record


async def get(
    cp: RunningControlPlane, job_id: str, api_key: str | None = None
) -> tuple[jobs_pb2.Evidence, jobs_pb2.Job]:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        metadata = await cp.bearer(api_key)
        evidence = await stub.GetEvidence(jobs_pb2.GetEvidenceRequest(job_id=job_id), metadata=metadata)
        job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=metadata)
    return evidence, job


def envelope_of(evidence: jobs_pb2.Evidence) -> Envelope:
    return Envelope(
        evidence.payload, tuple(Signature(s.keyid, s.sig) for s in evidence.signatures), evidence.payload_type
    )


def ca_file(cp: RunningControlPlane) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(cp.ca_pem)


async def audited(cp: RunningControlPlane, action: str) -> list[object]:
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [e.event for e in entries if e.event.action == action]


async def test_a_finished_jobs_evidence_verifies_with_the_ca_file(
    cp: RunningControlPlane, docker_agent: Agent
) -> None:
    spec = JobSpec(
        image=JOB_IMAGE, command=("sh", "-c", SCRIPT), artifact_globs=("out/*",), junit_globs=("report.xml",)
    )
    job_id, record = await finished_with_statement(cp, spec)
    assert record.mismatch == ""

    evidence, job = await get(cp, job_id)
    assert evidence.mismatch == ""
    assert len(evidence.signatures) == 2
    assert (
        verify_evidence(
            envelope_of(evidence),
            evidence.agent_certificate,
            list(evidence.signing_certificates),
            ca_file(cp),
        )
        is None
    )
    statement = Statement.decode(evidence.payload)
    assert (statement.job_id, statement.agent_id, statement.outcome, statement.exit_code) == (
        job_id,
        docker_agent.agent_id,
        "EXITED",
        3,
    )
    assert [d.name for d in statement.artifacts] == ["out/a.txt"]
    assert [d.name for d in statement.junit_reports] == ["report.xml"]
    assert statement.isolation["network_mode"] == "none"
    # A client recomputes the spec digest from the job it downloads.
    assert statement.spec_digest == spec_digest(MessageToDict(job.spec, preserving_proto_field_name=True))
    # The CA that issued the agent's certificate travels with it.
    issuer = x509.load_der_x509_certificate(evidence.agent_ca_certificates[0])
    assert x509.load_der_x509_certificate(evidence.agent_certificate).issuer == issuer.subject
    assert await audited(cp, "statement_mismatch") == []


async def test_another_organisation_gets_not_found(cp: RunningControlPlane, docker_agent: Agent) -> None:
    job_id, _ = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    store = cp.daemon._store
    assert store is not None
    await store.create_org("beta", datetime.now(UTC))
    beta_key, _ = await cp.api_key("beta", "jobs:read")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get(cp, job_id, beta_key)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert job_id in (refused.value.details() or "")


async def test_an_exit_code_edited_in_the_database_no_longer_matches_the_signed_statement(
    cp: RunningControlPlane, docker_agent: Agent
) -> None:
    """The statement was signed by the agent and countersigned when the job ended; an edit of
    the job's row afterwards leaves them as they were, so the job the server shows and the
    statement disagree, and a verifier comparing them (``testhide verify``) sees it."""
    job_id, _ = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("sh", "-c", "exit 3")))
    with sqlite3.connect(cp.data_dir / "testhide.db") as db:
        db.execute("UPDATE jobs SET exit_code = 0, status = 'SUCCEEDED' WHERE id = ?", (job_id,))
    evidence, job = await get(cp, job_id)
    assert (
        verify_evidence(
            envelope_of(evidence),
            evidence.agent_certificate,
            list(evidence.signing_certificates),
            ca_file(cp),
        )
        is None
    )  # the signatures are intact ...
    assert job.exit_code == 0
    assert Statement.decode(evidence.payload).exit_code == 3  # ... and say what really happened


async def test_a_statement_signed_with_another_agents_key_is_not_countersigned(
    cp: RunningControlPlane, docker_agent: Agent, tmp_path: Path
) -> None:
    other = Credentials.load(await enrolled(cp, tmp_path, "other"))
    # A compromised agent signing with a key that is not its own.
    docker_agent._executor._signer = StatementSigner(lambda: other)
    job_id, record = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    assert record.countersignature is None
    assert record.mismatch.startswith(f"agent_certificate: names agent {other.agent_id}")

    evidence, _ = await get(cp, job_id)
    assert len(evidence.signatures) == 1
    assert evidence.mismatch == record.mismatch
    failure = verify_evidence(
        envelope_of(evidence), evidence.agent_certificate, list(evidence.signing_certificates), ca_file(cp)
    )
    assert failure == "expected the agent's signature and a countersignature, found 1"
    [entry] = await audited(cp, "statement_mismatch")
    assert (entry.target, entry.details["field"]) == (job_id, "agent_certificate")  # type: ignore[attr-defined]


async def test_an_operator_rotation_retires_the_key_and_what_it_signed_still_verifies(
    cp: RunningControlPlane, docker_agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        statement_keys, "RELOAD_S", 0.0
    )  # the running serve looks at once, not within a minute
    first_job, first = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    code, _, err = await operator("statement-keys", "rotate", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    assert f"retired: {first.signing_key_id}" in err
    code, out, err = await operator("statement-keys", "list", "--data-dir", str(cp.data_dir), "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert (rows[0]["id"], rows[0]["state"]) == (first.signing_key_id, "retired")
    new_key = rows[1]["id"]
    assert rows[1]["state"] == "active"
    [rotated] = await audited(cp, "statement_key_rotated")
    assert rotated.target == new_key  # type: ignore[attr-defined]

    _, second = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    assert second.signing_key_id == new_key
    evidence, _ = await get(cp, first_job)
    assert len(evidence.signing_certificates) == 2
    assert (
        verify_evidence(
            envelope_of(evidence),
            evidence.agent_certificate,
            list(evidence.signing_certificates),
            ca_file(cp),
        )
        is None
    )
