"""A job's SLSA provenance (jobs/provenance.py): an in-toto Statement v1 that restates the
countersigned job statement, in a DSSE envelope that securesystemslib verifies with the control
plane's statement-signing certificate and whose statement in-toto's own bindings accept; the files
the job uploaded as subjects (the statement itself for a job that uploaded none); the spec as
external parameters (secret names, no values), whose digest is the one the agent signed; and a
refusal, never an export, for a job with no countersigned statement, another organisation's job,
a statement edited after it was countersigned, or a spec edited after it was signed."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2  # type: ignore[import-untyped]
from in_toto_attestation.v1 import statement_pb2  # type: ignore[import-untyped]
from in_toto_attestation.v1.statement import Statement as InTotoStatement  # type: ignore[import-untyped]
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]  # public, not in an __all__

from testhide.common.identity import AgentIdentity
from testhide.common.isolation import Isolation
from testhide.common.statement import (
    FileDigest,
    Statement,
    isolation_facts,
    key_id,
    rfc3339,
    sign,
    spec_digest,
)
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.statement_keys import StatementKeys, new_statement_key, unseal_key
from testhide.controlplane.ca.statement_store import JobStatementRecord, StatementKeyRecord
from testhide.controlplane.errors import FailedPrecondition, NotFound
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus
from testhide.controlplane.jobs.provenance import (
    BUILD_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    PREDICATE_TYPE,
    ProvenanceExporter,
    statement_subject_name,
)
from testhide.controlplane.rpc.evidence import spec_json_of

NOW = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
ISOLATION = Isolation(
    runtime="runsc",
    network_mode="none",
    interfaces=("lo",),
    cpus=2.0,
    image_id="sha256:" + "c" * 64,
    image_digest="sha256:" + "a" * 64,
)
SPEC = JobSpec(
    image="registry.local/build:1",
    command=("make", "test"),
    env={"MODE": "ci"},
    pool="linux",
    secrets=("DEPLOY_TOKEN",),
    artifact_globs=("out/*",),
)


class Store:
    """Jobs, their kept statements and the statement-signing keys, in memory."""

    def __init__(self) -> None:
        self.keys: list[StatementKeyRecord] = []
        self.jobs: dict[tuple[str, str], Job] = {}
        self.statements: dict[tuple[str, str], JobStatementRecord] = {}

    async def add_statement_key(self, record: StatementKeyRecord) -> None:
        self.keys.append(record)

    async def statement_keys(self) -> list[StatementKeyRecord]:
        return list(self.keys)

    async def retire_statement_key(self, key_id: str, at: datetime) -> bool:
        raise AssertionError("no rotation here")

    async def add_job_statements(self, records: Sequence[JobStatementRecord]) -> list[bool]:
        for record in records:
            self.statements[record.org, record.job_id] = record
        return [True] * len(records)

    async def get_job(self, org: str, job_id: str) -> Job | None:
        return self.jobs.get((org, job_id))

    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None:
        return self.statements.get((org, job_id))


class ControlPlane:
    def __init__(self) -> None:
        self.ca = CertificateAuthority.create("test.local")
        self.store = Store()
        self.keys = StatementKeys(self.store, MasterKey.generate(), lambda: self.ca, clock=lambda: NOW)
        self.exporter = ProvenanceExporter(self.store, self.keys, lambda: "test.local", spec_json_of)
        self.agent_key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(self.agent_key, hashes.SHA256())
        )
        issued = self.ca.issue_agent(
            csr.public_bytes(serialization.Encoding.PEM),
            AgentIdentity("test.local", "acme", "linux", "a1"),
            timedelta(hours=1),
            NOW - timedelta(minutes=1),
        )
        self.agent_cert = x509.load_pem_x509_certificate(issued.certificate_pem).public_bytes(
            serialization.Encoding.DER
        )

    async def finished(self, spec: JobSpec = SPEC, countersigned: bool = True, **changes: Any) -> bytes:
        """Keep job j1 of acme as ended, with its agent's statement; the statement's payload."""
        statement = replace(
            Statement(
                job_id="j1",
                org="acme",
                agent_id="a1",
                attempt=2,
                epoch=5,
                spec_digest=spec_digest(spec_json_of(spec)),
                image_digest=ISOLATION.image_digest,
                isolation=isolation_facts(ISOLATION),
                outcome="EXITED",
                exit_code=0,
                reason="",
                log_chain_head="e" * 64,
                junit_reports=(FileDigest("report.xml", "1" * 64),),
                artifacts=(FileDigest("out/z.bin", "2" * 64), FileDigest("out/a.txt", "3" * 64)),
                started_at=rfc3339(NOW - timedelta(seconds=30)),
                finished_at=rfc3339(NOW),
            ),
            **changes,
        )
        payload = statement.encode()
        key = await self.keys.current()
        self.store.jobs["acme", "j1"] = Job("j1", "acme", spec, JobStatus.SUCCEEDED, NOW, exit_code=0)
        await self.store.add_job_statements(
            [
                JobStatementRecord(
                    "j1",
                    "acme",
                    payload,
                    sign(self.agent_key, payload),
                    self.agent_cert,
                    NOW,
                    key.countersign(payload) if countersigned else None,
                    key.id if countersigned else None,
                    "" if countersigned else "exit_code: the statement says 1, the control plane stored 0",
                )
            ]
        )
        return payload

    async def verified(self, envelope_json: bytes) -> dict[str, Any]:
        """The envelope's statement, once securesystemslib verified it with the signing certificate
        and in-toto's bindings accepted the statement and its SLSA predicate."""
        [certificate] = await self.keys.certificates()
        public_key = x509.load_der_x509_certificate(certificate).public_key()
        envelope = SslibEnvelope.from_dict(json.loads(envelope_json))
        assert envelope.payload_type == IN_TOTO_PAYLOAD_TYPE
        key = SSlibKey.from_crypto(public_key, keyid=key_id(certificate))
        assert list(envelope.verify([key], 1)) == [key_id(certificate)]
        statement: dict[str, Any] = json.loads(envelope.payload)
        # Strict parses: a field these bindings do not know, or a malformed time, is refused.
        InTotoStatement.copy_from_pb(json_format.ParseDict(statement, statement_pb2.Statement())).validate()
        json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())
        return statement


