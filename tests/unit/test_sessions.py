"""controlplane/auth/sessions.py on an in-memory ``CredentialStore`` and
``AuditStore`` (tests/unit/fakes.py), with an injected clock: failed logins,
lockout, and refresh-token rotation with reuse detection."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.controlplane.auth.passwords import PasswordChecks, hash_password
from testhide.controlplane.auth.secrets import hash_secret, new_api_key
from testhide.controlplane.auth.sessions import INVALID, Sessions, TokenPair
from testhide.controlplane.auth.tokens import AccessTokens, SigningKeys
from testhide.controlplane.errors import RateLimited, Unauthenticated
from testhide.controlplane.store.base import ApiKeyRecord, UserRecord
from tests.unit.fakes import MemoryAudit, MemoryCredentials

PASSWORD = "Correct-Horse-7"
PEER = "ipv4:203.0.113.9:5000"


class OneKey(SigningKeys):
    """One RS256 key in memory instead of the data dir's sealed ones (nothing on
    disk to load, so the parent's constructor is not run)."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._private = {"k1": key}
        self.active = "k1"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)  # real time: PyJWT checks exp against it

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def password_hash() -> bytes:
    return hash_password(PASSWORD)


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
        self.store.users[("acme", "alice")] = UserRecord(
            "u1", "acme", "alice", password_hash, ("jobs:write",), self.clock.now
        )
        self.api_key, parsed = new_api_key()
        self.store.api_keys[parsed.key_id] = ApiKeyRecord(
            parsed.key_id, "acme", "ci", hash_secret(parsed.secret), ("jobs:read",), self.clock.now
        )
        self.key_id = parsed.key_id
        self.sessions = Sessions(
            self.store,
            AccessTokens(OneKey(key), "https://testhide.test"),
            Auditor(self.audit, b"k" * 32),
            LockoutPolicy(failures=2),
            clock=self.clock,
            passwords=passwords,
        )

    async def login(self) -> TokenPair:
        return await self.sessions.login_api_key(self.api_key, PEER)


@pytest.fixture
def world(signing_key: rsa.RSAPrivateKey, passwords: PasswordChecks, password_hash: bytes) -> World:
    return World(signing_key, passwords, password_hash)


async def test_a_wrong_password_counts_a_failure_and_reads_like_an_unknown_user(world: World) -> None:
    with pytest.raises(Unauthenticated) as wrong:
        await world.sessions.login_password("acme", "alice", "Wrong-Horse-7", PEER)
    with pytest.raises(Unauthenticated) as unknown:
        await world.sessions.login_password("acme", "mallory", PASSWORD, PEER)

    assert str(wrong.value) == str(unknown.value) == INVALID
    assert [s for s, _ in world.store.failures] == ["user:acme/alice", "user:acme/mallory"]
    assert len(world.store.address_failures_at["203.0.113.9"]) == 2
    assert world.audit.actions() == ["login_failed", "login_failed"]
    assert world.store.refresh == {}  # no session was opened


async def test_repeated_failures_lock_the_account_even_against_the_right_password(world: World) -> None:
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await world.sessions.login_password("acme", "alice", "Wrong-Horse-7", PEER)

    with pytest.raises(RateLimited) as locked:
        await world.sessions.login_password("acme", "alice", PASSWORD, PEER)
    assert locked.value.retry_after_s == pytest.approx(1.0)

    world.clock.now += timedelta(seconds=2)  # the first backoff has passed
    pair = await world.sessions.login_password("acme", "alice", PASSWORD, PEER)
    principal = await world.sessions.authenticate(f"Bearer {pair.access_token}", PEER)
    assert (principal.kind, principal.id, principal.org) == ("user", "u1", "acme")
    assert world.store.failures == []  # a successful login clears the account's failures
    assert world.audit.actions()[-1] == "login"


async def test_refresh_rotates_and_a_reused_token_revokes_the_whole_session(world: World) -> None:
    first = await world.login()
    second = await world.sessions.refresh(first.refresh_token, PEER)
    assert second.refresh_token != first.refresh_token
    assert (await world.sessions.authenticate(f"Bearer {second.access_token}", PEER)).id == world.key_id

    world.clock.now += timedelta(minutes=1)  # past the grace window for a lost reply
    with pytest.raises(Unauthenticated, match="reused: the whole session is revoked"):
        await world.sessions.refresh(first.refresh_token, PEER)

    assert world.audit.actions()[-1] == "refresh_token_reused"
    with pytest.raises(Unauthenticated, match="this session has ended"):
        await world.sessions.refresh(second.refresh_token, PEER)
    with pytest.raises(Unauthenticated, match="this session was revoked"):
        await world.sessions.authenticate(f"Bearer {second.access_token}", PEER)


async def test_a_refresh_repeated_within_the_grace_window_is_answered(world: World) -> None:
    first = await world.login()
    await world.sessions.refresh(first.refresh_token, PEER)
    world.clock.now += timedelta(seconds=5)  # the reply was lost; the client tries again

    again = await world.sessions.refresh(first.refresh_token, PEER)

    assert (await world.sessions.authenticate(f"Bearer {again.access_token}", PEER)).kind == "api_key"
    assert not await world.store.family_revoked(world.store.refresh[first.refresh_token[4:20]].family)


async def test_a_session_ends_at_the_next_refresh_once_its_api_key_is_revoked(world: World) -> None:
    pair = await world.login()
    record = world.store.api_keys[world.key_id]
    world.store.api_keys[world.key_id] = ApiKeyRecord(
        record.id,
        record.org,
        record.name,
        record.secret_hash,
        record.scopes,
        record.created_at,
        world.clock.now,
    )

    with pytest.raises(Unauthenticated, match="revoked or expired"):
        await world.sessions.refresh(pair.refresh_token, PEER)
    with pytest.raises(Unauthenticated) as again:
        await world.sessions.login_api_key(world.api_key, PEER)
    assert str(again.value) == INVALID


async def test_malformed_and_unknown_api_keys_are_refused_alike(world: World) -> None:
    unknown, parsed = new_api_key()
    for text in ("not-a-key", unknown):
        with pytest.raises(Unauthenticated) as refused:
            await world.sessions.login_api_key(text, PEER)
        assert str(refused.value) == INVALID

    assert [s for s, _ in world.store.failures] == ["api_key:malformed", f"api_key:{parsed.key_id}"]
    assert world.store.api_keys[world.key_id].last_used_at is None
