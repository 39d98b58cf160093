"""What `testhide verify` checks (cli/verify.py is the command): a job's signed statement, and
everything the control plane keeps of the job against it, trusting neither the control plane nor
its database, only the CA certificate the engineer already trusts for it.

The job's statement (common/statement.py) was signed by the agent that ran it and
countersigned by the control plane when the result came. Everything else is downloaded (or read
from a bundle, cli/bundle.py) and checked against it, in this order, the first failure
reported: the envelope's signatures and certificates; the statement names this job, its
organisation and its agent; the spec digest recomputed from the job's spec; the control plane's
record (exit code, status, reason, attempt, image digest, isolation facts) agrees; the log chain
recomputed over the stored batches reaches the signed head (common/evidence.py); each artifact's
bytes hash to the signed digest, and none is there unsigned. JUnit reports' digests are signed
too, but the control plane serves parsed results, not a report's bytes: the verdict says so
rather than claim them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from testhide.cli.bundle import ArtifactBytes, Downloaded, JobEvidence, VerifyFailed
from testhide.cli.config import Login, read_ca_file
from testhide.cli.errors import CliError
from testhide.common.evidence import verify_log_chain
from testhide.common.isolation import Isolation
from testhide.common.statement import (
    Envelope,
    Signature,
    Statement,
    StatementError,
    isolation_facts,
    issued_by,
    key_id,
    pae,
    spec_digest,
    verify_evidence,
)

# Trust --------------------------------------------------------------------------------------


def anchors(ca_file: Path | None) -> list[x509.Certificate]:
    """The CA certificates to verify against: --ca-file, else the session's (`login --ca-file`)."""
    if ca_file is not None:
        pem = read_ca_file(ca_file)
    else:
        login = Login.load()
        if not login.ca_pem:
            raise CliError(
                "no CA certificate to verify against: this session trusts the system's store; "
                "pass --ca-file (the control plane's ca.pem)"
            )
        pem = login.ca_pem
    return x509.load_pem_x509_certificates(pem.encode())


def trusted_cas(roots: list[x509.Certificate], offered: tuple[bytes, ...]) -> list[x509.Certificate]:
    """The roots, and those of the CA certificates the server sent that a root issued (a CA of
    an earlier generation, cross-signed): never one on the server's word alone."""
    trusted = list(roots)
    for der in offered:
        try:
            cert = x509.load_der_x509_certificate(der)
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (ValueError, x509.ExtensionNotFound):
            continue
        if is_ca and cert not in trusted and any(issued_by(cert, root) for root in roots):
            trusted.append(cert)
    return trusted


# Checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    statement: Statement
    countersigning_key: str
    log_batches: int
    artifacts: int
    agent_name: str


def _said(value: object) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


def _differs(what: str, signed: object, recorded: object) -> str | None:
    if signed == recorded:
        return None
    said = f"the signed statement says {_said(signed)}"
    return f"{what}: {said}, the control plane's record says {_said(recorded)}"


def _statement(job_id: str, downloaded: Downloaded, roots: list[x509.Certificate]) -> Statement:
    evidence = downloaded.evidence
    if evidence is None:
        # The server's words ("job J has no signed statement (it has not ended, ...)").
        raise VerifyFailed(
            job_id, downloaded.missing_evidence or "the control plane sent no signed statement"
        )
    envelope = Envelope(
        evidence.payload, tuple(Signature(k, s) for k, s in evidence.signatures), evidence.payload_type
    )
    trusted = trusted_cas(roots, evidence.agent_ca_certificates)
    failure = verify_evidence(envelope, evidence.agent_certificate, evidence.signing_certificates, trusted)
    if failure is not None:
        if evidence.mismatch:
            failure += f" (the control plane noted when it arrived: {evidence.mismatch})"
        raise VerifyFailed(job_id, failure)
    try:
        return Statement.decode(evidence.payload)
    except StatementError as exc:  # verify_evidence decoded it already
        raise VerifyFailed(job_id, str(exc)) from exc


