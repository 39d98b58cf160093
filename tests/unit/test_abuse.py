"""Abuse of the API by its own callers, without a socket: the bcrypt pool, the
per-address failure budget in the store, the bounded alert detector, log
watches that leave with their follower, and operator commands that name an
organisation that does not exist."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import bcrypt
import pytest
from click.testing import CliRunner

from testhide.controlplane.auth import passwords
from testhide.controlplane.auth.limits import SpikeDetector, client_network
from testhide.controlplane.auth.passwords import PasswordChecks
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.datadir import initialise
from testhide.controlplane.errors import ConfigError, RateLimited
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.store.sqlite import SqliteStore

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
WINDOW = timedelta(minutes=15)


class Gate:
    """Stands in for bcrypt: each check waits until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started = threading.Semaphore(0)

    def check(self, password: bytes, hashed: bytes) -> bool:
        self.started.release()
        assert self.open.wait(30), "the test never opened the gate"
        return password == b"right"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    monkeypatch.setattr(bcrypt, "checkpw", gate.check)
    monkeypatch.setattr(passwords, "_dummy_hash", lambda: b"dummy")
    return gate


# -------------------------------------------------------------- bcrypt off the loop


async def test_a_login_flood_is_refused_at_once_beyond_the_bcrypt_pool_and_the_loop_runs_on(
    gate: Gate,
) -> None:
    checks = PasswordChecks(workers=1, queue=2)
    try:
        admitted = [asyncio.ensure_future(checks.verify("guess", None)) for _ in range(3)]
        await asyncio.to_thread(gate.started.acquire)  # one runs, two wait
        assert checks.admitted == 3
        with pytest.raises(RateLimited) as refused:
            checks.require_room()
        assert "too many password logins" in str(refused.value)
        assert refused.value.retry_after_s >= 1
        with pytest.raises(RateLimited):
            await checks.verify("guess", b"hash")
        # The event loop is free while the checks hold their thread.
        ticks = 0
        for _ in range(100):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 100
        assert not any(f.done() for f in admitted)
        gate.open.set()
        assert await asyncio.gather(*admitted) == [False, False, False]
        assert checks.admitted == 0
        checks.require_room()
    finally:
        gate.open.set()
        checks.close()


async def test_a_cancelled_login_keeps_its_slot_until_its_check_ends(gate: Gate) -> None:
    checks = PasswordChecks(workers=1, queue=0)
    try:
        running = asyncio.ensure_future(checks.verify("right", b"hash"))
        await asyncio.to_thread(gate.started.acquire)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # The thread still works on it: a new login is refused, not queued behind it.
        with pytest.raises(RateLimited):
            checks.require_room()
        gate.open.set()
        # Its one thread runs work in order: once this has run, the cancelled check has ended.
        await asyncio.wrap_future(checks._executor.submit(lambda: None))
        assert checks.admitted == 0
        assert await checks.verify("right", b"hash") is True
    finally:
        gate.open.set()
        checks.close()


def test_bcrypt_releases_the_gil_while_it_checks() -> None:
    """Why threads are enough: while one thread is inside bcrypt, another runs Python.
    With a switch interval of minutes, a thread that kept the GIL would keep it to the end."""
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=passwords.ROUNDS))
    started, done = threading.Event(), threading.Event()

    def check() -> None:
        started.set()
        bcrypt.checkpw(b"y", hashed)
        done.set()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(300.0)
    try:
        worker = threading.Thread(target=check)
        worker.start()
        started.wait()
        assert not done.is_set(), "bcrypt held the GIL for its whole check"
        worker.join()
    finally:
        sys.setswitchinterval(previous)


async def test_password_hashing_and_checking_run_on_the_pool() -> None:
    checks = PasswordChecks(workers=2, queue=2)
    try:
        hashed = await checks.hash("Correct-Horse-42")
        results = await asyncio.gather(*(checks.verify(p, hashed) for p in ("Correct-Horse-42", "nope")))
        assert results == [True, False]
        assert await checks.verify("whoever", None) is False  # the dummy hash
    finally:
        checks.close()


def test_the_password_pool_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ControlPlaneConfig(data_dir=tmp_path, password_workers=0)
    with pytest.raises(ConfigError):
        ControlPlaneConfig(data_dir=tmp_path, password_queue=-1)
    config = ControlPlaneConfig(data_dir=tmp_path)
    assert config.password_workers >= 1
    assert config.address_lockout.failures == 20
    assert config.address_lockout.window == WINDOW


# -------------------------------------------------------------- failures per address


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "testhide.db")
    try:
        yield s
    finally:
        await s.close()


