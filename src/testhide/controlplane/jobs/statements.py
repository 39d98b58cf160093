"""A job's signed statement, checked against what the control plane stored and countersigned.

The agent signs what it ran and how it ended (common/statement.py); once its result is
committed, the control plane compares every field with its own record of the job: the holder,
attempt and epoch, the spec's digest, the isolation facts and image, the outcome, exit code and
reason, the log chain head, and the digests of every file uploaded. A statement that agrees is
countersigned with the statement-signing key (ca/statement_keys.py). One that does not, or is
not signed by the job's holder with a certificate of the CA, is kept all the same (evidence of
what the agent claimed) but not countersigned, and the disagreement is audited
(``statement_mismatch``, naming the first field)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testhide.common.identity import AgentIdentity, IdentityError
from testhide.common.statement import (
    Statement,
    StatementError,
    isolation_facts,
    issued_by,
    signature_valid,
)
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.ca.statement_keys import StatementKeys
from testhide.controlplane.ca.statement_store import JobStatementRecord, StatementStore
from testhide.controlplane.errors import FailedPrecondition, NotFound
from testhide.controlplane.jobs.model import (
    BlobInfo,
    Job,
    JobReport,
    JobSpec,
    JobStatus,
    SubmittedStatement,
)

log = structlog.get_logger("testhide.statements")

_STATUS = {"TIMED_OUT": JobStatus.TIMED_OUT, "CANCELED": JobStatus.CANCELED, "ERROR": JobStatus.ERROR}
_WITH_EXIT_CODE = ("EXITED", "TIMED_OUT", "CANCELED")
FILE_KINDS = ("artifact", "service_log")
MAX_STATEMENT_BYTES = 1024 * 1024
"""A statement names each file a job uploaded (about 100 bytes each); larger is not kept."""


class StatementCheckStore(StatementStore, Protocol):
    async def jobs_blobs(
        self, org: str, job_ids: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, list[BlobInfo]]: ...
    async def get_job(self, org: str, job_id: str) -> Job | None: ...


@dataclass(frozen=True)
class Evidence:
    """A job's statement as kept, and the certificates that verify it offline (DER)."""

    record: JobStatementRecord
    agent_cas: tuple[bytes, ...]
    """The trusted CA certificates that issued the agent's certificate."""
    signing_certificates: tuple[bytes, ...]


def recorded_status(statement: Statement) -> tuple[JobStatus, int | None]:
    """The status and exit code the control plane records for the statement's outcome."""
    status = _STATUS.get(statement.outcome) or (
        JobStatus.SUCCEEDED if statement.exit_code == 0 else JobStatus.FAILED
    )
    return status, statement.exit_code if statement.outcome in _WITH_EXIT_CODE else None


class AgentCertificates:
    """Agent certificates already checked against the trusted CAs: an agent signs every job of
    its certificate's hour with it, and checking the CA's signature costs more than the rest."""

    MAX = 4096

    def __init__(self) -> None:
        self._trusted: Sequence[x509.Certificate] | None = None
        self._checked: dict[bytes, tuple[x509.Certificate, AgentIdentity] | str] = {}

    def check(
        self, cert_der: bytes, trusted: Sequence[x509.Certificate]
    ) -> tuple[x509.Certificate, AgentIdentity] | str:
        """The certificate and its identity, or why it is refused."""
        if trusted is not self._trusted or len(self._checked) >= self.MAX:
            self._trusted, self._checked = trusted, {}  # a CA rotation changes what is trusted
        found = self._checked.get(cert_der)
        if found is None:
            found = self._checked[cert_der] = _checked(cert_der, trusted)
        return found


def _checked(
    cert_der: bytes, trusted: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, AgentIdentity] | str:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        identity = AgentIdentity.from_certificate(cert)
    except (ValueError, IdentityError) as exc:
        return f"agent_certificate: {exc}"
    if not any(issued_by(cert, ca) for ca in trusted):
        return "agent_certificate: not issued by a CA this control plane trusts"
    return cert, identity