def _identity_failure(job_id: str, statement: Statement, downloaded: Downloaded) -> str | None:
    record = downloaded.record
    return (
        _differs("job id", statement.job_id, job_id)
        or _differs("job id", statement.job_id, record.job.id)
        or _differs("organisation", statement.org, record.org)
        or _differs("agent", statement.agent_id, record.job.agent_id)
        or _differs("spec digest", statement.spec_digest, spec_digest(record.spec))
    )


_STATUS_OF_OUTCOME = {"TIMED_OUT": "TIMED_OUT", "CANCELED": "CANCELED", "ERROR": "ERROR"}
_WITH_EXIT_CODE = ("EXITED", "TIMED_OUT", "CANCELED")


def _result_failure(statement: Statement, downloaded: Downloaded) -> str | None:
    """The first field where the control plane's record disagrees with the signed result."""
    job = downloaded.record.job
    exit_code = statement.exit_code if statement.outcome in _WITH_EXIT_CODE else None
    status = _STATUS_OF_OUTCOME.get(statement.outcome) or ("SUCCEEDED" if exit_code == 0 else "FAILED")
    isolation = job.isolation
    found = (
        _differs("exit code", exit_code, job.exit_code)
        or _differs("status", status, job.status.value)
        or _differs("reason", statement.reason, job.status_reason)
        or _differs("attempt", statement.attempt, job.attempt)
        or _differs("image digest", statement.image_digest, isolation.image_digest if isolation else "")
    )
    return found or _isolation_failure(statement, isolation)


def _isolation_failure(statement: Statement, isolation: Isolation | None) -> str | None:
    recorded = isolation_facts(isolation)
    for key in sorted({*statement.isolation, *recorded}):
        found = _differs(f"isolation {key}", statement.isolation.get(key), recorded.get(key))
        if found:
            return found
    return None


def _artifacts_failure(statement: Statement, artifacts: tuple[ArtifactBytes, ...]) -> str | None:
    have = {a.artifact.path: a.data for a in artifacts}
    for signed in sorted(statement.artifacts, key=lambda d: d.name):
        if signed.name not in have:
            return f"artifact {signed.name}: in the signed statement, missing from the control plane"
        digest = hashlib.sha256(have[signed.name]).hexdigest()
        if digest != signed.sha256:
            return (
                f"artifact {signed.name}: its bytes' sha256 is {digest}, "
                f"the signed statement says {signed.sha256}"
            )
    unsigned = sorted(set(have) - {d.name for d in statement.artifacts})
    if unsigned:
        return f"artifact {unsigned[0]}: the control plane has it, the signed statement does not"
    return None


def check(job_id: str, downloaded: Downloaded, roots: list[x509.Certificate]) -> Verified:
    """What verified, or VerifyFailed with the first thing that did not."""
    statement = _statement(job_id, downloaded, roots)
    found = (
        _identity_failure(job_id, statement, downloaded)
        or _result_failure(statement, downloaded)
        or verify_log_chain(job_id, bytes.fromhex(statement.log_chain_head), downloaded.log_batches)
        or _artifacts_failure(statement, downloaded.artifacts)
    )
    if found:
        raise VerifyFailed(job_id, found)
    assert downloaded.evidence is not None
    agent = downloaded.record.job.agent
    return Verified(
        statement,
        downloaded.evidence.signatures[1][0],
        len(downloaded.log_batches),
        len(statement.artifacts),
        agent.name if agent and agent.id == statement.agent_id and agent.name else "",
    )


def _count(n: int, what: str, plural: str = "") -> str:
    return f"{n} {what if n == 1 else plural or what + 's'}"


def verdict(verified: Verified) -> str:
    statement = verified.statement
    agent = f"{verified.agent_name} ({statement.agent_id})" if verified.agent_name else statement.agent_id
    line = (
        f"job {statement.job_id} verifies: signed by agent {agent} at {statement.finished_at}, "
        f"countersigned by the control plane (key {verified.countersigning_key}), "
        f"log {_count(verified.log_batches, 'batch', 'batches')}, {_count(verified.artifacts, 'artifact')}"
    )
    reports = len(statement.junit_reports)
    if reports:
        line += (
            f"; not checked: the bytes of {_count(reports, 'JUnit report')} "
            "(the control plane serves their parsed results, not the files)"
        )
    return line


