"""The second-factor store methods on SQLite and on PostgreSQL (``SecondFactorStore``):
one pending and one confirmed factor per user, a time step accepted once, a
recovery code spent once and only for a confirmed factor, confirming replacing
the factor before, reset, the sessions' amr, master-key rotation re-wrapping a
factor's data key so that its secret still opens, and a move to PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pyotp
import pytest

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.mfa import SecondFactors
from testhide.controlplane.masterkey import rewrap_data_keys
from testhide.controlplane.store.base import MfaFactorRecord, RefreshRecord, Store, UserRecord
from testhide.controlplane.store.pg_copy import SqliteSnapshot, copy_store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore
from tests.integration.test_store import NOW, POSTGRES, SQLITE, empty_store, populate


@pytest.fixture(params=[SQLITE, POSTGRES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        for user_id, name in (("u1", "ada"), ("u2", "bob")):
            await s.create_user(UserRecord(user_id, "acme", name, b"hash", ("jobs:read",), NOW))
        yield s


def factor(factor_id: str, user_id: str = "u1") -> MfaFactorRecord:
    return MfaFactorRecord(factor_id, "acme", user_id, b"wrapped-" + factor_id.encode(), b"sealed", NOW)


async def test_a_pending_factor_is_replaced_and_confirmed(store: Store) -> None:
    await store.create_mfa_factor(factor("m1"), [b"c1", b"c2"])
    await store.create_mfa_factor(factor("m2"), [b"c3"])  # m1 was pending: it goes
    await store.create_mfa_factor(factor("m9", "u2"), [b"c9"])  # another user's stays

    assert await store.mfa_factor("acme", "u1", confirmed=True) is None
    pending = await store.mfa_factor("acme", "u1", confirmed=False)
    assert pending is not None
    assert (pending.id, pending.data_key, pending.sealed_secret) == ("m2", b"wrapped-m2", b"sealed")
    assert not await store.confirm_mfa_factor("m1", 5, NOW)
    assert await store.confirm_mfa_factor("m2", 5, NOW)
    assert not await store.confirm_mfa_factor("m2", 6, NOW)  # no longer pending

    active = await store.mfa_factor("acme", "u1", confirmed=True)
    assert active is not None
    assert (active.id, active.confirmed_at, active.last_step) == ("m2", NOW, 5)
    assert await store.mfa_factor("acme", "u1", confirmed=False) is None
    assert (await store.mfa_factor("acme", "u2", confirmed=False)) is not None
    assert await store.mfa_factor("other", "u1", confirmed=True) is None  # scoped by organisation


async def test_confirming_replaces_the_factor_before_and_its_codes(store: Store) -> None:
    await store.create_mfa_factor(factor("m1"), [b"old"])
    assert await store.confirm_mfa_factor("m1", 1, NOW)
    await store.create_mfa_factor(factor("m2"), [b"new"])

    assert not await store.spend_recovery_code("m2", b"new", NOW)  # pending: its codes do nothing yet
    assert await store.confirm_mfa_factor("m2", 2, NOW + timedelta(seconds=30))
    active = await store.mfa_factor("acme", "u1", confirmed=True)
    assert active is not None
    assert active.id == "m2"
    assert not await store.spend_recovery_code("m1", b"old", NOW)
    assert await store.spend_recovery_code("m2", b"new", NOW)


async def test_a_step_is_accepted_once_and_a_code_spent_once(store: Store) -> None:
    await store.create_mfa_factor(factor("m1"), [b"c1", b"c2"])
    assert await store.confirm_mfa_factor("m1", 10, NOW)

    assert not await store.accept_mfa_step("m1", 10)
    assert not await store.accept_mfa_step("m1", 9)
    assert await store.accept_mfa_step("m1", 11)
    assert not await store.accept_mfa_step("m1", 11)
    assert not await store.accept_mfa_step("nope", 99)

    assert await store.spend_recovery_code("m1", b"c1", NOW)
    assert not await store.spend_recovery_code("m1", b"c1", NOW)
    assert not await store.spend_recovery_code("m1", b"unknown", NOW)
    assert await store.spend_recovery_code("m1", b"c2", NOW)


async def test_reset_removes_pending_and_confirmed(store: Store) -> None:
    await store.create_mfa_factor(factor("m1"), [b"c1"])
    assert await store.confirm_mfa_factor("m1", 1, NOW)
    await store.create_mfa_factor(factor("m2"), [b"c2"])

    assert await store.delete_mfa_factors("acme", "u1") == 2
    assert await store.mfa_factor("acme", "u1", confirmed=True) is None
    assert await store.mfa_factor("acme", "u1", confirmed=False) is None
    assert not await store.spend_recovery_code("m1", b"c1", NOW)
    assert await store.delete_mfa_factors("acme", "u1") == 0


async def test_a_session_keeps_its_amr(store: Store) -> None:
    record = RefreshRecord(
        "t1", "f1", "acme", "user", "u1", ("jobs:read",), b"h", NOW, NOW, amr=("pwd", "mfa", "otp")
    )
    await store.create_refresh_token(record)
    await store.create_refresh_token(RefreshRecord("t2", "f2", "acme", "api_key", "k1", (), b"h", NOW, NOW))
    spent = await store.spend_refresh_token("t1", NOW)
    assert spent is not None
    assert spent[0].amr == ("pwd", "mfa", "otp")
    other = await store.spend_refresh_token("t2", NOW)
    assert other is not None
    assert other[0].amr == ()


async def test_master_key_rotation_rewraps_a_factor_and_its_secret_still_opens(store: Store) -> None:
    master = MasterKey.generate()
    user = UserRecord("u1", "acme", "ada", b"hash", ("jobs:read",), NOW)
    enrollment = await SecondFactors(store, master, lambda: NOW).enroll(user)
    code = pyotp.TOTP(enrollment.secret).at(NOW)

    rotated = master.with_new_current()
    sweep = await rewrap_data_keys(store, rotated)
    assert sweep.changed == 1
    assert sweep.damaged == ()
    pending = await store.mfa_factor("acme", "u1", confirmed=False)
    assert pending is not None
    assert rotated.is_current(pending.data_key)
    assert await SecondFactors(store, rotated.only_current(), lambda: NOW).confirm(user, code)


async def test_a_factor_moves_to_postgresql_with_the_store(tmp_path: Path, pg_url: str) -> None:
    """``migrate-store`` copies factors and codes as they are: the secret still opens, a
    spent code stays spent, the step accepted stays accepted."""
    master = MasterKey.generate()
    user = UserRecord("u1", "acme", "ada", b"hash", ("jobs:read",), NOW)
    sqlite = await SqliteStore.open(tmp_path / "testhide.db")
    try:
        await populate(sqlite)
        await sqlite.create_user(user)
        factors = SecondFactors(sqlite, master, lambda: NOW)
        enrollment = await factors.enroll(user)
        totp = pyotp.TOTP(enrollment.secret)
        assert await factors.confirm(user, totp.at(NOW))
        active = await factors.confirmed(user)
        assert active is not None
        assert await factors.spend_recovery_code(active, enrollment.recovery_codes[0])
    finally:
        await sqlite.close()

    snapshot, postgres = await SqliteSnapshot.open(tmp_path / "testhide.db"), await PgStore.open(pg_url)
    try:
        copied = await copy_store(snapshot, postgres)
        assert (copied["mfa_factors"], copied["mfa_recovery_codes"]) == (1, 10)
        factors = SecondFactors(postgres, master, lambda: NOW)
        active = await factors.confirmed(user)
        assert active is not None
        assert not await factors.accept_totp(active, totp.at(NOW))  # accepted before the move
        assert await factors.accept_totp(active, totp.at(NOW + timedelta(seconds=30)))
        assert not await factors.spend_recovery_code(active, enrollment.recovery_codes[0])
        assert await factors.spend_recovery_code(active, enrollment.recovery_codes[1])
    finally:
        await snapshot.close()
        await postgres.close()
