"""TOTP second factors (RFC 6238; the codes are pyotp's): what a user enrolls,
confirms, and then gives with the password at every login. A user who holds
an admin scope cannot log in without one.

A factor's secret is sealed (AES-256-GCM) under its own data key, wrapped by
the master key like every other data key (master-key rotation re-wraps it),
and bound to the factor and its user as associated data: the database alone
gives no code away. Enrolling creates a pending factor and ten recovery codes;
confirming it with a valid code makes it the user's factor (the one before
goes, its codes with it). A code is accepted once: its time step must be later
than the last accepted (``valid_window`` one step either side, for clock
skew), so a code seen over a shoulder or in a log is spent. Recovery codes are
80 random bits each, stored as salted sha256 (``secrets.hash_secret``), each
spent at its first use.

How a session was authenticated goes in its tokens' ``amr`` claim as RFC 8176
values: ``pwd`` alone; ``pwd mfa otp`` with a TOTP code; ``pwd mfa kba`` with
a recovery code (something the user keeps written down, not a device).

Counting wrong codes toward lockout is the caller's (``Sessions``): this
module answers whether a code is good."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pyotp

from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.auth.secrets import hash_secret
from testhide.controlplane.auth.store import SecondFactorStore
from testhide.controlplane.errors import FailedPrecondition, Unauthenticated
from testhide.controlplane.store.base import MfaFactorRecord, UserRecord

ISSUER = "testhide"
VALID_WINDOW = 1
"""Time steps (30 s) accepted either side of the current one: clocks drift."""
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i to misread
_RECOVERY_RE = re.compile(rf"\A[{_RECOVERY_ALPHABET}]{{16}}\Z")
_TOTP_RE = re.compile(r"\A[0-9]{6}\Z")

ADMIN_SCOPES = frozenset({"agents:admin", "org:admin"})
AMR_PASSWORD = ("pwd",)
AMR_TOTP = ("pwd", "mfa", "otp")
AMR_RECOVERY_CODE = ("pwd", "mfa", "kba")

SECOND_FACTOR_REQUIRED = "a second factor is required: pass --totp-code (or --recovery-code)"
WRONG_CODE = "invalid second-factor code"


class WrongCode(Unauthenticated):
    """A code that was given and is not good: a failed authentication."""

    def __init__(self) -> None:
        super().__init__(WRONG_CODE)


@dataclass(frozen=True)
class Enrollment:
    otpauth_uri: str
    secret: str
    recovery_codes: tuple[str, ...]


def must_enroll(user: UserRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"user {user.name} holds an admin scope and must enroll a second factor first: run 'testhide mfa"
        f" enroll --server HOST:PORT --org {user.org} --user {user.name}'"
    )


def password_only(user: UserRecord) -> tuple[str, ...]:
    """The amr of a login without a second factor, refused to a user who holds an admin scope."""
    if ADMIN_SCOPES & set(user.scopes):
        raise must_enroll(user)
    return AMR_PASSWORD


def new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def _normalised_recovery_code(text: str) -> str | None:
    raw = re.sub(r"[\s-]", "", text).lower()
    return raw if _RECOVERY_RE.match(raw) else None


def _recovery_hash(factor_id: str, normalised: str) -> bytes:
    return hash_secret(f"{factor_id}:{normalised}")


def _secret_aad(factor: MfaFactorRecord) -> bytes:
    return f"mfa:{factor.org}:{factor.user_id}:{factor.id}".encode()


class SecondFactors:
    def __init__(
        self,
        store: SecondFactorStore,
        master: MasterKey,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._master = master
        self._clock = clock

    async def confirmed(self, user: UserRecord) -> MfaFactorRecord | None:
        return await self._store.mfa_factor(user.org, user.id, confirmed=True)

    async def for_login(self, user: UserRecord, totp_code: str, recovery_code: str) -> tuple[str, ...]:
        """The session's amr once the second factor checks out; ``WrongCode`` if it does not."""
        factor = await self.confirmed(user)
        if factor is None:
            return password_only(user)
        if totp_code:
            if await self.accept_totp(factor, totp_code):
                return AMR_TOTP
        elif recovery_code:
            if await self.spend_recovery_code(factor, recovery_code):
                return AMR_RECOVERY_CODE
        else:
            raise Unauthenticated(SECOND_FACTOR_REQUIRED)
        raise WrongCode()

    async def accept_totp(self, factor: MfaFactorRecord, code: str) -> bool:
        """Whether ``code`` is good now and its time step later than any accepted before (then recorded)."""
        step = self._step_of(factor, code)
        return step is not None and await self._store.accept_mfa_step(factor.id, step)

    async def spend_recovery_code(self, factor: MfaFactorRecord, code: str) -> bool:
        normalised = _normalised_recovery_code(code)
        if normalised is None:
            return False
        return await self._store.spend_recovery_code(
            factor.id, _recovery_hash(factor.id, normalised), self._clock()
        )

    async def enroll(self, user: UserRecord) -> Enrollment:
        """A new pending factor and its recovery codes (any pending one before is dropped)."""
        factor_id = "m" + secrets.token_hex(12)
        secret = pyotp.random_base32()
        data_key, wrapped = self._master.new_data_key(aad=factor_id.encode())
        record = MfaFactorRecord(factor_id, user.org, user.id, wrapped, b"", self._clock())
        record = replace(record, sealed_secret=seal(data_key, secret.encode(), _secret_aad(record)))
        codes = tuple(new_recovery_code() for _ in range(RECOVERY_CODES))
        await self._store.create_mfa_factor(
            record, [_recovery_hash(factor_id, c.replace("-", "")) for c in codes]
        )
        uri = pyotp.TOTP(secret).provisioning_uri(name=f"{user.name}@{user.org}", issuer_name=ISSUER)
        return Enrollment(uri, secret, codes)

    async def confirm(self, user: UserRecord, code: str) -> bool:
        """Make the pending factor the user's, given a good code for it; False for a wrong code."""
        pending = await self._store.mfa_factor(user.org, user.id, confirmed=False)
        if pending is None:
            raise FailedPrecondition(
                f"user {user.name} has no second factor being enrolled: run 'testhide mfa enroll' first"
            )
        step = self._step_of(pending, code)
        if step is None:
            return False
        if not await self._store.confirm_mfa_factor(pending.id, step, self._clock()):
            raise FailedPrecondition("this enrollment was confirmed or replaced meanwhile")
        return True

    async def reset(self, user: UserRecord) -> int:
        """Remove the user's factors (a lost device and lost codes); how many went."""
        return await self._store.delete_mfa_factors(user.org, user.id)

    def _step_of(self, factor: MfaFactorRecord, code: str) -> int | None:
        """The time step ``code`` is good for (within the window), unless it is an old one."""
        code = re.sub(r"\s", "", code)
        if not _TOTP_RE.match(code):
            return None
        totp = pyotp.TOTP(self._secret(factor))
        try:
            step = totp.verify_and_get_timecode(code, for_time=self._clock(), valid_window=VALID_WINDOW)
        except pyotp.OTPVerificationError:
            return None
        return step if factor.last_step is None or step > factor.last_step else None

    def _secret(self, factor: MfaFactorRecord) -> str:
        data_key = self._master.unwrap_data_key(factor.data_key, aad=factor.id.encode())
        return unseal(data_key, factor.sealed_secret, _secret_aad(factor)).decode()