def verdict_json(verified: Verified) -> dict[str, Any]:
    """``--json``: what verified (README.md, "JSON output"; tests/json_examples.py)."""
    statement = verified.statement
    return {
        "job_id": statement.job_id,
        "agent": {"id": statement.agent_id, "name": verified.agent_name},
        "signed_at": statement.finished_at,
        "countersigning_key": verified.countersigning_key,
        "log_batches": verified.log_batches,
        "artifacts": [{"path": d.name, "sha256": d.sha256} for d in statement.artifacts],
        "junit_reports_not_checked": [{"name": d.name, "sha256": d.sha256} for d in statement.junit_reports],
    }


# In-toto provenance ----------------------------------------------------------------------------

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"


def in_toto_failure(
    data: bytes, evidence: JobEvidence, statement: Statement, roots: list[x509.Certificate], now: datetime
) -> str | None:
    """None if ``data`` is a DSSE envelope of an in-toto Statement about the job of ``statement``
    (already verified), signed by a statement-signing certificate of the roots valid ``now``."""
    if not data:
        return "in-toto provenance: the control plane sent none"
    try:
        envelope = Envelope.from_json(data)
    except StatementError as exc:
        return f"in-toto provenance: {exc}"
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        return f"in-toto provenance: unexpected payload type {envelope.payload_type!r}"
    if len(envelope.signatures) != 1:
        return f"in-toto provenance: expected one signature, found {len(envelope.signatures)}"
    found = _in_toto_signer_failure(envelope, evidence, roots, now)
    return found or _in_toto_payload_failure(envelope.payload, evidence, statement)


def _in_toto_signer_failure(
    envelope: Envelope, evidence: JobEvidence, roots: list[x509.Certificate], now: datetime
) -> str | None:
    keyid, signature = envelope.signatures[0].keyid, envelope.signatures[0].sig
    der = next((d for d in evidence.signing_certificates if key_id(d) == keyid), None)
    if der is None:
        return f"in-toto provenance: no control-plane signing certificate has key id {keyid}"
    cert = x509.load_der_x509_certificate(der)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CODE_SIGNING not in usages or not any(issued_by(cert, r) for r in roots):
        return f"in-toto provenance: key {keyid}'s certificate was not issued by the trusted CA"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return f"in-toto provenance: key {keyid}'s certificate is not valid now"
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return "in-toto provenance: signature does not verify (not an ECDSA key)"
    try:
        public_key.verify(signature, pae(IN_TOTO_PAYLOAD_TYPE, envelope.payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "in-toto provenance: signature does not verify"
    return None


def _in_toto_payload_failure(payload: bytes, evidence: JobEvidence, statement: Statement) -> str | None:
    """The provenance must say what the verified statement says: its files, its spec."""
    try:
        document = json.loads(payload)
        subjects = {(s["name"], s["digest"]["sha256"]) for s in document["subject"]}
        spec = document["predicate"]["buildDefinition"]["externalParameters"]
        kind = document["_type"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"in-toto provenance: not an in-toto statement ({exc!r})"
    expected = {(d.name, d.sha256) for d in statement.artifacts} or {
        (f"job-statement-{statement.job_id}.json", hashlib.sha256(evidence.payload).hexdigest())
    }
    if kind != IN_TOTO_STATEMENT_TYPE:
        return f"in-toto provenance: unexpected statement type {kind!r}"
    if subjects != expected:
        return "in-toto provenance: its subjects are not the files the signed statement names"
    if not isinstance(spec, dict) or spec_digest(spec) != statement.spec_digest:
        return "in-toto provenance: its build parameters are not the spec the signed statement names"
    return None
