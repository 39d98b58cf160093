"""What the auth package needs from storage: ``CredentialStore`` for sessions
(API keys, users, refresh-token families, failure counts), ``SecondFactorStore``
for users' TOTP factors and ``AuditStore``
for the audit chain. The backends in ``store/`` implement them all
(``store.base.Store`` is their union)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from testhide.controlplane.auth.audit import AuditChain, AuditEntry, AuditEvent
    from testhide.controlplane.store.base import ApiKeyRecord, MfaFactorRecord, RefreshRecord, UserRecord


class CredentialStore(Protocol):
    """Logins, refreshes and the failures that slow guessers down."""

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...
    async def touch_api_key(self, key_id: str, now: datetime) -> None: ...
    async def find_user(self, org: str, name: str) -> UserRecord | None: ...
    async def get_user(self, org: str, user_id: str) -> UserRecord | None: ...

    # refresh-token families
    async def create_refresh_token(self, record: RefreshRecord) -> None: ...
    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        """The token and whether this call spent it (False: it was spent before)."""
        ...

    async def revoke_refresh_family(self, family: str, now: datetime) -> int: ...
    async def family_revoked(self, family: str) -> bool: ...

    # failed attempts, per account and per client address
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int: ...
    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]: ...
    async def clear_auth_failures(self, subject: str) -> None: ...
    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int: ...
    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]: ...


class SecondFactorStore(Protocol):
    """Users' TOTP factors (``auth/mfa.py``): one pending and one confirmed at most."""

    async def mfa_factor(self, org: str, user_id: str, confirmed: bool) -> MfaFactorRecord | None: ...
    async def create_mfa_factor(self, record: MfaFactorRecord, code_hashes: list[bytes]) -> None:
        """The user's new pending factor and its recovery codes, replacing any pending one."""
        ...

    async def confirm_mfa_factor(self, factor_id: str, step: int, now: datetime) -> bool:
        """Make the pending factor the user's factor (the one before goes, codes and all),
        its ``step`` accepted; False when it is no longer pending."""
        ...

    async def accept_mfa_step(self, factor_id: str, step: int) -> bool:
        """Record ``step`` as accepted unless it is not later than the last one accepted."""
        ...

    async def spend_recovery_code(self, factor_id: str, code_hash: bytes, now: datetime) -> bool:
        """Mark the confirmed factor's unused code used; False when there is none such."""
        ...

    async def delete_mfa_factors(self, org: str, user_id: str) -> int:
        """Remove the user's factors, pending and confirmed, and their codes; how many went."""
        ...


class AuditStore(Protocol):
    """The append-only audit chain."""

    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry: ...
    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]: ...
