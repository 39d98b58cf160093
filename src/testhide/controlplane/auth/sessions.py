"""Sessions: what a login opens and a refresh continues.

A login (password or API key) opens a session: a family of refresh tokens and
the access tokens issued from them. Every refresh spends its token and issues
the next. A spent token presented again means a copy exists somewhere: the
whole family is revoked (RFC 9700 4.14.2), except within a short grace window
that covers a reply lost in transit. Revoking an API key or a user revokes
their families; access tokens check their family on every call.

Guessing is slowed three ways, with the same answers whether or not an account
exists: failures per account (``lockout``), failures per client address over
all accounts (``address_lockout``: spraying one password over many accounts, or
trying many API keys), and a bounded pool for bcrypt (``PasswordChecks``).

A user with a TOTP factor, and every user who holds an admin scope, gives a
code with the password (``auth/mfa.py``); the password is checked first, and a
wrong code counts as a failed login. The session's tokens record the way it
was opened (``amr``), refreshes included."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.limits import (
    DEFAULT_ADDRESS_LOCKOUT,
    FailureSpikes,
    LockoutPolicy,
    SpikeDetector,
    client_network,
)
from testhide.controlplane.auth.mfa import (
    ADMIN_SCOPES,
    AMR_RECOVERY_CODE,
    Enrollment,
    SecondFactors,
    WrongCode,
    password_only,
)
from testhide.controlplane.auth.passwords import PasswordChecks
from testhide.controlplane.auth.principal import Principal
from testhide.controlplane.auth.secrets import hash_secret, parse_api_key, same_hash
from testhide.controlplane.auth.store import CredentialStore
from testhide.controlplane.auth.tokens import AccessTokens
from testhide.controlplane.errors import FailedPrecondition, RateLimited, Unauthenticated
from testhide.controlplane.store.base import RefreshRecord, UserRecord

log = structlog.get_logger("testhide.auth")

REFRESH_TTL = timedelta(days=30)
REUSE_GRACE = timedelta(seconds=10)
REVOCATION_CACHE = timedelta(seconds=1)
_REFRESH_RE = re.compile(r"\Athr_([0-9a-f]{16})_([0-9a-f]{64})\Z")
INVALID = "invalid credentials"
DEFAULT_LOCKOUT = LockoutPolicy()


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    access_expires_at: datetime
    refresh_token: str
    refresh_expires_at: datetime


class Sessions:
    def __init__(
        self,
        store: CredentialStore,
        tokens: AccessTokens,
        auditor: Auditor,
        lockout: LockoutPolicy = DEFAULT_LOCKOUT,
        spikes: FailureSpikes | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        reuse_grace: timedelta = REUSE_GRACE,
        address_lockout: LockoutPolicy = DEFAULT_ADDRESS_LOCKOUT,
        passwords: PasswordChecks | None = None,
        factors: SecondFactors | None = None,
    ) -> None:
        self._factors = factors
        """None: no user has a second factor, so none who holds an admin scope may log in."""
        self._reuse_grace = reuse_grace
        self._address_lockout = address_lockout
        self._passwords = passwords if passwords is not None else PasswordChecks()
        self._store = store
        self._tokens = tokens
        self._auditor = auditor
        self._lockout = lockout
        self._spikes = spikes if spikes is not None else SpikeDetector()  # empty is falsy
        self._clock = clock
        self._revoked_cache: dict[str, tuple[bool, datetime]] = {}

    # login ----------------------------------------------------------------------
    async def login_api_key(self, text: str, source_ip: str) -> TokenPair:
        await self._check_address(source_ip)
        try:
            parsed = parse_api_key(text.strip())
        except Unauthenticated:
            await self._failed("api_key:malformed", source_ip, login=True)
            raise Unauthenticated(INVALID) from None
        subject = f"api_key:{parsed.key_id}"
        await self._check_lockout(subject)
        record = await self._store.get_api_key(parsed.key_id)
        now = self._clock()
        if (
            record is None
            or record.revoked_at is not None
            or (record.expires_at and record.expires_at <= now)
            or not same_hash(record.secret_hash, hash_secret(parsed.secret))
        ):
            await self._failed(subject, source_ip, login=True)
            raise Unauthenticated(INVALID)
        await self._store.touch_api_key(record.id, now)
        principal = Principal("api_key", record.id, record.org, frozenset(record.scopes))
        return await self._opened(subject, principal, source_ip)

    async def login_password(
        self, org: str, user: str, password: str, source_ip: str, totp_code: str = "", recovery_code: str = ""
    ) -> TokenPair:
        subject = f"user:{org}/{user}"
        record = await self._password_user(subject, org, user, password, source_ip)
        try:
            amr = (
                await self._factors.for_login(record, totp_code, recovery_code)
                if self._factors is not None
                else password_only(record)
            )
        except WrongCode:
            await self._failed(subject, source_ip, login=True)
            raise
        if amr == AMR_RECOVERY_CODE:
            await self._auditor.record(
                "mfa_recovery_code_used", f"user:{record.id}", org=org, target=user, source_ip=source_ip
            )
        principal = Principal("user", record.id, record.org, frozenset(record.scopes), amr)
        return await self._opened(subject, principal, source_ip)

    async def _password_user(
        self, subject: str, org: str, user: str, password: str, source_ip: str
    ) -> UserRecord:
        """The user, once the password checks out; a failed login otherwise."""
        self._passwords.require_room()  # a flood is refused before it costs store lookups
        await self._check_address(source_ip)
        await self._check_lockout(subject)
        record = await self._store.find_user(org, user)
        usable = record is not None and record.revoked_at is None
        # bcrypt runs even for unknown users (a dummy hash): timing tells nothing.
        if (
            not await self._passwords.verify(password, record.password_hash if usable and record else None)
            or record is None
        ):
            await self._failed(subject, source_ip, login=True)
            raise Unauthenticated(INVALID)
        return record

    # second factors ---------------------------------------------------------------
    async def enroll_mfa(
        self, org: str, user: str, password: str, totp_code: str, source_ip: str
    ) -> Enrollment:
        """A new pending TOTP factor; replacing a confirmed one takes a current code of it."""
        subject = f"user:{org}/{user}"
        record = await self._password_user(subject, org, user, password, source_ip)
        factors = self._require_factors()
        current = await factors.confirmed(record)
        if current is not None:
            if not totp_code:
                raise Unauthenticated(f"user {user} has a second factor: replacing it takes a current code")
            if not await factors.accept_totp(current, totp_code):
                await self._failed(subject, source_ip, login=True)
                raise WrongCode()
        enrollment = await factors.enroll(record)
        await self._auditor.record(
            "mfa_enrolled", f"user:{record.id}", org=org, target=user, source_ip=source_ip
        )
        return enrollment

    async def confirm_mfa(self, org: str, user: str, password: str, totp_code: str, source_ip: str) -> None:
        subject = f"user:{org}/{user}"
        record = await self._password_user(subject, org, user, password, source_ip)
        if not await self._require_factors().confirm(record, totp_code):
            await self._failed(subject, source_ip, login=True)
            raise WrongCode()
        await self._store.clear_auth_failures(subject)
        await self._auditor.record(
            "mfa_confirmed", f"user:{record.id}", org=org, target=user, source_ip=source_ip
        )

    def _require_factors(self) -> SecondFactors:
        if self._factors is None:
            raise FailedPrecondition("second factors are not available on this control plane")
        return self._factors

    async def _opened(self, subject: str, principal: Principal, source_ip: str) -> TokenPair:
        await self._store.clear_auth_failures(subject)
        family = "f" + secrets.token_hex(12)
        now = self._clock()
        pair = await self._issue(principal, family, now + REFRESH_TTL, now)
        log.info("login", subject=subject, org=principal.org, session=family, source_ip=source_ip)
        await self._auditor.record(
            "login", f"{principal.kind}:{principal.id}", org=principal.org, target=family, source_ip=source_ip
        )
        return pair

    async def _issue(
        self, principal: Principal, family: str, family_expires: datetime, now: datetime
    ) -> TokenPair:
        token_id, secret = secrets.token_hex(8), secrets.token_hex(32)
        await self._store.create_refresh_token(
            RefreshRecord(
                token_id,
                family,
                principal.org,
                principal.kind,
                principal.id,
                tuple(sorted(principal.scopes)),
                hash_secret(secret),
                now,
                family_expires,
                amr=principal.amr,
            )
        )
        access, expires = self._tokens.issue(principal, family, now)
        return TokenPair(access, expires, f"thr_{token_id}_{secret}", family_expires)

    # refresh ----------------------------------------------------------------------
    async def refresh(self, text: str, source_ip: str) -> TokenPair:
        match = _REFRESH_RE.match(text.strip())
        if not match:
            await self._failed("refresh:malformed", source_ip)
            raise Unauthenticated(INVALID)
        now = self._clock()
        found = await self._store.spend_refresh_token(match[1], now)
        if found is None or not same_hash(found[0].secret_hash, hash_secret(match[2])):
            await self._failed("refresh:unknown", source_ip)
            raise Unauthenticated(INVALID)
        record, spent_now = found
        if record.revoked_at is not None or record.family_expires_at <= now:
            raise Unauthenticated("this session has ended; log in again")
        if not spent_now:
            retry = record.used_at is not None and now - record.used_at <= self._reuse_grace
            if not retry:
                await self._store.revoke_refresh_family(record.family, now)
                self._revoked_cache.pop(record.family, None)
                log.warning(
                    "refresh_token_reused", session=record.family, org=record.org, source_ip=source_ip
                )
                await self._auditor.record(
                    "refresh_token_reused",
                    f"{record.principal_kind}:{record.principal_id}",
                    org=record.org,
                    target=record.family,
                    source_ip=source_ip,
                )
                raise Unauthenticated("refresh token reused: the whole session is revoked; log in again")
        principal = await self._still_valid(record, now)
        return await self._issue(principal, record.family, record.family_expires_at, now)

    async def _still_valid(self, record: RefreshRecord, now: datetime) -> Principal:
        """The principal behind a session, as it stands now (keys and users get revoked)."""
        if record.principal_kind == "api_key":
            key = await self._store.get_api_key(record.principal_id)
            if key is None or key.revoked_at or (key.expires_at and key.expires_at <= now):
                raise Unauthenticated("the API key behind this session was revoked or expired")
            return Principal("api_key", key.id, key.org, frozenset(key.scopes))
        user = await self._store.get_user(record.org, record.principal_id)
        if user is None or user.revoked_at:
            raise Unauthenticated("the user behind this session was removed")
        if ADMIN_SCOPES & set(user.scopes) and "mfa" not in record.amr:
            raise Unauthenticated(
                "this session was opened without a second factor, which an admin scope requires; log in again"
            )
        return Principal("user", user.id, user.org, frozenset(user.scopes), record.amr)

    async def logout(self, text: str) -> None:
        match = _REFRESH_RE.match(text.strip())
        if not match:
            raise Unauthenticated(INVALID)
        found = await self._store.spend_refresh_token(match[1], self._clock())
        if found is None or not same_hash(found[0].secret_hash, hash_secret(match[2])):
            raise Unauthenticated(INVALID)
        await self._store.revoke_refresh_family(found[0].family, self._clock())
        self._revoked_cache.pop(found[0].family, None)

    # every call -----------------------------------------------------------------------
    async def authenticate(self, authorization: str | None, source_ip: str) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing credentials: log in and send 'authorization: Bearer <access token>'"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            await self._failed("bearer:malformed", source_ip)
            raise Unauthenticated(INVALID)
        try:
            claims = self._tokens.verify(token.strip(), self._clock())
        except Unauthenticated:
            await self._failed("bearer:invalid", source_ip, record=False)
            raise
        if await self._session_revoked(claims.session):
            raise Unauthenticated("this session was revoked; log in again")
        return claims.principal

    async def _session_revoked(self, family: str) -> bool:
        now = self._clock()
        cached = self._revoked_cache.get(family)
        if cached and now - cached[1] < REVOCATION_CACHE:
            return cached[0]
        revoked = await self._store.family_revoked(family)
        if len(self._revoked_cache) > 100_000:
            self._revoked_cache.clear()
        self._revoked_cache[family] = (revoked, now)
        return revoked

    # failures ---------------------------------------------------------------------------
    async def _check_address(self, source_ip: str) -> None:
        """Refuse a login from an address that spent its failure budget, whoever it names."""
        now, policy = self._clock(), self._address_lockout
        count, last = await self._store.address_failures(client_network(source_ip), now - policy.window)
        delay = policy.delay(count)
        if last is not None and delay and now < last + delay:
            wait = (last + delay - now).total_seconds()
            raise RateLimited("too many failed logins from this address; try again later", retry_after_s=wait)

    async def _check_lockout(self, subject: str) -> None:
        now = self._clock()
        count, last = await self._store.auth_failures(subject, now - self._lockout.window)
        delay = self._lockout.delay(count)
        if last is not None and delay and now < last + delay:
            wait = (last + delay - now).total_seconds()
            raise RateLimited("too many failed attempts; try again later", retry_after_s=wait)

    async def _failed(self, subject: str, source_ip: str, record: bool = True, login: bool = False) -> None:
        if record:
            await self._store.record_auth_failure(subject, self._clock(), self._lockout.window)
        if login:
            # Successes never reset it: one valid account must not buy more guesses at others.
            window = self._address_lockout.window
            await self._store.record_address_failure(client_network(source_ip), self._clock(), window)
        spiked = await self._spikes.observe("ip", client_network(source_ip))
        if record and await self._spikes.observe("account", subject):
            spiked = True
        if spiked:
            await self._auditor.record("auth_failure_spike", "system", target=subject, source_ip=source_ip)
        if record:
            await self._auditor.record("login_failed", subject, source_ip=source_ip)
