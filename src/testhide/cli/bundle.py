"""What `testhide verify` checks a job against, as downloaded from the control plane or read
from a bundle file, and the bundle file's format. Plain data only: the wire modules fill it,
`cli/verify.py` checks it, and neither gRPC nor the cryptography library is imported here.

A bundle is one JSON object (UTF-8), written by ``testhide verify JOB --export FILE``:

    format        "testhide-verify-bundle"
    version       1
    job_id        the job's id
    exported_at   RFC 3339 UTC, when it was written
    server        HOST:PORT it was downloaded from (information only: nothing trusts it)
    job           the control plane's record, the ``testhide.v1.Job`` message in protobuf's JSON
                  mapping with the proto's field names (bytes base64, 64-bit integers as strings)
    evidence      {"envelope": the DSSE envelope (payload and signatures base64),
                   "agent_certificate": base64 DER, "agent_ca_certificates": [base64 DER],
                   "signing_certificates": [base64 DER], "mismatch": the control plane's note}
    log_batches   [{"seq": n, "chain": hex, "entries": [{"stream": 1 stdout | 2 stderr,
                   "data": base64}]}], in the order the control plane sent them
    artifacts     [{"path", "kind" (FILE | SERVICE_LOG), "size", "sha256" (as listed),
                   "data": base64}]

Base64 makes the bundle about 4/3 of the job's stored log and artifacts. Nothing in a bundle is
trusted for being there: the signatures, the CA file given to `verify`, and digests recomputed
over the bytes decide."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from testhide.cli.model import Artifact, ArtifactKind, Job

BUNDLE_FORMAT = "testhide-verify-bundle"
BUNDLE_VERSION = 1

LogBatch = tuple[int, bytes, Sequence[tuple[int, bytes]]]
"""A stored log batch: its seq, its chain link, its entries (stream number, bytes)."""


class BundleError(ValueError):
    """A file that is not a verification bundle this version can read."""


class VerifyFailed(Exception):
    """The job does not verify: a result (exit 1, `exitcodes.VERIFY_FAILED`), not a failure of
    testhide, so not a CliError (every one of which exits 125)."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} does not verify: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class JobEvidence:
    """The job's signed statement (the parts of its DSSE envelope) and the certificates sent
    with it (DER): the agent's, the CAs the server says issued it, the control plane's
    statement-signing certificates."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]
    """(key id, signature): the agent's first, then the control plane's countersignature."""
    agent_certificate: bytes
    agent_ca_certificates: tuple[bytes, ...]
    signing_certificates: tuple[bytes, ...]
    mismatch: str
    """What the control plane found wrong with the statement when it arrived (its word only)."""
    in_toto_envelope: bytes = b""
    """When asked for (``--in-toto``): the job's SLSA provenance, a DSSE JSON envelope signed by
    the control plane's current statement-signing key. Not kept in a bundle."""


@dataclass(frozen=True)
class JobRecord:
    """The control plane's record of the job: the CLI's model of it and what verification
    needs beyond it."""

    job: Job
    org: str
    spec: dict[str, Any]
    """The wire JobSpec as ``MessageToDict(spec, preserving_proto_field_name=True)``: what the
    spec digest is computed over (common/statement.py)."""
    wire: dict[str, Any]
    """The whole Job message in protobuf's JSON mapping, as a bundle keeps it."""


@dataclass(frozen=True)
class ArtifactBytes:
    artifact: Artifact
    """As the control plane lists it (its sha256 is the server's word, not checked against)."""
    data: bytes


@dataclass(frozen=True)
class Downloaded:
    """Everything a job's verification looks at."""

    record: JobRecord
    evidence: JobEvidence | None
    """None: the control plane has no signed statement of the job."""
    missing_evidence: str
    """Why there is none, in the server's words."""
    log_batches: tuple[LogBatch, ...]
    artifacts: tuple[ArtifactBytes, ...]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text, validate=True)


def bundle_json(downloaded: Downloaded, server: str, now: datetime | None = None) -> bytes:
    evidence = downloaded.evidence
    assert evidence is not None, "only a job with evidence is exported"
    document = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "job_id": downloaded.record.job.id,
        "exported_at": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "server": server,
        "job": downloaded.record.wire,
        "evidence": {
            "envelope": {
                "payload": _b64(evidence.payload),
                "payloadType": evidence.payload_type,
                "signatures": [{"keyid": k, "sig": _b64(s)} for k, s in evidence.signatures],
            },
            "agent_certificate": _b64(evidence.agent_certificate),
            "agent_ca_certificates": [_b64(c) for c in evidence.agent_ca_certificates],
            "signing_certificates": [_b64(c) for c in evidence.signing_certificates],
            "mismatch": evidence.mismatch,
        },
        "log_batches": [
            {
                "seq": seq,
                "chain": chain.hex(),
                "entries": [{"stream": s, "data": _b64(d)} for s, d in entries],
            }
            for seq, chain, entries in downloaded.log_batches
        ],
        "artifacts": [
            {
                "path": a.artifact.path,
                "kind": a.artifact.kind.value,
                "size": a.artifact.size,
                "sha256": a.artifact.sha256,
                "data": _b64(a.data),
            }
            for a in downloaded.artifacts
        ],
    }
    return json.dumps(document, indent=1).encode() + b"\n"


def read_bundle(data: bytes) -> Downloaded:
    """The bundle's contents, unchecked but for their form (BundleError if it is not one)."""
    from testhide.cli.wire_convert import job_record_from_wire  # protobuf, for the job's record

    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
            raise BundleError("not a testhide verification bundle")
        if document.get("version") != BUNDLE_VERSION:
            raise BundleError(
                f"bundle version {document.get('version')!r}; this testhide reads {BUNDLE_VERSION}"
            )
        return Downloaded(
            job_record_from_wire(document["job"]),
            _evidence(document["evidence"]),
            "",
            tuple(_batch(b) for b in document["log_batches"]),
            tuple(_artifact(a) for a in document["artifacts"]),
        )
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"the bundle is damaged: {exc!r}") from exc


def _evidence(value: dict[str, Any]) -> JobEvidence:
    envelope = value["envelope"]
    return JobEvidence(
        str(envelope["payloadType"]),
        _unb64(envelope["payload"]),
        tuple((str(s["keyid"]), _unb64(s["sig"])) for s in envelope["signatures"]),
        _unb64(value["agent_certificate"]),
        tuple(_unb64(c) for c in value["agent_ca_certificates"]),
        tuple(_unb64(c) for c in value["signing_certificates"]),
        str(value["mismatch"]),
    )


def _batch(value: dict[str, Any]) -> LogBatch:
    seq = value["seq"]
    if type(seq) is not int:
        raise TypeError("a log batch's seq is an integer")
    entries = [(int(e["stream"]), _unb64(e["data"])) for e in value["entries"]]
    return seq, bytes.fromhex(value["chain"]), entries


def _artifact(value: dict[str, Any]) -> ArtifactBytes:
    artifact = Artifact(
        str(value["path"]), int(value["size"]), str(value["sha256"]), ArtifactKind(value["kind"])
    )
    return ArtifactBytes(artifact, _unb64(value["data"]))
