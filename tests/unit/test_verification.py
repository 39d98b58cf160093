"""`testhide verify`'s checks without a server (cli/verification.py, cli/bundle.py): a job whose
record, log and artifacts agree with its signed statement verifies, and each disagreement is
named (the field and both values, the artifact, the log batch); the server's CA certificates
count only when the anchor issued them; a bundle round-trips and a damaged one is refused; the
in-toto provenance is checked against the CA and the verified statement."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.cli.bundle import (
    ArtifactBytes,
    BundleError,
    Downloaded,
    JobEvidence,
    VerifyFailed,
    bundle_json,
    read_bundle,
)
from testhide.cli.model import Artifact
from testhide.cli.verification import check, in_toto_failure, trusted_cas, verdict
from testhide.cli.wire_convert import job_record_from_pb
from testhide.common.evidence import log_chain_head
from testhide.common.statement import FileDigest, isolation_facts, key_id, pae, spec_digest
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.statement_keys import SigningKey
from testhide.protos.v1 import jobs_pb2
from tests.unit.test_statement import NOW, Agent, envelope, signer, statement

BATCHES = ((1, b"", [(1, b"hello\n")]), (2, b"", [(2, b"oops\n"), (1, b"bye\n")]))


def chained(job_id: str) -> tuple[tuple[int, bytes, list[tuple[int, bytes]]], ...]:
    """BATCHES with their chain links, as the control plane stores them."""
    found, done = [], []
    for seq, _, entries in BATCHES:
        done.append((seq, entries))
        found.append((seq, log_chain_head(job_id, done), entries))
    return tuple(found)


def wire_job() -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id="j1",
        org="acme",
        spec=jobs_pb2.JobSpec(image="busybox", command=["sh", "-c", "exit 3"], pool="default"),
        status=jobs_pb2.JOB_STATUS_FAILED,
        exit_code=3,
        agent_id="a1",
        attempt=1,
        agent=jobs_pb2.JobAgent(id="a1", name="build-1"),
        isolation=jobs_pb2.Isolation(
            runtime="runc",
            network_mode="none",
            interfaces=["lo"],
            cpus=1.5,
            image_digest="sha256:" + "cd" * 32,
        ),
    )


class Job:
    """A job as a verifier downloads it, with a statement signed and countersigned for it."""

    def __init__(self, ca: CertificateAuthority, agent: Agent, wire: jobs_pb2.Job | None = None) -> None:
        self.record = job_record_from_pb(wire or wire_job())
        self.batches = chained("j1")
        self.artifacts = (ArtifactBytes(Artifact("out/a.txt", 5, "x"), b"data\n"),)
        self.statement = statement(
            spec_digest=spec_digest(self.record.spec),
            image_digest="sha256:" + "cd" * 32,
            isolation=isolation_facts(self.record.job.isolation),
            exit_code=3,
            log_chain_head=self.batches[-1][1].hex(),
            artifacts=(FileDigest("out/a.txt", hashlib.sha256(b"data\n").hexdigest()),),
        )
        made, cert = envelope(ca, agent, self.statement)
        self.evidence = JobEvidence(
            made.payload_type,
            made.payload,
            tuple((s.keyid, s.sig) for s in made.signatures),
            agent.der,
            (),
            (cert,),
            "",
        )

    def downloaded(self, **changes: object) -> Downloaded:
        made = Downloaded(self.record, self.evidence, "", self.batches, self.artifacts)
        return replace(made, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test.local")


@pytest.fixture(scope="module")
def agent(ca: CertificateAuthority) -> Agent:
    return Agent(ca, "a1")


@pytest.fixture
def job(ca: CertificateAuthority, agent: Agent) -> Job:
    return Job(ca, agent)


def failure(job: Job, ca: CertificateAuthority, downloaded: Downloaded | None = None) -> str:
    with pytest.raises(VerifyFailed) as failed:
        check("j1", downloaded or job.downloaded(), [ca.certificate])
    return failed.value.reason


def test_a_job_that_agrees_with_its_statement_verifies(job: Job, ca: CertificateAuthority) -> None:
    verified = check("j1", job.downloaded(), [ca.certificate])
    line = verdict(verified)
    assert line.startswith(f"job j1 verifies: signed by agent build-1 (a1) at {job.statement.finished_at}, ")
    assert line.endswith(
        "log 2 batches, 1 artifact; not checked: the bytes of 1 JUnit report (the control plane serves "
        "their parsed results, not the files)"
    )
    assert f"(key {job.evidence.signatures[1][0]})" in line


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("exit_code", 0, "exit code: the signed statement says 3, the control plane's record says 0"),
        (
            "status",
            jobs_pb2.JOB_STATUS_SUCCEEDED,
            "status: the signed statement says 'FAILED', the control plane's record says 'SUCCEEDED'",
        ),
        (
            "status_reason",
            "fine",
            "reason: the signed statement says '', the control plane's record says 'fine'",
        ),
        ("attempt", 2, "attempt: the signed statement says 1, the control plane's record says 2"),
        (
            "org",
            "beta",
            "organisation: the signed statement says 'acme', the control plane's record says 'beta'",
        ),
    ],
)
def test_a_record_that_disagrees_names_the_field(
    ca: CertificateAuthority, agent: Agent, field: str, value: object, reason: str
) -> None:
    job = Job(ca, agent)
    wire = wire_job()
    setattr(wire, field, value)
    assert failure(job, ca, job.downloaded(record=job_record_from_pb(wire))) == reason


def test_isolation_facts_and_the_spec_are_checked(job: Job, ca: CertificateAuthority) -> None:
    wire = wire_job()
    wire.isolation.network_mode = "bridge"
    assert failure(job, ca, job.downloaded(record=job_record_from_pb(wire))) == (
        "isolation network_mode: the signed statement says 'none', the control plane's record says 'bridge'"
    )
    wire = wire_job()
    wire.spec.command[:] = ["sh", "-c", "exit 0"]
    assert failure(job, ca, job.downloaded(record=job_record_from_pb(wire))).startswith(
        f"spec digest: the signed statement says '{job.statement.spec_digest}'"
    )


def test_artifacts_missing_changed_or_unsigned_are_named(job: Job, ca: CertificateAuthority) -> None:
    assert failure(job, ca, job.downloaded(artifacts=())) == (
        "artifact out/a.txt: in the signed statement, missing from the control plane"
    )
    changed = (ArtifactBytes(Artifact("out/a.txt", 5, "x"), b"DATA\n"),)
    now, signed = hashlib.sha256(b"DATA\n").hexdigest(), hashlib.sha256(b"data\n").hexdigest()
    assert failure(job, ca, job.downloaded(artifacts=changed)) == (
        f"artifact out/a.txt: its bytes' sha256 is {now}, the signed statement says {signed}"
    )
    extra = (*job.artifacts, ArtifactBytes(Artifact("out/b.txt", 1, "x"), b"b"))
    assert failure(job, ca, job.downloaded(artifacts=extra)) == (
        "artifact out/b.txt: the control plane has it, the signed statement does not"
    )


def test_the_log_chain_and_a_missing_statement_are_named(job: Job, ca: CertificateAuthority) -> None:
    assert failure(job, ca, job.downloaded(log_batches=job.batches[:1])) == (
        "log chain head differs from the signed head (batches removed at the end?)"
    )
    assert failure(
        job, ca, job.downloaded(evidence=None, missing_evidence="job j1 has no signed statement")
    ) == ("job j1 has no signed statement")


def test_the_control_planes_note_comes_with_a_missing_countersignature(
    job: Job, ca: CertificateAuthority
) -> None:
    evidence = replace(job.evidence, signatures=job.evidence.signatures[:1], mismatch="exit_code: ...")
    assert failure(job, ca, job.downloaded(evidence=evidence)) == (
        "expected the agent's signature and a countersignature, found 1 (the control plane noted when it "
        "arrived: exit_code: ...)"
    )


def test_only_a_ca_the_anchor_issued_is_trusted(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.create("stranger.local")
    der = stranger.certificate.public_bytes(serialization.Encoding.DER)
    assert trusted_cas([ca.certificate], (der,)) == [ca.certificate]
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key(ca.key_pem(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    crossed = (
        x509.CertificateBuilder()
        .subject_name(stranger.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    assert trusted_cas([ca.certificate], (crossed.public_bytes(serialization.Encoding.DER),)) == [
        ca.certificate,
        crossed,
    ]


def test_a_job_signed_for_another_ca_fails_against_the_anchor(job: Job, ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.create("stranger.local")
    with pytest.raises(VerifyFailed, match="the agent certificate was not issued by the trusted CA"):
        check("j1", job.downloaded(), [stranger.certificate])


def test_a_bundle_round_trips(job: Job) -> None:
    data = bundle_json(job.downloaded(), "127.0.0.1:7443")
    assert json.loads(data)["version"] == 1
    assert read_bundle(data) == job.downloaded()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(version=2), "bundle version 2; this testhide reads 1"),
        (lambda d: d.update(format="other"), "not a testhide verification bundle"),
        (lambda d: d["log_batches"][0]["entries"][0].update(data="***"), "the bundle is damaged"),
        (lambda d: d["artifacts"][0].update(data="not base64!"), "the bundle is damaged"),
        (lambda d: d["job"].update(status="NOT_A_STATUS"), "the bundle is damaged"),
    ],
)
def test_a_damaged_bundle_is_refused(job: Job, change: object, error: str) -> None:
    document = json.loads(bundle_json(job.downloaded(), "s"))
    change(document)  # type: ignore[operator]
    with pytest.raises(BundleError, match=error):
        read_bundle(json.dumps(document).encode())
    with pytest.raises(BundleError, match="not a testhide verification bundle"):
        read_bundle(b"[]")


def provenance(key: SigningKey, subjects: list[dict[str, object]], spec: dict[str, object]) -> bytes:
    payload = json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": subjects,
            "predicate": {"buildDefinition": {"externalParameters": spec}},
        }
    ).encode()
    signature = key.private_key.sign(pae("application/vnd.in-toto+json", payload), ec.ECDSA(hashes.SHA256()))
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"keyid": key.id, "sig": base64.b64encode(signature).decode()}],
        }
    ).encode()


def test_in_toto_provenance_is_checked_against_the_ca_and_the_statement(
    job: Job, ca: CertificateAuthority
) -> None:
    kid, key, cert = signer(ca)
    assert isinstance(key, SigningKey)
    evidence = replace(job.evidence, signing_certificates=(*job.evidence.signing_certificates, cert))
    subjects: list[dict[str, object]] = [
        {"name": "out/a.txt", "digest": {"sha256": job.statement.artifacts[0].sha256}}
    ]
    good = provenance(key, subjects, job.record.spec)
    roots = [ca.certificate]
    assert in_toto_failure(good, evidence, job.statement, roots, NOW) is None

    assert in_toto_failure(good, job.evidence, job.statement, roots, NOW) == (
        f"in-toto provenance: no control-plane signing certificate has key id {kid}"
    )
    assert in_toto_failure(good, evidence, job.statement, roots, NOW + timedelta(days=60)) == (
        f"in-toto provenance: key {kid}'s certificate is not valid now"
    )
    forged = json.loads(good)
    forged["payload"] = base64.b64encode(
        base64.b64decode(forged["payload"]).replace(b"out/a", b"out/b")
    ).decode()
    assert in_toto_failure(json.dumps(forged).encode(), evidence, job.statement, roots, NOW) == (
        "in-toto provenance: signature does not verify"
    )
    other = provenance(key, [{"name": "out/b.txt", "digest": {"sha256": "00"}}], job.record.spec)
    assert in_toto_failure(other, evidence, job.statement, roots, NOW) == (
        "in-toto provenance: its subjects are not the files the signed statement names"
    )
    assert in_toto_failure(
        provenance(key, subjects, {"image": "x"}), evidence, job.statement, roots, NOW
    ) == ("in-toto provenance: its build parameters are not the spec the signed statement names")
    assert in_toto_failure(b"", evidence, job.statement, roots, NOW) == (
        "in-toto provenance: the control plane sent none"
    )
    assert key_id(cert) == kid
