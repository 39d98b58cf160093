"""The job's statement, signed on this host with the agent's current key (which never leaves
it): what the agent ran and how it ended, for the control plane to check and countersign
(common/statement.py). Facts are gathered while the job runs; the statement is made once, when
the result is, and travels with it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.agent.credentials import Credentials
from testhide.agent.model import Assignment, Isolation, Outcome, SignedStatement
from testhide.common.identity import AgentIdentity
from testhide.common.statement import FileDigest, Statement, isolation_facts, rfc3339, sign

log = structlog.get_logger("testhide.agent.statements")


@dataclass
class JobFacts:
    """What a running job's statement will say, gathered as it happens."""

    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    isolation: Isolation | None = None
    junit_reports: list[FileDigest] = field(default_factory=list)
    artifacts: list[FileDigest] = field(default_factory=list)

    def uploaded(self, path: str, kind: str, data: bytes) -> None:
        digest = FileDigest(path, hashlib.sha256(data).hexdigest())
        (self.junit_reports if kind == "junit" else self.artifacts).append(digest)


class StatementSigner:
    def __init__(self, credentials: Callable[[], Credentials]) -> None:
        self._credentials = credentials
        self._parsed: tuple[bytes, bytes, ec.EllipticCurvePrivateKey, bytes, str, str] | None = None
        """The current credentials' key and certificate as parsed (parsing costs more than
        signing): key PEM, certificate PEM, key, certificate DER, org, agent id."""

    def _current(self) -> tuple[ec.EllipticCurvePrivateKey, bytes, str, str]:
        credentials = self._credentials()
        found = self._parsed
        if found is None or (found[0], found[1]) != (credentials.key_pem, credentials.certificate_pem):
            key = serialization.load_pem_private_key(credentials.key_pem, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TypeError("the agent key is not an ECDSA key")
            cert = x509.load_pem_x509_certificate(credentials.certificate_pem)
            identity = AgentIdentity.from_certificate(cert)
            der = cert.public_bytes(serialization.Encoding.DER)
            found = (
                credentials.key_pem,
                credentials.certificate_pem,
                key,
                der,
                identity.org,
                identity.agent_id,
            )
            self._parsed = found
        return found[2], found[3], found[4], found[5]

    def sign(
        self,
        job: Assignment,
        facts: JobFacts,
        outcome: Outcome,
        exit_code: int,
        reason: str,
        log_chain_head: bytes,
    ) -> SignedStatement | None:
        """None if it cannot be made (the result still goes, unsigned: the control plane
        records that it came without a statement)."""
        try:
            key, cert_der, org, agent_id = self._current()
            statement = Statement(
                job_id=job.job_id,
                org=org,
                agent_id=agent_id,
                attempt=job.attempt,
                epoch=job.epoch,
                spec_digest=job.spec_digest,
                image_digest=facts.isolation.image_digest if facts.isolation else "",
                isolation=isolation_facts(facts.isolation),
                outcome=outcome.name,
                exit_code=exit_code,
                reason=reason,
                log_chain_head=log_chain_head.hex(),
                junit_reports=tuple(facts.junit_reports),
                artifacts=tuple(facts.artifacts),
                started_at=rfc3339(facts.started_at),
                finished_at=rfc3339(datetime.now(UTC)),
            )
            payload = statement.encode()
            return SignedStatement(payload, sign(key, payload), cert_der)
        except Exception as exc:
            log.error("job_statement_not_signed", job_id=job.job_id, error=repr(exc))
            return None
