"""Rate limits and failure spikes shared by replicas, without a database: the
choice between the shared and the local kind, what reaches the store, and the
fallback to this replica's own bucket or detector when the database fails
(limited, never unlimited, and said once a minute). The SQL itself is
tests/integration/test_pg_limits.py's."""

from __future__ import annotations

from datetime import timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from testhide.controlplane.auth import limits
from testhide.controlplane.auth.limits import (
    RateLimiter,
    SharedLimits,
    SharedRateLimiter,
    SharedSpikeDetector,
    SpikeDetector,
    rate_limiter,
    spike_detector,
)
from testhide.controlplane.errors import StorageUnavailable
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeShared:
    """Answers as the database would be told to; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.down = False
        self.takes: list[tuple[str, float, int]] = []
        self.failures: list[tuple[str, int, float]] = []
        self.wait = 0.0
        self.alert = False
        self.prunes = 0

    def _check(self) -> None:
        if self.down:
            raise StorageUnavailable("the control plane's database is unavailable (refused); try again")

    async def take_rate_token(self, key: str, rate_per_s: float, burst: int) -> float:
        self._check()
        self.takes.append((key, rate_per_s, burst))
        return self.wait

    async def count_auth_failure(self, subject: str, threshold: int, window_s: float) -> tuple[bool, int]:
        self._check()
        self.failures.append((subject, threshold, window_s))
        return self.alert, threshold

    async def prune_limits(self, idle: timedelta = timedelta(hours=1)) -> int:
        self._check()
        self.prunes += 1
        return 0


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    # A logger of its own: one cached before (another test configured logging) bypasses capture_logs.
    monkeypatch.setattr(limits, "log", structlog.get_logger("testhide.auth"))


def test_the_store_decides_which_kind() -> None:
    assert issubclass(PgStore, SharedLimits)
    assert not issubclass(SqliteStore, SharedLimits)
    shared: SharedLimits = FakeShared()
    assert isinstance(rate_limiter(shared, "address", 5.0, 10), SharedRateLimiter)
    assert isinstance(spike_detector(shared, 20), SharedSpikeDetector)
    local = object()  # a store that shares nothing: SQLite
    assert isinstance(rate_limiter(local, "address", 5.0, 10), RateLimiter)
    assert isinstance(spike_detector(local, 20), SpikeDetector)


async def test_the_local_limiter_acquires_as_it_takes() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 2, clock)
    assert [await limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 1.0]
    clock.now += 1
    assert await limiter.acquire("k") == 0.0


async def test_takes_go_to_the_store_under_their_scope() -> None:
    store = FakeShared()
    limiter = SharedRateLimiter(store, "principal", 5.0, 10, Clock())
    assert await limiter.acquire("api_key:k1") == 0.0
    store.wait = 0.2
    assert await limiter.acquire("api_key:k1") == 0.2  # the store's answer, as it is
    assert store.takes == [("principal:api_key:k1", 5.0, 10)] * 2


async def test_without_the_database_the_replicas_own_bucket_limits_and_says_so_once_a_minute() -> None:
    clock, store = Clock(), FakeShared()
    limiter = SharedRateLimiter(store, "address", 1.0, 3, clock)
    store.down = True
    with capture_logs() as events:
        waits = [await limiter.acquire("ipv4:203.0.113.9") for _ in range(5)]
    assert waits[:3] == [0.0] * 3  # the local bucket's burst...
    assert all(w > 0 for w in waits[3:])  # ...and not one more: never unlimited
    warnings = [e for e in events if e["event"] == "rate_limit_database_unavailable"]
    assert len(warnings) == 1, events
    assert warnings[0]["log_level"] == "warning"

    # Still down a while later: limited locally again, but not said again within the minute.
    clock.now += 10
    with capture_logs() as events:
        assert await limiter.acquire("ipv4:203.0.113.9") == 0.0  # ten seconds refilled it
    assert not [e for e in events if e["event"] == "rate_limit_database_unavailable"]
    clock.now += limits.FALLBACK_WARNING_EVERY_S
    with capture_logs() as events:
        await limiter.acquire("ipv4:203.0.113.9")
    assert [e["event"] for e in events].count("rate_limit_database_unavailable") == 1

    # Back: the database decides again once the retry delay has passed.
    store.down = False
    await limiter.acquire("ipv4:203.0.113.9")
    assert store.takes == []  # within DATABASE_RETRY_S of the last failure: not asked yet
    clock.now += limits.DATABASE_RETRY_S
    await limiter.acquire("ipv4:203.0.113.9")
    assert store.takes == [("address:ipv4:203.0.113.9", 1.0, 3)]


async def test_idle_buckets_are_pruned_now_and_then() -> None:
    clock, store = Clock(), FakeShared()
    limiter = SharedRateLimiter(store, "address", 100.0, 200, clock)
    for _ in range(10):
        await limiter.acquire("a")
    assert store.prunes == 0
    clock.now += limits.PRUNE_EVERY_S
    for _ in range(10):
        await limiter.acquire("a")
    assert store.prunes == 1


async def test_spikes_are_counted_by_the_store_and_the_alert_logged_by_the_replica_that_raised_it() -> None:
    store = FakeShared()
    detector = SharedSpikeDetector(store, threshold=3, window_s=60.0, clock=Clock())
    with capture_logs() as events:
        assert await detector.observe("ip", "203.0.113.9") is False
        store.alert = True
        assert await detector.observe("account", "user:acme/ada") is True
    assert store.failures == [("ip:203.0.113.9", 3, 60.0), ("account:user:acme/ada", 3, 60.0)]
    spikes = [e for e in events if e["event"] == "auth_failure_spike"]
    assert [(e["kind"], e["subject"]) for e in spikes] == [("account", "user:acme/ada")]


async def test_without_the_database_spikes_are_counted_by_the_replica_alone() -> None:
    clock, store = Clock(), FakeShared()
    detector = SharedSpikeDetector(store, threshold=3, window_s=60.0, clock=clock)
    store.down = True
    with capture_logs() as events:
        seen = [await detector.observe("ip", "203.0.113.9") for _ in range(4)]
    assert seen == [False, False, True, False]  # SpikeDetector's once-per-window alert
    assert [e["event"] for e in events].count("spike_database_unavailable") == 1


async def test_the_local_detector_observes_as_it_counts() -> None:
    detector = SpikeDetector(threshold=2, window_s=60.0, clock=Clock())
    assert [await detector.observe("ip", "x") for _ in range(3)] == [False, True, False]
