"""A job's signed statement: what the agent says it ran and how it ended, signed by the agent's
current key and countersigned by the control plane's statement-signing key, in a DSSE envelope
(https://github.com/secure-systems-lab/dsse). Shared by the three programs: the agent signs,
the control plane checks and countersigns, and anyone holding the CA certificate verifies it
offline with ``verify_evidence``, trusting neither the server nor its database.

Canonical form of the payload: JSON with sorted keys, no whitespace, UTF-8 (not ASCII-escaped),
integers only (no floats: a job's CPUs appear as ``millicpus``), times RFC 3339 UTC with
microseconds (``2026-12-01T10:00:00.000000Z``), digests lowercase hex. A payload that is not in
that form exactly is refused, so one statement has one byte string.

The spec digest is sha256 over the canonical JSON of the job's spec as the wire carries it
(``testhide.v1.JobSpec`` turned into a dict by protobuf's ``json_format.MessageToDict`` with
``preserving_proto_field_name=True``: default values left out, 64-bit integers as strings,
durations as ``"3600s"``), the same JSON rules as above except that the spec's ``cpus`` stays
the float protobuf gives. The control plane computes it from the spec it stored, the agent from
the spec it was assigned, and a client from the ``Job`` it downloads (``Job.spec``).

Key ids: the agent's is the sha256 (hex) of its certificate's DER, the control plane's the
sha256 of its statement-signing certificate's DER. Both sign the same DSSE PAE with ECDSA
P-256 / SHA-256 (DER signatures), the agent's first."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from testhide.common.identity import AgentIdentity, IdentityError
from testhide.common.isolation import Isolation

STATEMENT_TYPE = "https://testhide.dev/job-statement/v1"
PAYLOAD_TYPE = "application/vnd.testhide.job-statement+json"
OUTCOMES = ("EXITED", "TIMED_OUT", "CANCELED", "ERROR")


class StatementError(ValueError):
    """A payload is not a canonical job statement."""


def canonical_json(value: Any) -> bytes:
    _refuse_floats(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise StatementError("a canonical statement holds no floating-point numbers")
    if isinstance(value, Mapping):
        for item in value.values():
            _refuse_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item)


def spec_digest(spec: Mapping[str, Any]) -> str:
    """sha256 (hex) of a wire JobSpec as ``MessageToDict(spec, preserving_proto_field_name=True)``."""
    data = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(data.encode()).hexdigest()


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise StatementError(f"{text!r} is not an RFC 3339 UTC time") from exc


def isolation_facts(isolation: Isolation | None) -> dict[str, Any]:
    """The isolation facts as the statement carries them (integers only: CPUs in thousandths)."""
    if isolation is None:
        return {}
    facts: dict[str, Any] = {}
    for f in _ISOLATION_FIELDS:
        value = getattr(isolation, f)
        facts[f] = list(value) if isinstance(value, tuple) else value
    facts["millicpus"] = round(facts.pop("cpus") * 1000)
    return facts


@dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str


@dataclass(frozen=True)
class Statement:
    job_id: str
    org: str
    agent_id: str
    attempt: int
    epoch: int
    """The assignment's fencing epoch: which hand-out of the job this agent ran."""
    spec_digest: str
    image_digest: str
    isolation: Mapping[str, Any]
    """``isolation_facts`` of what the agent read back (empty if it could not)."""
    outcome: str
    exit_code: int
    reason: str
    log_chain_head: str
    junit_reports: tuple[FileDigest, ...]
    artifacts: tuple[FileDigest, ...]
    """Files and service logs uploaded, by name."""
    started_at: str
    finished_at: str
    type: str = field(default=STATEMENT_TYPE)

    def encode(self) -> bytes:
        # Not dataclasses.asdict: its deep copy cost more than the signature.
        value: dict[str, Any] = {name: getattr(self, name) for name in _STATEMENT_FIELDS}
        value["isolation"] = dict(self.isolation)
        for name in ("junit_reports", "artifacts"):
            value[name] = [
                {"name": d.name, "sha256": d.sha256} for d in sorted(value[name], key=lambda d: d.name)
            ]
        return canonical_json(value)

    @classmethod
    def decode(cls, payload: bytes) -> Statement:
        try:
            value = json.loads(payload.decode(), parse_float=_no_float)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StatementError(f"the statement is not JSON: {exc}") from exc
        if not isinstance(value, dict) or set(value) != set(_STATEMENT_FIELDS):
            raise StatementError("the statement's fields are not those of a job statement v1")
        if value["type"] != STATEMENT_TYPE:
            raise StatementError(f"unknown statement type {value['type']!r}")
        wrong = [name for name, kind in _KINDS.items() if type(value[name]) is not kind]  # bool is no int
        if wrong:
            raise StatementError(f"the statement's {', '.join(wrong)} have the wrong JSON types")
        try:
            for name in ("junit_reports", "artifacts"):
                value[name] = tuple(_file_digest(d) for d in value[name])
            statement = cls(**value)
        except (TypeError, KeyError) as exc:
            raise StatementError(f"the statement is malformed: {exc}") from exc
        if statement.encode() != payload:
            raise StatementError("the statement is not in canonical form")
        parse_rfc3339(statement.started_at)
        parse_rfc3339(statement.finished_at)
        return statement

    @property
    def finished(self) -> datetime:
        return parse_rfc3339(self.finished_at)


