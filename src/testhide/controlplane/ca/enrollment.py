"""Enrollment: a one-time token and a CSR become an agent identity and its
first certificate. The token decides org and pool; the agent decides nothing."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from testhide.common.identity import AgentIdentity
from testhide.common.tls import fingerprint
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.secrets import hash_secret, new_enrollment_token, parse_enrollment_token
from testhide.controlplane.ca.authority import CertificateAuthority, IssuedCertificate, agent_public_key
from testhide.controlplane.ca.signer import Signer
from testhide.controlplane.ca.store import CertificatePolicyStore, EnrollmentStore
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.errors import InvalidArgument, Unauthenticated
from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord

log = structlog.get_logger("testhide.enrollment")

AGENT_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
MAX_TOKEN_TTL = timedelta(days=7)


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    certificate_pem: bytes
    ca_bundle_pem: bytes


async def create_token(
    store: EnrollmentStore, ca_certificate_pem: bytes, org: str, pool: str, ttl: timedelta
) -> str:
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


async def certificate_lifetime(
    store: CertificatePolicyStore, org: str, pool: str, default: timedelta
) -> timedelta:
    """The server-wide lifetime, or the pool's if it set a shorter one."""
    pool_ttl = await store.pool_cert_ttl(org, pool)
    return min(default, pool_ttl) if pool_ttl else default


class Enrollment:
    def __init__(
        self,
        store: EnrollmentStore,
        certs: CertificateState,
        agent_cert_ttl: timedelta,
        auditor: Auditor,
        signer: Signer | None = None,
    ) -> None:
        self._store = store
        self._certs = certs
        self._ttl = agent_cert_ttl
        self._auditor = auditor
        self._signer = signer or Signer()
        """Signs the first certificate off the event loop, as renewals are (a fleet enrolling at once)."""

    async def enroll(self, token: str, csr_pem: bytes, name: str, source_ip: str = "") -> Enrolled:
        """The token is spent together with the agent's record, in one transaction,
        and only after the certificate is issued: if anything fails before that
        commits, the token stays usable and no agent is left behind."""
        if not AGENT_NAME_RE.match(name):
            raise InvalidArgument("agent name must be 1-63 letters, digits, '.', '_' or '-'")
        # Everything the request alone can fail on is checked before the token is spent.
        agent_public_key(csr_pem)
        ca = self._certs.current.active_ca
        token_id = ""
        try:
            parsed = parse_enrollment_token(token)
            token_id = parsed.token_id
            if parsed.ca_fingerprint != fingerprint(ca.certificate_pem):
                raise Unauthenticated("the enrollment token was issued for another CA or control plane")
            secret_hash = hash_secret(parsed.secret)
            record = await self._store.enrollment_token(token_id, secret_hash, datetime.now(UTC))
            agent, issued = await self._issue(ca, record, csr_pem, name)
            record = await self._store.enroll_agent(token_id, secret_hash, agent.enrolled_at, agent)
        except Unauthenticated as exc:
            log.warning("enrollment_token_refused", token_id=token_id, reason=str(exc), source_ip=source_ip)
            await self._auditor.record(
                "enrollment_token_refused",
                f"agent-host:{name}",
                target=token_id,
                source_ip=source_ip,
                reason=str(exc),
            )
            raise
        details = {
            "pool": record.pool,
            "name": name,
            "serial": agent.cert_serial,
            "not_after": issued.not_after.isoformat(),
        }
        log.info("agent_enrolled", agent_id=agent.id, org=record.org, **details)
        await self._auditor.record(
            "agent_enrolled",
            f"token:{record.id}",
            org=record.org,
            target=agent.id,
            source_ip=source_ip,
            **details,
        )
        return Enrolled(agent.id, issued.certificate_pem, self._certs.current.bundle_pem)

    async def _issue(
        self, ca: CertificateAuthority, token: EnrollmentTokenRecord, csr_pem: bytes, name: str
    ) -> tuple[AgentRecord, IssuedCertificate]:
        """A new agent of the token's org and pool, and its first certificate (not stored yet)."""
        agent_id = "a" + secrets.token_hex(8)
        identity = AgentIdentity(ca.trust_domain, token.org, token.pool, agent_id)
        lifetime = await certificate_lifetime(self._store, token.org, token.pool, self._ttl)
        issued = await self._signer.issue_agent(ca, csr_pem, identity, lifetime)
        agent = AgentRecord(
            agent_id,
            token.org,
            token.pool,
            name,
            format(issued.serial, "x"),
            issued.not_after,
            datetime.now(UTC),
            cert_issuer=fingerprint(ca.certificate_pem),
        )
        return agent, issued
