"""What the ca package needs from storage: ``EnrollmentStore`` for enrollment
(tokens in, agents out) and ``AgentStore`` for checking and renewing enrolled
agents; both read a pool's certificate lifetime (``CertificatePolicyStore``).
The backends in ``store/`` implement them all (``store.base.Store`` is their
union)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from testhide.controlplane.auth.audit import AuditChain, AuditEvent
    from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord


def _printable(text: str, limit: int) -> str:
    """For an operator's terminal: no control characters, bounded."""
    return "".join(c for c in text[:limit] if c.isprintable())


@dataclass(frozen=True)
class AgentHello:
    """What an agent announced when its stream opened, kept for ``agents list``."""

    version: str
    labels: dict[str, str]
    runtimes: tuple[str, ...]
    max_jobs: int
    host: str = ""
    """The host name it gave (for `jobs show`); not an identity."""

    @classmethod
    def shown(
        cls, version: str, labels: dict[str, str], runtimes: list[str], max_jobs: int, host: str = ""
    ) -> AgentHello:
        """Bounded and printable: an agent's words, for display only."""
        return cls(
            _printable(version, 64),
            {_printable(k, 128): _printable(v, 256) for k, v in list(labels.items())[:64]},
            tuple(sorted(_printable(r, 64) for r in runtimes[:16])),
            max_jobs,
            _printable(host, 253),
        )


@dataclass(frozen=True)
class CertificateRenewal:
    """An agent's new certificate, and the audit entry that records it."""

    org: str
    agent_id: str
    serial: str
    not_after: datetime
    issuer: str
    event: AuditEvent


class CertificatePolicyStore(Protocol):
    async def pool_cert_ttl(self, org: str, pool: str) -> timedelta | None:
        """The pool's own agent-certificate lifetime, if it set one."""
        ...


class EnrollmentStore(CertificatePolicyStore, Protocol):
    """One-time enrollment tokens become agents."""

    async def pool_exists(self, org: str, pool: str) -> bool: ...
    async def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None: ...
    async def consume_enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord: ...
    async def enrollment_token(
        self, token_id: str, secret_hash: bytes, now: datetime
    ) -> EnrollmentTokenRecord:
        """The token, if it can enroll an agent at ``now``; changes nothing. Unauthenticated
        otherwise, the same for every reason."""
        ...

    async def enroll_agent(
        self, token_id: str, secret_hash: bytes, now: datetime, agent: AgentRecord
    ) -> EnrollmentTokenRecord:
        """Spend the token and add ``agent`` (of the token's org and pool) in one
        transaction: both or neither. Unauthenticated, and nothing changed, if the
        token cannot enroll an agent at ``now`` (another enrollment spent it meanwhile)."""
        ...

    async def create_agent(self, record: AgentRecord) -> None: ...


class AgentStore(CertificatePolicyStore, Protocol):
    """Enrolled agents: checked on every stream and RPC, renewed, seen."""

    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None: ...
    async def touch_agent(
        self, org: str, agent_id: str, now: datetime, hello: AgentHello | None = None
    ) -> None:
        """Last contact (a heartbeat); with ``hello``, a stream that opened, and what the agent offers."""
        ...

    async def agent_disconnected(self, org: str, agent_id: str, now: datetime) -> None:
        """Its stream ended (and no newer one of it is held here): last contact, and no longer connected."""
        ...

    async def record_agent_renewals(
        self, renewals: Sequence[CertificateRenewal], chain: AuditChain
    ) -> list[bool]:
        """Every agent's new certificate and, for each one recorded, its audit entry
        (chained in order, one head update), in one transaction: all or nothing.
        False for an agent that is revoked or gone by then: nothing of it is written."""
        ...