def signer_mismatch(
    statement: Statement,
    report: JobReport,
    cert_der: bytes,
    signature: bytes,
    trusted: Sequence[x509.Certificate],
    certificates: AgentCertificates | None = None,
    payload: bytes | None = None,
) -> str:
    """Why the statement is not the job holder's, signed with its certificate; empty if it is."""
    checked = (certificates or AgentCertificates()).check(cert_der, trusted)
    if isinstance(checked, str):
        return checked
    cert, identity = checked
    if (identity.org, identity.agent_id) != (report.org, report.agent_id):
        return f"agent_certificate: names agent {identity.agent_id}, the job's holder is {report.agent_id}"
    if (statement.org, statement.agent_id) != (report.org, report.agent_id):
        return f"agent_id: statement names {statement.agent_id}, the job's holder is {report.agent_id}"
    # Statement.decode refused any payload that is not the statement's one encoding.
    if not signature_valid(cert, statement.encode() if payload is None else payload, signature):
        return "signature: does not verify with the agent certificate"
    return ""


def _digests(blobs: Sequence[BlobInfo]) -> list[tuple[str, str]]:
    return sorted((b.path, b.sha256) for b in blobs)


def field_mismatch(
    statement: Statement, job: Job, spec_digest: str, junit: Sequence[BlobInfo], files: Sequence[BlobInfo]
) -> str:
    """The first statement field that disagrees with the stored job; empty if none."""
    status, exit_code = recorded_status(statement)
    isolation = job.isolation
    expected: list[tuple[str, object, object]] = [
        ("job_id", statement.job_id, job.id),
        ("org", statement.org, job.org),
        ("agent_id", statement.agent_id, job.agent_id),
        ("attempt", statement.attempt, job.attempt),
        ("epoch", statement.epoch, job.epoch),
        ("spec_digest", statement.spec_digest, spec_digest),
        ("image_digest", statement.image_digest, isolation.image_digest if isolation else ""),
        ("isolation", dict(statement.isolation), isolation_facts(isolation)),
        ("outcome", status, job.status),
        ("exit_code", exit_code, job.exit_code),
        ("reason", statement.reason, job.status_reason),
        ("log_chain_head", statement.log_chain_head, job.log_chain_head.hex()),
        ("junit_reports", sorted((d.name, d.sha256) for d in statement.junit_reports), _digests(junit)),
        ("artifacts", sorted((d.name, d.sha256) for d in statement.artifacts), _digests(files)),
    ]
    for name, claimed, stored in expected:
        if claimed != stored:
            return f"{name}: the statement says {claimed!r}, the control plane stored {stored!r}"
    return ""


