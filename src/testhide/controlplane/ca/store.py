"""What the ca package needs from storage: ``EnrollmentStore`` for enrollment
(tokens in, agents out) and ``AgentStore`` for checking and renewing enrolled
agents; both read a pool's certificate lifetime (``CertificatePolicyStore``).
The backends in ``store/`` implement them all (``store.base.Store`` is their
union)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from testhide.controlplane.store.base import AgentRecord, EnrollmentTokenRecord


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
    async def create_agent(self, record: AgentRecord) -> None: ...


class AgentStore(CertificatePolicyStore, Protocol):
    """Enrolled agents: checked on every stream and RPC, renewed, seen."""

    async def get_agent(self, org: str, agent_id: str) -> AgentRecord | None: ...
    async def touch_agent(
        self, org: str, agent_id: str, now: datetime, version: str | None = None
    ) -> None: ...
    async def record_agent_certificate(
        self, org: str, agent_id: str, serial: str, not_after: datetime, issuer: str
    ) -> None: ...
