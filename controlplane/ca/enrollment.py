"""Enrollment: a one-time token and a CSR become an agent identity and its
first certificate. The token decides org and pool; the agent decides nothing."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from cryptography import x509

from common.identity import AgentIdentity
from common.tls import fingerprint
from controlplane.auth.secrets import hash_secret, new_enrollment_token, parse_enrollment_token
from controlplane.ca.authority import CertificateAuthority
from controlplane.errors import InvalidArgument, Unauthenticated
from controlplane.store.base import AgentRecord, EnrollmentTokenRecord, Store

log = structlog.get_logger("testhide.enrollment")

AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_TOKEN_TTL = timedelta(days=7)


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    certificate_pem: bytes
    ca_bundle_pem: bytes


async def create_token(store: Store, ca_certificate_pem: bytes, org: str, pool: str, ttl: timedelta) -> str:
    if not timedelta(seconds=10) <= ttl <= MAX_TOKEN_TTL:
        raise InvalidArgument("token lifetime must be between 10s and 7 days")
    if not await store.pool_exists(org, pool):
        raise InvalidArgument(f"pool {pool!r} does not exist in organisation {org!r}")
    text, parsed = new_enrollment_token(fingerprint(ca_certificate_pem))
    now = datetime.now(UTC)
    await store.create_enrollment_token(
        EnrollmentTokenRecord(parsed.token_id, org, pool, hash_secret(parsed.secret), now, now + ttl)
    )
    return text


class Enrollment:
    def __init__(self, store: Store, ca: CertificateAuthority, agent_cert_ttl: timedelta) -> None:
        self._store = store
        self._ca = ca
        self._ttl = agent_cert_ttl

    async def enroll(self, token: str, csr_pem: bytes, name: str) -> Enrolled:
        if not AGENT_NAME_RE.match(name):
            raise InvalidArgument("agent name must be 1-63 letters, digits, '.', '_' or '-'")
        try:
            x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidArgument("csr_pem is not a PEM certificate signing request") from exc
        try:
            parsed = parse_enrollment_token(token)
            if parsed.ca_fingerprint != fingerprint(self._ca.certificate_pem):
                raise Unauthenticated("the enrollment token was issued by another control plane")
            record = await self._store.consume_enrollment_token(parsed.token_id, hash_secret(parsed.secret),
                                                                datetime.now(UTC))
        except Unauthenticated as exc:
            log.warning("enrollment_token_refused", reason=str(exc))
            raise
        agent_id = "a" + secrets.token_hex(8)
        identity = AgentIdentity(self._ca.trust_domain, record.org, record.pool, agent_id)
        issued = self._ca.issue_agent(csr_pem, identity, self._ttl)
        now = datetime.now(UTC)
        await self._store.create_agent(
            AgentRecord(agent_id, record.org, record.pool, name, format(issued.serial, "x"), issued.not_after, now)
        )
        log.info("agent_enrolled", agent_id=agent_id, org=record.org, pool=record.pool, name=name,
                 serial=format(issued.serial, "x"), not_after=issued.not_after.isoformat())
        return Enrolled(agent_id, issued.certificate_pem, self._ca.certificate_pem)
