"""Jobs' signed statements on the wire: the spec digest as agents and clients compute it (from
the wire JobSpec, common/statement.py), and ``Evidence`` for GetEvidence (with, when asked, the
job's SLSA provenance: jobs/provenance.py)."""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict

from testhide.common.statement import PAYLOAD_TYPE, key_id, spec_digest
from testhide.controlplane.jobs.model import JobSpec
from testhide.controlplane.jobs.statements import Evidence
from testhide.controlplane.rpc.convert import spec_to_pb
from testhide.protos.v1 import jobs_pb2


def spec_json_of(spec: JobSpec) -> dict[str, Any]:
    """The wire spec as a dict, as its digest is computed (and as provenance exports it)."""
    return MessageToDict(spec_to_pb(spec), preserving_proto_field_name=True)


def spec_digest_of(spec: JobSpec) -> str:
    """What the agent the spec was assigned to computes, and a client from ``Job.spec``."""
    return spec_digest(spec_json_of(spec))


def evidence_to_pb(evidence: Evidence) -> jobs_pb2.Evidence:
    record = evidence.record
    signatures = [jobs_pb2.DsseSignature(keyid=key_id(record.agent_certificate), sig=record.agent_signature)]
    if record.countersignature is not None and record.signing_key_id is not None:
        signatures.append(jobs_pb2.DsseSignature(keyid=record.signing_key_id, sig=record.countersignature))
    return jobs_pb2.Evidence(
        payload_type=PAYLOAD_TYPE,
        payload=record.payload,
        signatures=signatures,
        agent_certificate=record.agent_certificate,
        agent_ca_certificates=list(evidence.agent_cas),
        signing_certificates=list(evidence.signing_certificates),
        mismatch=record.mismatch,
    )