@pytest.fixture
async def cp() -> ControlPlane:
    return ControlPlane()


async def test_the_provenance_restates_the_countersigned_statement(cp: ControlPlane) -> None:
    payload = await cp.finished()
    statement = await cp.verified(await cp.exporter.envelope("acme", "j1"))

    assert (statement["_type"], statement["predicateType"]) == (
        "https://in-toto.io/Statement/v1",
        PREDICATE_TYPE,
    )
    assert statement["subject"] == [
        {"name": "out/a.txt", "digest": {"sha256": "3" * 64}},
        {"name": "out/z.bin", "digest": {"sha256": "2" * 64}},
    ]
    build, run = statement["predicate"]["buildDefinition"], statement["predicate"]["runDetails"]
    assert build["buildType"] == BUILD_TYPE
    assert spec_digest(build["externalParameters"]) == Statement.decode(payload).spec_digest
    assert build["externalParameters"]["command"] == ["make", "test"]
    assert build["internalParameters"] == {
        "org": "acme",
        "pool": "linux",
        "runtime": "runsc",
        "agentId": "a1",
        "attempt": 2,
        "epoch": 5,
        "isolation": isolation_facts(ISOLATION),
    }
    [image] = build["resolvedDependencies"]
    assert (image["name"], image["digest"]) == ("registry.local/build:1", {"sha256": "a" * 64})
    assert image["annotations"] == {"imageId": ISOLATION.image_id, "digestOf": "manifest"}
    assert run["builder"]["id"] == "testhide://test.local"
    [agent] = run["builder"]["builderDependencies"]
    assert agent["uri"] == "spiffe://test.local/org/acme/pool/linux/agent/a1"
    assert agent["digest"] == {"sha256": hashlib.sha256(cp.agent_cert).hexdigest()}
    assert run["metadata"] == {
        "invocationId": "j1/attempt/2",
        "startedOn": rfc3339(NOW - timedelta(seconds=30)),
        "finishedOn": rfc3339(NOW),
    }
    assert run["byproducts"] == [
        {
            "name": statement_subject_name("j1"),
            "digest": {"sha256": hashlib.sha256(payload).hexdigest()},
            "mediaType": "application/vnd.testhide.job-statement+json",
        },
        {"name": "log", "digest": {"testhideLogChain": "e" * 64}},
        {"name": "report.xml", "digest": {"sha256": "1" * 64}, "annotations": {"kind": "junit"}},
    ]