async def test_password_spraying_counts_per_address_until_it_is_quiet_for_a_window(
    store: SqliteStore,
) -> None:
    for i in range(1, 21):
        assert await store.record_address_failure("203.0.113.9", NOW + timedelta(seconds=i), WINDOW) == i
    assert await store.address_failures("203.0.113.9", NOW) == (20, NOW + timedelta(seconds=20))
    assert await store.address_failures("198.51.100.1", NOW) == (0, None)
    # Failures keep the count alive; a whole quiet window forgets it.
    later = NOW + timedelta(seconds=20) + WINDOW
    assert await store.record_address_failure("203.0.113.9", later, WINDOW) == 21
    much_later = later + WINDOW + timedelta(seconds=1)
    assert await store.address_failures("203.0.113.9", much_later - WINDOW) == (0, None)
    assert await store.record_address_failure("203.0.113.9", much_later, WINDOW) == 1


async def test_failures_from_many_addresses_are_pruned_once_quiet(store: SqliteStore, tmp_path: Path) -> None:
    for i in range(200):
        await store.record_address_failure(f"10.0.{i // 250}.{i % 250}", NOW, WINDOW)
    await store.record_address_failure("192.0.2.1", NOW + WINDOW + timedelta(seconds=1), WINDOW)
    with sqlite3.connect(tmp_path / "testhide.db") as db:
        rows = db.execute("SELECT address, failures FROM address_failures").fetchall()
    assert rows == [("192.0.2.1", 1)]


def test_addresses_are_counted_per_host_and_ipv6_per_64() -> None:
    assert client_network("ipv4:203.0.113.9:50000") == client_network("ipv4:203.0.113.9:50001")
    assert client_network("ipv6:[2001:db8:1:2::1]:443") == client_network("ipv6:[2001:db8:1:2:ffff::9]:80")
    assert client_network("ipv6:[2001:db8:1:2::1]:443") != client_network("ipv6:[2001:db8:1:3::1]:443")
    assert client_network("ipv6:[::ffff:203.0.113.9]:1") == client_network("ipv4:203.0.113.9:2")


# -------------------------------------------------------------- alerts stay bounded


def test_failures_for_many_distinct_subjects_do_not_grow_the_spike_detector_forever() -> None:
    now = [0.0]
    detector = SpikeDetector(threshold=3, window_s=60.0, clock=lambda: now[0], max_subjects=1000)
    for i in range(20_000):
        detector.failure("account", f"user:default/guess-{i}")
    assert len(detector) == 1000  # capped, least recently failed dropped first
    now[0] += 61.0
    detector.failure("ip", "203.0.113.9")
    assert len(detector) == 1  # a whole quiet window forgets them all
    # Alerts still work: three failures within the window, one alert per window.
    assert [detector.failure("account", "user:default/ada") for _ in range(4)] == [False, False, True, False]


# -------------------------------------------------------------- followers' watches


async def test_a_follower_that_goes_away_leaves_no_watch_behind() -> None:
    book = LogBook(cast(Any, None), cast(Any, None))
    woken = asyncio.Event()

    async def follower() -> None:
        with book.watch("j1") as watch:
            changed = watch.changed()
            await changed.wait()
            woken.set()
            await asyncio.Event().wait()  # then it hangs until cancelled

    followers = [asyncio.ensure_future(follower()) for _ in range(3)]
    await asyncio.sleep(0)
    assert book.watched_jobs == 1
    book.notify("j1")
    await woken.wait()
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    assert book.watched_jobs == 0
    book.notify("j1")  # nobody follows: nothing is made for it
    assert book.watched_jobs == 0


# -------------------------------------------------------------- operator commands


def test_api_keys_for_an_organisation_that_does_not_exist_are_refused(tmp_path: Path) -> None:
    from testhide.controlplane.cli import main

    data_dir = tmp_path / "cp"
    asyncio.run(initialise(data_dir, ["localhost"]))
    runner = CliRunner()
    args = ["api-keys", "create", "--data-dir", str(data_dir), "--name", "ci", "--org", "no-such-org"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "no organisation 'no-such-org'" in result.output
    assert "orgs create no-such-org" in result.output
    assert not isinstance(result.exception, sqlite3.Error), result.exception
    with sqlite3.connect(data_dir / "testhide.db") as db:
        assert db.execute("SELECT COUNT(*) FROM api_keys WHERE org = 'no-such-org'").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM audit_log WHERE org = 'no-such-org'").fetchone() == (0,)
    result = runner.invoke(
        main,
        ["users", "create", "--data-dir", str(data_dir), "--org", "no-such-org", "ada"],
        input="Correct-Horse-42\n",
    )
    assert result.exit_code == 1, result.output
    assert "no organisation 'no-such-org'" in result.output