class StatementRecorder:
    def __init__(
        self,
        store: StatementCheckStore,
        keys: StatementKeys,
        trusted: Callable[[], Sequence[x509.Certificate]],
        auditor: Auditor,
        spec_digest: Callable[[JobSpec], str],
    ) -> None:
        self._store = store
        self._keys = keys
        self._trusted = trusted
        self._auditor = auditor
        self._spec_digest = spec_digest
        self._certificates = AgentCertificates()

    async def record(self, signed: Sequence[tuple[JobReport, Job]]) -> None:
        """Check each result's statement (``signed``: the results just committed, with their
        jobs as stored), countersign those that agree, keep them all in one transaction;
        never raises (the results are already recorded)."""
        sized: list[tuple[JobReport, Job, SubmittedStatement]] = []
        for report, job in signed:
            if (submitted := report.statement) is None:
                continue
            size = len(submitted.payload) + len(submitted.signature) + len(submitted.certificate_der)
            if size > MAX_STATEMENT_BYTES:
                log.warning("job_statement_refused", job_id=job.id, agent_id=report.agent_id, size=size)
                await self._audit_mismatch(
                    report, job, f"statement: {size} bytes, over {MAX_STATEMENT_BYTES}"
                )
                continue
            sized.append((report, job, submitted))
        if not sized:
            return
        try:
            done = await self._keep(sized)
        except Exception as exc:
            if len(sized) == 1:
                log.error("job_statements_not_recorded", job_ids=[sized[0][1].id], error=repr(exc))
                return
            # One statement's failure (or a moment's) must not lose the others: each on its own.
            ids = [job.id for _, job, _ in sized]
            log.warning("job_statements_batch_failed", job_ids=ids, error=repr(exc))
            done = []
            for one in sized:
                try:
                    done += await self._keep([one])
                except Exception as alone:
                    log.error("job_statements_not_recorded", job_ids=[one[1].id], error=repr(alone))
        for report, job, record in done:
            if record.mismatch:
                log.warning(
                    "job_statement_mismatch",
                    job_id=job.id,
                    agent_id=report.agent_id,
                    mismatch=record.mismatch,
                )
                await self._audit_mismatch(report, job, record.mismatch)

    async def _keep(
        self, sized: Sequence[tuple[JobReport, Job, SubmittedStatement]]
    ) -> list[tuple[JobReport, Job, JobStatementRecord]]:
        """Checks the statements against one read of their jobs' files and keeps them in one
        transaction; those kept (a job's first statement only)."""
        files: dict[str, list[BlobInfo]] = {}
        for org in {job.org for _, job, _ in sized}:
            ids = [job.id for _, job, _ in sized if job.org == org]
            files.update(await self._store.jobs_blobs(org, ids, ("junit", *FILE_KINDS)))
        records = [
            await self._checked(report, job, submitted, files.get(job.id, []))
            for report, job, submitted in sized
        ]
        kept = await self._store.add_job_statements(records)
        return [
            (report, job, record)
            for (report, job, _), record, was_kept in zip(sized, records, kept, strict=True)
            if was_kept
        ]

    async def _checked(
        self, report: JobReport, job: Job, submitted: SubmittedStatement, files: list[BlobInfo]
    ) -> JobStatementRecord:
        """The statement as kept: countersigned if it agrees with the stored job."""
        mismatch = self._check(report, job, submitted, files)
        countersignature = key_id = None
        if not mismatch:
            key = await self._keys.current()
            countersignature, key_id = key.countersign(submitted.payload), key.id
        return JobStatementRecord(
            job.id,
            job.org,
            submitted.payload,
            submitted.signature,
            submitted.certificate_der,
            datetime.now(UTC),
            countersignature,
            key_id,
            mismatch,
        )

    async def _audit_mismatch(self, report: JobReport, job: Job, mismatch: str) -> None:
        try:
            await self._auditor.record(
                "statement_mismatch",
                f"agent:{report.agent_id}",
                org=job.org,
                target=job.id,
                field=mismatch.split(":", 1)[0],
                detail=mismatch[:500],
            )
        except Exception as exc:  # the result is recorded already: this must not undo its acknowledgement
            log.error("statement_mismatch_not_audited", job_id=job.id, error=repr(exc))

    def _check(
        self, report: JobReport, job: Job, submitted: SubmittedStatement, files: list[BlobInfo]
    ) -> str:
        try:
            statement = Statement.decode(submitted.payload)
        except StatementError as exc:
            return f"statement: {exc}"
        found = signer_mismatch(
            statement,
            report,
            submitted.certificate_der,
            submitted.signature,
            self._trusted(),
            self._certificates,
            submitted.payload,
        )
        if found:
            return found
        junit = [b for b in files if b.kind == "junit"]
        uploaded = [b for b in files if b.kind in FILE_KINDS]
        return field_mismatch(statement, job, self._spec_digest(job.spec), junit, uploaded)

    async def evidence(self, org: str, job_id: str) -> Evidence:
        """The organisation's job's statement (NotFound for a job it does not have)."""
        if await self._store.get_job(org, job_id) is None:
            raise NotFound(f"job {job_id} not found")
        record = await self._store.job_statement(org, job_id)
        if record is None:
            raise FailedPrecondition(
                f"job {job_id} has no signed statement (it has not ended, or its agent predates statements)"
            )
        try:
            cert = x509.load_der_x509_certificate(record.agent_certificate)
            issuers = tuple(
                ca.public_bytes(serialization.Encoding.DER) for ca in self._trusted() if issued_by(cert, ca)
            )
        except ValueError:
            issuers = ()
        return Evidence(record, issuers, tuple(await self._keys.certificates()))