async def test_the_envelope_is_signed_by_the_current_key_alone(cp: ControlPlane) -> None:
    await cp.finished()
    envelope = json.loads(await cp.exporter.envelope("acme", "j1"))
    current = await cp.keys.current()
    assert set(envelope) == {"payload", "payloadType", "signatures"}
    assert [s["keyid"] for s in envelope["signatures"]] == [current.id]
    # A payload changed after signing fails the library's verification.
    envelope["payload"] = base64.b64encode(
        base64.b64decode(envelope["payload"]).replace(b"a1", b"a2")
    ).decode()
    with pytest.raises(VerificationError):
        await cp.verified(json.dumps(envelope).encode())


async def test_a_job_that_uploaded_nothing_has_its_statement_as_subject(cp: ControlPlane) -> None:
    payload = await cp.finished(artifacts=())
    statement = await cp.verified(await cp.exporter.envelope("acme", "j1"))
    assert statement["subject"] == [
        {"name": statement_subject_name("j1"), "digest": {"sha256": hashlib.sha256(payload).hexdigest()}}
    ]


async def test_an_image_without_a_registry_digest_is_named_by_its_image_id(cp: ControlPlane) -> None:
    local = replace(ISOLATION, image_digest="")
    await cp.finished(image_digest="", isolation=isolation_facts(local))
    statement = await cp.verified(await cp.exporter.envelope("acme", "j1"))
    [image] = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert image["digest"] == {"sha256": "c" * 64}
    assert image["annotations"]["digestOf"] == "image-config"


async def test_secrets_appear_by_name_as_the_spec_names_them(cp: ControlPlane) -> None:
    await cp.finished()
    statement = await cp.verified(await cp.exporter.envelope("acme", "j1"))
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    assert external["secrets"] == ["DEPLOY_TOKEN"]
    assert external["env"] == {"MODE": "ci"}  # the job's own variables; secrets are not among them


async def test_a_job_without_a_statement_is_refused(cp: ControlPlane) -> None:
    cp.store.jobs["acme", "j1"] = Job("j1", "acme", SPEC, JobStatus.RUNNING, NOW)
    with pytest.raises(FailedPrecondition, match="no countersigned statement"):
        await cp.exporter.envelope("acme", "j1")


async def test_a_statement_that_was_not_countersigned_is_refused_with_its_mismatch(cp: ControlPlane) -> None:
    await cp.finished(countersigned=False)
    with pytest.raises(
        FailedPrecondition, match=r"no countersigned statement .*exit_code: the statement says 1"
    ):
        await cp.exporter.envelope("acme", "j1")


async def test_another_organisations_job_is_not_found(cp: ControlPlane) -> None:
    await cp.finished()
    with pytest.raises(NotFound, match="j1"):
        await cp.exporter.envelope("beta", "j1")


async def test_a_statement_edited_after_its_countersignature_is_refused(cp: ControlPlane) -> None:
    await cp.finished()
    kept = cp.store.statements["acme", "j1"]
    edited = kept.payload.replace(b'"exit_code":0', b'"exit_code":1')
    assert edited != kept.payload
    cp.store.statements["acme", "j1"] = replace(kept, payload=edited)
    with pytest.raises(FailedPrecondition, match="does not verify with the control plane's key"):
        await cp.exporter.envelope("acme", "j1")


async def test_a_spec_edited_after_the_statement_is_refused(cp: ControlPlane) -> None:
    await cp.finished()
    job = cp.store.jobs["acme", "j1"]
    cp.store.jobs["acme", "j1"] = replace(job, spec=replace(SPEC, command=("sh", "-c", "curl evil")))
    with pytest.raises(FailedPrecondition, match="stored spec no longer matches its signed statement"):
        await cp.exporter.envelope("acme", "j1")


async def test_a_countersignature_by_a_key_another_replica_just_made_is_checked(cp: ControlPlane) -> None:
    payload = await cp.finished()  # this replica has loaded its keys
    master = MasterKey.generate()
    made = new_statement_key(cp.ca, master, NOW)
    await cp.store.add_statement_key(made)
    other = unseal_key(made, master)
    kept = cp.store.statements["acme", "j1"]
    cp.store.statements["acme", "j1"] = replace(
        kept, countersignature=other.countersign(payload), signing_key_id=other.id
    )
    statement = await cp.verified(await cp.exporter.envelope("acme", "j1"))
    assert statement["subject"][0]["name"] == "out/a.txt"
