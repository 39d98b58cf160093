"""The in-toto export of a job's evidence (``GetEvidence`` with ``in_toto``), end to end with a real
control plane, agent and Docker job: the DSSE envelope verifies with securesystemslib and the
statement-signing certificate the CA file vouches for, its statement and SLSA predicate pass
in-toto's own bindings, it restates what the agent signed (artifact digests, spec digest) and never
a secret's value; a job without a countersigned statement is FAILED_PRECONDITION, and another
organisation gets NOT_FOUND."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2  # type: ignore[import-untyped]
from in_toto_attestation.v1 import statement_pb2  # type: ignore[import-untyped]
from in_toto_attestation.v1.statement import Statement as InTotoStatement  # type: ignore[import-untyped]
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]  # public, not in an __all__

from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.statements import StatementSigner
from testhide.common.statement import Statement, key_id, spec_digest
from testhide.controlplane.jobs.model import JobSpec
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, RunningControlPlane, enrolled
from tests.integration.test_signed_statements import ca_file, finished_with_statement

pytestmark = pytest.mark.docker

SECRET = b"hunter2-never-in-provenance"


async def evidence(
    cp: RunningControlPlane, job_id: str, in_toto: bool = True, api_key: str | None = None
) -> jobs_pb2.Evidence:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        return await jobs_pb2_grpc.JobsStub(channel).GetEvidence(
            jobs_pb2.GetEvidenceRequest(job_id=job_id, in_toto=in_toto), metadata=await cp.bearer(api_key)
        )


def verified(cp: RunningControlPlane, found: jobs_pb2.Evidence) -> dict[str, Any]:
    """What a verifier holding only the CA file does: find the signing certificate the envelope
    names among those published, check the CA issued it, verify the DSSE envelope with it
    (securesystemslib, threshold 1), and check the statement with in-toto's bindings."""
    envelope = Envelope.from_dict(json.loads(found.in_toto_envelope))
    assert envelope.payload_type == "application/vnd.in-toto+json"
    [keyid] = envelope.signatures
    [certificate] = [der for der in found.signing_certificates if key_id(der) == keyid]
    signer = x509.load_der_x509_certificate(certificate)
    [ca] = ca_file(cp)
    signer.verify_directly_issued_by(ca)
    key = SSlibKey.from_crypto(signer.public_key(), keyid=keyid)
    assert list(envelope.verify([key], 1)) == [keyid]
    statement: dict[str, Any] = json.loads(envelope.payload)
    InTotoStatement.copy_from_pb(json_format.ParseDict(statement, statement_pb2.Statement())).validate()
    json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())
    return statement


async def test_the_in_toto_export_validates_with_the_library(
    cp: RunningControlPlane, docker_agent: Agent
) -> None:
    assert cp.daemon.jobs is not None
    assert cp.daemon.certificates is not None
    await cp.daemon.jobs._secrets.set("default", "DEPLOY_TOKEN", SECRET)
    spec = JobSpec(
        image=JOB_IMAGE,
        command=(
            "sh",
            "-c",
            'mkdir -p out; echo "$DEPLOY_TOKEN" > out/a.txt',  # an artifact holding the value
        ),
        secrets=("DEPLOY_TOKEN",),
        artifact_globs=("out/*",),
    )
    job_id, record = await finished_with_statement(cp, spec)
    assert record.countersignature is not None

    plain = await evidence(cp, job_id, in_toto=False)
    assert plain.in_toto_envelope == b""  # only when asked
    found = await evidence(cp, job_id)
    statement = verified(cp, found)
    signed = Statement.decode(found.payload)
    assert (signed.outcome, signed.exit_code) == ("EXITED", 0)

    assert statement["subject"] == [
        {"name": "out/a.txt", "digest": {"sha256": hashlib.sha256(SECRET + b"\n").hexdigest()}}
    ]
    build, run = statement["predicate"]["buildDefinition"], statement["predicate"]["runDetails"]
    assert spec_digest(build["externalParameters"]) == signed.spec_digest
    assert build["externalParameters"]["secrets"] == ["DEPLOY_TOKEN"]
    # The job had the value (its artifact's digest above), the provenance only its name.
    assert SECRET not in found.in_toto_envelope
    assert SECRET not in json.dumps(statement).encode()
    assert build["internalParameters"]["agentId"] == docker_agent.agent_id
    assert build["internalParameters"]["isolation"]["network_mode"] == "none"
    [image] = build["resolvedDependencies"]
    assert image["name"] == JOB_IMAGE
    assert "sha256:" + image["digest"]["sha256"] in (signed.image_digest, signed.isolation["image_id"])
    assert run["builder"]["id"] == f"testhide://{cp.daemon.certificates.current.active_ca.trust_domain}"
    assert run["metadata"] == {
        "invocationId": f"{job_id}/attempt/1",
        "startedOn": signed.started_at,
        "finishedOn": signed.finished_at,
    }
    assert run["byproducts"][0]["digest"] == {"sha256": hashlib.sha256(found.payload).hexdigest()}


async def test_a_job_without_a_countersigned_statement_is_failed_precondition(
    cp: RunningControlPlane, docker_agent: Agent, tmp_path: Path
) -> None:
    other = Credentials.load(await enrolled(cp, tmp_path, "other"))
    docker_agent._executor._signer = StatementSigner(lambda: other)  # signs with another agent's key
    job_id, record = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    assert record.countersignature is None

    assert len((await evidence(cp, job_id, in_toto=False)).signatures) == 1  # the evidence itself is there
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await evidence(cp, job_id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"job {job_id} has no countersigned statement" in (refused.value.details() or "")
    assert "agent_certificate" in (refused.value.details() or "")  # and why not


async def test_another_organisation_gets_not_found(cp: RunningControlPlane, docker_agent: Agent) -> None:
    job_id, _ = await finished_with_statement(cp, JobSpec(image=JOB_IMAGE, command=("true",)))
    assert cp.daemon._store is not None
    await cp.daemon._store.create_org("beta", datetime.now(UTC))
    beta_key, _ = await cp.api_key("beta", "jobs:read")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await evidence(cp, job_id, api_key=beta_key)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await evidence(cp, job_id)).in_toto_envelope  # its own organisation gets it
