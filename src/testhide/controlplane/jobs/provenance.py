"""A job's signed statement restated in the standard form: an in-toto Statement v1
(https://in-toto.io/Statement/v1) with a SLSA Provenance v1 predicate (https://slsa.dev/provenance/v1),
in a DSSE envelope signed by the control plane's current statement-signing key, so that tools that
know nothing of testhide (in-toto, sigstore's DSSE code, slsa-verifier's policy engines) can check it.

It says only what the job's agent signed and the control plane checked and countersigned: every
fact comes from the countersigned statement kept for the job, except the spec itself, which the
statement binds by digest (a spec whose digest no longer matches is refused, as is a statement whose
countersignature does not verify: the export must not launder an edited database row).

- subjects: the files the job uploaded (artifacts and service logs, sha256 as the statement names
  them). A job that uploaded none still produced something worth pointing at: the statement itself,
  whose bytes ``GetEvidence`` returns, so it stands as the only subject then. Not the log: the
  statement binds the log by its hash chain's head, not by a sha256 of its bytes, and hashing the
  whole log here would state something the agent never signed.
- buildDefinition: ``BUILD_TYPE``; externalParameters the spec exactly as its digest is computed
  (``spec_digest(externalParameters)`` is the statement's ``spec_digest``: secret names only, their
  values are never in a spec); internalParameters the isolation facts the agent read back, the pool,
  the runtime, the agent, attempt and epoch; resolvedDependencies the image with its digest.
- runDetails: builder id ``testhide://TRUST-DOMAIN`` (the name the control plane signs access tokens
  as), the agent as a builder dependency (sha256 of its certificate); metadata the invocation
  ``JOB/attempt/N`` and the job's start and end; byproducts the statement (sha256 of its payload),
  the JUnit reports and the log's chain head (``testhideLogChain``: a digest of our own algorithm,
  which in-toto's DigestSet allows and other consumers ignore)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from testhide import __version__
from testhide.common.identity import AgentIdentity, IdentityError
from testhide.common.statement import (
    PAYLOAD_TYPE,
    Envelope,
    FileDigest,
    Signature,
    Statement,
    StatementError,
    key_id,
    pae,
    signature_valid,
    spec_digest,
)
from testhide.controlplane.auth.tokens import issuer_for
from testhide.controlplane.ca.statement_keys import SigningKey, StatementKeys
from testhide.controlplane.ca.statement_store import JobStatementRecord, StatementKeyRecord
from testhide.controlplane.errors import FailedPrecondition, NotFound
from testhide.controlplane.jobs.model import Job, JobSpec

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://testhide.dev/job/v1"
LOG_CHAIN_DIGEST = "testhideLogChain"


def builder_id(trust_domain: str) -> str:
    return issuer_for(trust_domain)


def statement_subject_name(job_id: str) -> str:
    return f"job-statement-{job_id}.json"


def _file(d: FileDigest) -> dict[str, Any]:
    return {"name": d.name, "digest": {"sha256": d.sha256}}


def _image(spec: Mapping[str, Any], isolation: Mapping[str, Any]) -> dict[str, Any]:
    """The image, by its registry digest (what ``IMAGE@sha256:`` pulls) when it has one, else by its
    local image id (the digest of its configuration: images loaded without a registry have no other)."""
    repo_digest, image_id = str(isolation.get("image_digest", "")), str(isolation.get("image_id", ""))
    algorithm, _, value = (repo_digest or image_id).partition(":")
    image: dict[str, Any] = {"name": spec.get("image", ""), "annotations": {"imageId": image_id}}
    if value:
        image["digest"] = {algorithm: value}
        image["annotations"]["digestOf"] = "manifest" if repo_digest else "image-config"
    return image


def _agent(record: JobStatementRecord, statement: Statement) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "name": f"agent/{statement.agent_id}",
        "digest": {"sha256": key_id(record.agent_certificate)},
    }
    # Countersigned, so it carried an identity; were it unreadable, the digest identifies it.
    with contextlib.suppress(ValueError, IdentityError):
        cert = x509.load_der_x509_certificate(record.agent_certificate)
        agent["uri"] = AgentIdentity.from_certificate(cert).uri
    return agent


def _byproducts(record: JobStatementRecord, statement: Statement) -> list[dict[str, Any]]:
    return [
        {
            "name": statement_subject_name(statement.job_id),
            "digest": {"sha256": hashlib.sha256(record.payload).hexdigest()},
            "mediaType": PAYLOAD_TYPE,
        },
        {"name": "log", "digest": {LOG_CHAIN_DIGEST: statement.log_chain_head}},
        *(_file(d) | {"annotations": {"kind": "junit"}} for d in statement.junit_reports),
    ]


def in_toto_statement(
    record: JobStatementRecord, statement: Statement, spec: Mapping[str, Any], pool: str, builder: str
) -> dict[str, Any]:
    """The in-toto Statement for a countersigned job statement (``record``, its payload decoded as
    ``statement``); ``spec`` is the wire spec as its digest is computed (``common/statement.py``)."""
    subjects = [_file(d) for d in sorted(statement.artifacts, key=lambda d: d.name)] or [
        {
            "name": statement_subject_name(statement.job_id),
            "digest": {"sha256": hashlib.sha256(record.payload).hexdigest()},
        }
    ]
    internal = {
        "org": statement.org,
        "pool": pool,
        "runtime": statement.isolation.get("runtime", ""),
        "agentId": statement.agent_id,
        "attempt": statement.attempt,
        "epoch": statement.epoch,
        "isolation": dict(statement.isolation),
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": dict(spec),
                "internalParameters": internal,
                "resolvedDependencies": [_image(spec, statement.isolation)],
            },
            "runDetails": {
                "builder": {
                    "id": builder,
                    "version": {"testhide-controlplane": __version__},
                    "builderDependencies": [_agent(record, statement)],
                },
                "metadata": {
                    "invocationId": f"{statement.job_id}/attempt/{statement.attempt}",
                    "startedOn": statement.started_at,
                    "finishedOn": statement.finished_at,
                },
                "byproducts": _byproducts(record, statement),
            },
        },
    }


def dsse_envelope(key: SigningKey, statement: Mapping[str, Any]) -> bytes:
    """The DSSE JSON envelope of the statement, signed like a countersignature (ECDSA P-256 over
    the PAE, DER), with the key's id (sha256 of its certificate)."""
    payload = json.dumps(
        statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
    signature = key.private_key.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    return Envelope(payload, (Signature(key.id, signature),), IN_TOTO_PAYLOAD_TYPE).to_json()


class ProvenanceStore(Protocol):
    async def get_job(self, org: str, job_id: str) -> Job | None: ...
    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None: ...
    async def statement_keys(self) -> list[StatementKeyRecord]: ...


class ProvenanceExporter:
    def __init__(
        self,
        store: ProvenanceStore,
        keys: StatementKeys,
        trust_domain: Callable[[], str],
        spec_json: Callable[[JobSpec], Mapping[str, Any]],
    ) -> None:
        self._store = store
        self._keys = keys
        self._trust_domain = trust_domain
        self._spec_json = spec_json
        """The wire spec as a dict, as its digest is computed (rpc/evidence.py)."""

    async def envelope(self, org: str, job_id: str) -> bytes:
        """The organisation's job's provenance as a DSSE JSON envelope (NotFound for a job it does
        not have, FailedPrecondition for one without a countersigned statement)."""
        job = await self._store.get_job(org, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        record = await self._store.job_statement(org, job_id)
        if record is None or record.countersignature is None:
            raise FailedPrecondition(
                f"job {job_id} has no countersigned statement to export as provenance"
                + (f" ({record.mismatch})" if record is not None and record.mismatch else "")
            )
        await self._check_countersignature(record)
        try:
            statement = Statement.decode(record.payload)
        except StatementError as exc:
            raise FailedPrecondition(f"job {job_id}'s kept statement is unreadable: {exc}") from exc
        spec = self._spec_json(job.spec)
        if spec_digest(spec) != statement.spec_digest:
            raise FailedPrecondition(f"job {job_id}'s stored spec no longer matches its signed statement")
        builder = builder_id(self._trust_domain())
        provenance = in_toto_statement(record, statement, spec, job.spec.pool, builder)
        return dsse_envelope(await self._keys.current(), provenance)

    async def _check_countersignature(self, record: JobStatementRecord) -> None:
        assert record.countersignature is not None
        # From the store, not the keys' cache: another replica may have made that key a moment ago.
        signer = next((k for k in await self._store.statement_keys() if k.id == record.signing_key_id), None)
        if signer is None or not signature_valid(
            x509.load_der_x509_certificate(signer.certificate), record.payload, record.countersignature
        ):
            raise FailedPrecondition(
                f"job {record.job_id}'s kept statement does not verify with the control plane's key"
            )
