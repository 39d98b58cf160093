"""controlplane/auth/mfa.py and the second factor of Sessions, on in-memory
stores with an injected clock: codes from pyotp at chosen instants, a code
accepted once, one step of clock skew, recovery codes spent once, admin scopes
refused without a factor, wrong codes counted toward lockout, and the ``amr``
the tokens carry (refreshes included)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.controlplane.auth.mfa import (
    AMR_PASSWORD,
    AMR_RECOVERY_CODE,
    AMR_TOTP,
    SECOND_FACTOR_REQUIRED,
    WRONG_CODE,
    SecondFactors,
    WrongCode,
)
from testhide.controlplane.auth.passwords import PasswordChecks, hash_password
from testhide.controlplane.auth.sessions import INVALID, Sessions
from testhide.controlplane.auth.tokens import AccessTokens
from testhide.controlplane.errors import FailedPrecondition, RateLimited, Unauthenticated
from testhide.controlplane.store.base import MfaFactorRecord, UserRecord
from tests.unit.fakes import MemoryAudit, MemoryCredentials
from tests.unit.test_sessions import OneKey

PASSWORD = "Correct-Horse-7"
PEER = "ipv4:203.0.113.9:5000"
STEP = timedelta(seconds=30)


@dataclass
class MemoryFactors:
    """``SecondFactorStore`` in memory, with the same conditions as the backends."""

    factors: dict[str, MfaFactorRecord] = field(default_factory=dict)
    codes: dict[tuple[str, bytes], datetime | None] = field(default_factory=dict)

    async def mfa_factor(self, org: str, user_id: str, confirmed: bool) -> MfaFactorRecord | None:
        return next(
            (
                f
                for f in self.factors.values()
                if (f.org, f.user_id) == (org, user_id) and (f.confirmed_at is not None) == confirmed
            ),
            None,
        )

    def _drop(self, factor: MfaFactorRecord | None) -> None:
        if factor is not None:
            del self.factors[factor.id]
            self.codes = {k: v for k, v in self.codes.items() if k[0] != factor.id}

    async def create_mfa_factor(self, record: MfaFactorRecord, code_hashes: list[bytes]) -> None:
        self._drop(await self.mfa_factor(record.org, record.user_id, confirmed=False))
        self.factors[record.id] = record
        self.codes.update({(record.id, h): None for h in code_hashes})

    async def confirm_mfa_factor(self, factor_id: str, step: int, now: datetime) -> bool:
        pending = self.factors.get(factor_id)
        if pending is None or pending.confirmed_at is not None:
            return False
        self._drop(await self.mfa_factor(pending.org, pending.user_id, confirmed=True))
        self.factors[factor_id] = replace(pending, confirmed_at=now, last_step=step)
        return True

    async def accept_mfa_step(self, factor_id: str, step: int) -> bool:
        factor = self.factors.get(factor_id)
        if factor is None or (factor.last_step is not None and factor.last_step >= step):
            return False
        self.factors[factor_id] = replace(factor, last_step=step)
        return True

    async def spend_recovery_code(self, factor_id: str, code_hash: bytes, now: datetime) -> bool:
        factor = self.factors.get(factor_id)
        key = (factor_id, code_hash)
        if factor is None or factor.confirmed_at is None or key not in self.codes or self.codes[key]:
            return False
        self.codes[key] = now
        return True

    async def delete_mfa_factors(self, org: str, user_id: str) -> int:
        mine = [f for f in self.factors.values() if (f.org, f.user_id) == (org, user_id)]
        for f in mine:
            self._drop(f)
        return len(mine)


class Clock:
    def __init__(self) -> None:
        # Near real time (PyJWT checks iat and exp against it): the start of a TOTP step a few
        # steps back, so that tests may move on a few steps and stay in the past.
        now = datetime.now(UTC)
        self.now = now - timedelta(seconds=now.timestamp() % 30) - 4 * STEP

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def password_hash() -> bytes:
    return hash_password(PASSWORD)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def passwords() -> Iterator[PasswordChecks]:
    checks = PasswordChecks(workers=1)
    yield checks
    checks.close()


class World:
    def __init__(self, key: rsa.RSAPrivateKey, passwords: PasswordChecks, password_hash: bytes) -> None:
        self.clock = Clock()
        self.store = MemoryCredentials()
        self.audit = MemoryAudit()
        self.mfa_store = MemoryFactors()
        self.factors = SecondFactors(self.mfa_store, MasterKey.generate(), self.clock)
        for user_id, name, scopes in (("u1", "alice", ("jobs:write",)), ("u2", "root", ("org:admin",))):
            self.store.users[("acme", name)] = UserRecord(
                user_id, "acme", name, password_hash, scopes, self.clock.now
            )
        self.sessions = Sessions(
            self.store,
            AccessTokens(OneKey(key), "https://testhide.test"),
            Auditor(self.audit, b"k" * 32),
            LockoutPolicy(failures=2),
            clock=self.clock,
            passwords=passwords,
            factors=self.factors,
        )

    def user(self, name: str) -> UserRecord:
        return self.store.users[("acme", name)]

    async def enrolled(self, name: str) -> tuple[pyotp.TOTP, tuple[str, ...]]:
        """``name`` with a confirmed factor (confirmed one step ago); its TOTP and recovery codes."""
        enrollment = await self.sessions.enroll_mfa("acme", name, PASSWORD, "", PEER)
        totp = pyotp.TOTP(enrollment.secret)
        self.clock.now -= STEP
        await self.sessions.confirm_mfa("acme", name, PASSWORD, totp.at(self.clock.now), PEER)
        self.clock.now += STEP
        return totp, enrollment.recovery_codes

    async def amr(self, access_token: str) -> tuple[str, ...]:
        return (await self.sessions.authenticate(f"Bearer {access_token}", PEER)).amr


def other_than(code: str) -> str:
    """A well-formed code that is not ``code``."""
    return f"{(int(code) + 1) % 1_000_000:06d}"


@pytest.fixture
def world(signing_key: rsa.RSAPrivateKey, passwords: PasswordChecks, password_hash: bytes) -> World:
    return World(signing_key, passwords, password_hash)


# The factor itself ------------------------------------------------------------------------------------------


async def test_enrolling_seals_the_secret_and_makes_ten_distinct_recovery_codes(world: World) -> None:
    enrollment = await world.factors.enroll(world.user("alice"))

    uri = urlsplit(enrollment.otpauth_uri)
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert uri.path == "/testhide:alice%40acme"
    assert parse_qs(uri.query)["secret"] == [enrollment.secret]
    assert parse_qs(uri.query)["issuer"] == ["testhide"]
    assert len(enrollment.secret) == 32  # 160 bits, base32
    assert len(set(enrollment.recovery_codes)) == 10
    assert all(len(c) == 19 and c.count("-") == 3 for c in enrollment.recovery_codes)
    (stored,) = world.mfa_store.factors.values()
    assert stored.confirmed_at is None
    assert enrollment.secret.encode() not in stored.sealed_secret + stored.data_key
    assert not any(
        c.replace("-", "").encode() in h for _, h in world.mfa_store.codes for c in enrollment.recovery_codes
    )


async def test_a_code_is_accepted_once_and_never_after_a_later_one(world: World) -> None:
    totp, _ = await world.enrolled("alice")
    factor = await world.factors.confirmed(world.user("alice"))
    assert factor is not None
    now = world.clock.now

    assert await world.factors.accept_totp(factor, totp.at(now))
    factor = await world.factors.confirmed(world.user("alice"))
    assert factor is not None
    assert not await world.factors.accept_totp(factor, totp.at(now))  # replayed
    assert not await world.factors.accept_totp(factor, totp.at(now - STEP))  # older than the one accepted
    world.clock.now += STEP
    assert await world.factors.accept_totp(factor, totp.at(world.clock.now))


async def test_one_step_of_clock_skew_is_allowed_and_two_are_not(world: World) -> None:
    totp, _ = await world.enrolled("alice")
    world.clock.now += 10 * STEP
    factor = await world.factors.confirmed(world.user("alice"))
    assert factor is not None
    now = world.clock.now

    assert not await world.factors.accept_totp(factor, totp.at(now - 2 * STEP))
    assert not await world.factors.accept_totp(factor, totp.at(now + 2 * STEP))
    assert await world.factors.accept_totp(factor, totp.at(now + STEP))  # the phone runs fast


@pytest.mark.parametrize(
    "garbage", ["", "12345", "1234567", "abcdef", "\uff11\uff12\uff13\uff14\uff15\uff16", "12 34 5x"]
)
async def test_malformed_codes_are_simply_wrong(world: World, garbage: str) -> None:
    await world.enrolled("alice")
    factor = await world.factors.confirmed(world.user("alice"))
    assert factor is not None
    assert not await world.factors.accept_totp(factor, garbage)
    assert not await world.factors.spend_recovery_code(factor, garbage)


async def test_a_recovery_code_works_once_however_it_is_typed(world: World) -> None:
    _, codes = await world.enrolled("alice")
    factor = await world.factors.confirmed(world.user("alice"))
    assert factor is not None

    assert await world.factors.spend_recovery_code(factor, f"  {codes[0].upper().replace('-', ' ')} ")
    assert not await world.factors.spend_recovery_code(factor, codes[0])
    assert await world.factors.spend_recovery_code(factor, codes[1])


async def test_a_pending_factor_and_its_codes_do_nothing_until_confirmed(world: World) -> None:
    totp, old_codes = await world.enrolled("alice")
    replacement = await world.sessions.enroll_mfa("acme", "alice", PASSWORD, totp.at(world.clock.now), PEER)
    new_totp = pyotp.TOTP(replacement.secret)

    active = await world.factors.confirmed(world.user("alice"))
    assert active is not None
    assert not await world.factors.spend_recovery_code(active, replacement.recovery_codes[0])
    assert not await world.factors.confirm(world.user("alice"), other_than(new_totp.at(world.clock.now)))
    world.clock.now += STEP
    assert await world.factors.confirm(world.user("alice"), new_totp.at(world.clock.now))

    active = await world.factors.confirmed(world.user("alice"))
    assert active is not None
    assert not await world.factors.spend_recovery_code(active, old_codes[2])  # the old factor's codes went
    assert await world.factors.spend_recovery_code(active, replacement.recovery_codes[2])


async def test_confirming_without_an_enrollment_says_what_to_do(world: World) -> None:
    with pytest.raises(FailedPrecondition, match="run 'testhide mfa enroll' first"):
        await world.sessions.confirm_mfa("acme", "alice", PASSWORD, "123456", PEER)


# Logins -----------------------------------------------------------------------------------------------


async def test_a_user_without_a_factor_logs_in_with_the_password_alone(world: World) -> None:
    pair = await world.sessions.login_password("acme", "alice", PASSWORD, PEER)
    assert await world.amr(pair.access_token) == AMR_PASSWORD


async def test_an_admin_without_a_factor_is_told_to_enroll_but_only_with_the_right_password(
    world: World,
) -> None:
    with pytest.raises(Unauthenticated, match=INVALID):
        await world.sessions.login_password("acme", "root", "Wrong-Horse-7", PEER)
    with pytest.raises(FailedPrecondition) as refused:
        await world.sessions.login_password("acme", "root", PASSWORD, PEER)
    assert str(refused.value) == (
        "user root holds an admin scope and must enroll a second factor first:"
        " run 'testhide mfa enroll --server HOST:PORT --org acme --user root'"
    )
    assert world.store.refresh == {}


async def test_with_a_factor_the_code_is_required_and_recorded_in_the_tokens(world: World) -> None:
    totp, _ = await world.enrolled("root")

    with pytest.raises(Unauthenticated, match=INVALID):  # a wrong password says nothing of the factor
        await world.sessions.login_password("acme", "root", "Wrong-Horse-7", PEER)
    world.clock.now += 2 * STEP  # past that failure's backoff
    with pytest.raises(Unauthenticated) as missing:
        await world.sessions.login_password("acme", "root", PASSWORD, PEER)
    assert str(missing.value) == SECOND_FACTOR_REQUIRED

    pair = await world.sessions.login_password(
        "acme", "root", PASSWORD, PEER, totp_code=totp.at(world.clock.now)
    )
    assert await world.amr(pair.access_token) == AMR_TOTP
    refreshed = await world.sessions.refresh(pair.refresh_token, PEER)
    assert await world.amr(refreshed.access_token) == AMR_TOTP
    assert world.store.failures == []


async def test_a_recovery_code_logs_in_once_and_is_audited(world: World) -> None:
    _, codes = await world.enrolled("alice")
    pair = await world.sessions.login_password("acme", "alice", PASSWORD, PEER, recovery_code=codes[3])
    assert await world.amr(pair.access_token) == AMR_RECOVERY_CODE
    assert "mfa_recovery_code_used" in world.audit.actions()
    with pytest.raises(WrongCode):
        await world.sessions.login_password("acme", "alice", PASSWORD, PEER, recovery_code=codes[3])


async def test_wrong_codes_alone_lock_the_account(world: World) -> None:
    totp, _ = await world.enrolled("alice")
    good = totp.at(world.clock.now)
    wrong = other_than(good)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match=WRONG_CODE):
            await world.sessions.login_password("acme", "alice", PASSWORD, PEER, totp_code=wrong)
    assert [s for s, _ in world.store.failures] == ["user:acme/alice"] * 2
    assert world.audit.actions().count("login_failed") == 2

    with pytest.raises(RateLimited):
        await world.sessions.login_password("acme", "alice", PASSWORD, PEER, totp_code=good)


async def test_a_code_replayed_at_login_is_refused(world: World) -> None:
    totp, _ = await world.enrolled("alice")
    code = totp.at(world.clock.now)
    await world.sessions.login_password("acme", "alice", PASSWORD, PEER, totp_code=code)
    with pytest.raises(WrongCode):
        await world.sessions.login_password("acme", "alice", PASSWORD, PEER, totp_code=code)


async def test_replacing_a_factor_takes_a_current_code(world: World) -> None:
    totp, _ = await world.enrolled("alice")
    with pytest.raises(Unauthenticated, match="replacing it takes a current code"):
        await world.sessions.enroll_mfa("acme", "alice", PASSWORD, "", PEER)
    with pytest.raises(WrongCode):
        await world.sessions.enroll_mfa("acme", "alice", PASSWORD, totp.at(world.clock.now - 5 * STEP), PEER)
    assert world.audit.actions().count("mfa_enrolled") == 1
    await world.sessions.enroll_mfa("acme", "alice", PASSWORD, totp.at(world.clock.now), PEER)
    assert world.audit.actions().count("mfa_enrolled") == 2


async def test_a_password_only_session_of_a_user_made_admin_ends_at_its_refresh(world: World) -> None:
    pair = await world.sessions.login_password("acme", "alice", PASSWORD, PEER)
    world.store.users[("acme", "alice")] = replace(world.user("alice"), scopes=("org:admin",))
    with pytest.raises(Unauthenticated, match="without a second factor"):
        await world.sessions.refresh(pair.refresh_token, PEER)


async def test_without_second_factors_no_admin_may_log_in(
    signing_key: rsa.RSAPrivateKey, passwords: PasswordChecks, password_hash: bytes
) -> None:
    world = World(signing_key, passwords, password_hash)
    sessions = Sessions(
        world.store,
        AccessTokens(OneKey(signing_key), "https://testhide.test"),
        Auditor(world.audit, b"k" * 32),
        passwords=passwords,
    )
    with pytest.raises(FailedPrecondition):
        await sessions.login_password("acme", "root", PASSWORD, PEER)
    pair = await sessions.login_password("acme", "alice", PASSWORD, PEER)
    assert (await sessions.authenticate(f"Bearer {pair.access_token}", PEER)).amr == AMR_PASSWORD


async def test_api_key_tokens_carry_no_amr(world: World) -> None:
    from testhide.controlplane.auth.secrets import hash_secret, new_api_key
    from testhide.controlplane.store.base import ApiKeyRecord

    api_key, parsed = new_api_key()
    world.store.api_keys[parsed.key_id] = ApiKeyRecord(
        parsed.key_id, "acme", "ci", hash_secret(parsed.secret), ("org:admin",), world.clock.now
    )
    pair = await world.sessions.login_api_key(api_key, PEER)
    assert await world.amr(pair.access_token) == ()