_STATEMENT_FIELDS = tuple(f.name for f in fields(Statement))
_ISOLATION_FIELDS = tuple(f.name for f in fields(Isolation))


_KINDS: dict[str, type] = {
    **{name: str for name in _STATEMENT_FIELDS},
    "attempt": int,
    "epoch": int,
    "exit_code": int,
    "isolation": dict,
    "junit_reports": list,
    "artifacts": list,
}


def _file_digest(value: Any) -> FileDigest:
    if (
        not isinstance(value, dict)
        or not isinstance(value["name"], str)
        or not isinstance(value["sha256"], str)
    ):
        raise TypeError("a file digest is {name, sha256} as strings")
    return FileDigest(value["name"], value["sha256"])


def _no_float(text: str) -> float:
    raise StatementError(f"a canonical statement holds no floating-point numbers ({text})")


# DSSE -----------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what each signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def key_id(certificate_der: bytes) -> str:
    return hashlib.sha256(certificate_der).hexdigest()


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    return key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))


def signature_valid(certificate: x509.Certificate, payload: bytes, signature: bytes) -> bool:
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(signature, pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    signatures: tuple[Signature, ...]
    payload_type: str = PAYLOAD_TYPE

    def to_json(self) -> bytes:
        """The DSSE JSON envelope (payload and signatures base64)."""
        return canonical_json(
            {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [
                    {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            value = json.loads(data)
            return cls(
                base64.b64decode(value["payload"], validate=True),
                tuple(
                    Signature(s["keyid"], base64.b64decode(s["sig"], validate=True))
                    for s in value["signatures"]
                ),
                value["payloadType"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StatementError(f"not a DSSE envelope: {exc}") from exc


# verification ---------------------------------------------------------------------------------


def _load(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise StatementError(f"the {what} is not a DER certificate") from exc


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert``: another issuer, another key type or a bad signature is no."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issued_by_trusted(cert: x509.Certificate, trusted: Sequence[x509.Certificate]) -> bool:
    return any(issued_by(cert, ca) for ca in trusted)


def _has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        return usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False


def _agent_failure(
    statement: Statement, cert: x509.Certificate, trusted: Sequence[x509.Certificate]
) -> str | None:
    if not _issued_by_trusted(cert, trusted) or not _has_usage(cert, ExtendedKeyUsageOID.CLIENT_AUTH):
        return "the agent certificate was not issued by the trusted CA"
    try:
        identity = AgentIdentity.from_certificate(cert)
    except IdentityError as exc:
        return f"the agent certificate carries no agent identity: {exc}"
    if (identity.org, identity.agent_id) != (statement.org, statement.agent_id):
        return (
            f"statement names agent {statement.org}/{statement.agent_id} but is signed by agent "
            f"{identity.org}/{identity.agent_id}'s certificate"
        )
    if not cert.not_valid_before_utc <= statement.finished <= cert.not_valid_after_utc:
        return "agent certificate was not valid at the statement's end time"
    return None


def _countersignature_failure(
    statement: Statement,
    envelope: Envelope,
    signature: Signature,
    signers: Sequence[x509.Certificate],
    trusted: Sequence[x509.Certificate],
) -> str | None:
    signer = next(
        (c for c in signers if key_id(c.public_bytes(serialization.Encoding.DER)) == signature.keyid), None
    )
    if signer is None:
        return f"no control-plane signing certificate has key id {signature.keyid}"
    if not _issued_by_trusted(signer, trusted) or not _has_usage(signer, ExtendedKeyUsageOID.CODE_SIGNING):
        return f"countersignature key {signature.keyid}'s certificate was not issued by the trusted CA"
    # Only the end: the control plane countersigns when the result arrives, which may be after a
    # rotation that happened while the job ran (the new key's certificate starts after it ended).
    if statement.finished > signer.not_valid_after_utc:
        return (
            f"countersignature key {signature.keyid}'s certificate expired before the statement's end "
            "time (rotated out)"
        )
    if not signature_valid(signer, envelope.payload, signature.sig):
        return "signature does not verify (control plane's countersignature)"
    return None


def verify_evidence(
    envelope: Envelope,
    agent_certificate_der: bytes,
    signer_certificates_der: Sequence[bytes],
    trusted_cas: Sequence[x509.Certificate],
) -> str | None:
    """None if the envelope holds a statement signed by the agent it names (with a certificate
    of ``trusted_cas`` valid at the statement's end) and countersigned by a control-plane
    signing key certified by ``trusted_cas`` and not retired by then; else the first failure."""
    try:
        if envelope.payload_type != PAYLOAD_TYPE:
            return f"unexpected payload type {envelope.payload_type!r}"
        statement = Statement.decode(envelope.payload)
        agent_cert = _load(agent_certificate_der, "agent certificate")
        signers = [_load(der, "control-plane signing certificate") for der in signer_certificates_der]
    except StatementError as exc:
        return str(exc)
    if len(envelope.signatures) != 2:
        return f"expected the agent's signature and a countersignature, found {len(envelope.signatures)}"
    agent_signature, countersignature = envelope.signatures
    if agent_signature.keyid != key_id(agent_certificate_der):
        return "the first signature is not by the agent certificate given"
    if (failure := _agent_failure(statement, agent_cert, trusted_cas)) is not None:
        return failure
    if not signature_valid(agent_cert, envelope.payload, agent_signature.sig):
        return "signature does not verify (agent's signature)"
    return _countersignature_failure(statement, envelope, countersignature, signers, trusted_cas)
