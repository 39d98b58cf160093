"""Rate limits and failure spikes in PostgreSQL (``store/pg_limits.py``), as
replicas share them: two stores on one database stand for two replicas. A
bucket hands out no more than ``burst + rate * elapsed`` tokens however the
two interleave their takes, and a spike split across them raises one alert
per window. Both drivers, asyncpg and psycopg."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

import pytest
from structlog.testing import capture_logs

from testhide.controlplane.auth.limits import SharedLimits, SharedRateLimiter, SharedSpikeDetector
from testhide.controlplane.store.pg_limits import LIMITS_IDLE
from testhide.controlplane.store.postgres import PgStore


def _through(url: str, driver: str) -> str:
    if driver == "asyncpg":
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(q for q in (parts.query, f"driver={driver}") if q)))


@pytest.fixture
async def replicas(pg_url: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[PgStore, PgStore]]:
    """Two stores on one fresh database, as two replicas have them."""
    driver = getattr(request, "param", "asyncpg")
    async with AsyncExitStack() as stack:
        stores = []
        for _ in range(2):
            store = await PgStore.open(_through(pg_url, driver))
            stack.push_async_callback(store.close)
            stores.append(store)
        yield stores[0], stores[1]


def _static(store: PgStore) -> SharedLimits:
    """Never called: mypy checks that the PostgreSQL store shares limits."""
    return store


# ---------------------------------------------------------------------- token buckets


@pytest.mark.parametrize("replicas", ["asyncpg", "psycopg"], indirect=True)
async def test_a_bucket_refills_at_its_rate_and_says_how_long_to_wait(
    replicas: tuple[PgStore, PgStore],
) -> None:
    a, b = replicas
    assert [await a.take_rate_token("k", 1.0, 3) for _ in range(3)] == [0.0] * 3
    wait = await b.take_rate_token("k", 1.0, 3)  # the other replica: the same bucket, empty
    assert 0 < wait <= 1.0
    await asyncio.sleep(wait + 0.05)  # as long as it was told
    assert await b.take_rate_token("k", 1.0, 3) == 0.0
    assert await a.take_rate_token("other", 1.0, 3) == 0.0  # buckets are per key


async def test_two_replicas_taking_at_once_never_hand_out_more_than_burst_plus_rate_times_elapsed(
    replicas: tuple[PgStore, PgStore],
) -> None:
    rate, burst, run_for = 50.0, 20, 1.0
    admitted = denied = 0
    waits: list[float] = []

    async def taker(store: PgStore, until: float) -> None:
        nonlocal admitted, denied
        while time.monotonic() < until:
            wait = await store.take_rate_token("principal:api_key:shared", rate, burst)
            if wait == 0:
                admitted += 1
            else:
                denied += 1
                waits.append(wait)

    started = time.monotonic()
    await asyncio.gather(*(taker(store, started + run_for) for store in replicas for _ in range(8)))
    elapsed = time.monotonic() - started

    assert admitted <= burst + rate * elapsed, (admitted, elapsed)
    assert admitted >= burst + rate * run_for / 2, (admitted, elapsed)  # and the budget is there to spend
    assert denied > 0
    assert all(0 < w <= 1 / rate for w in waits), max(waits)


async def test_a_limiter_of_each_replica_shares_the_budget(replicas: tuple[PgStore, PgStore]) -> None:
    a, b = (SharedRateLimiter(store, "principal", 1.0, 2) for store in replicas)
    assert [await a.acquire("user:u1"), await a.acquire("user:u1")] == [0.0, 0.0]
    assert await b.acquire("user:u1") > 0  # spent through the other replica
    assert await b.acquire("user:u2") == 0.0


# ---------------------------------------------------------------------- spikes


@pytest.mark.parametrize("replicas", ["asyncpg", "psycopg"], indirect=True)
async def test_a_spike_split_over_two_replicas_is_alerted_once(replicas: tuple[PgStore, PgStore]) -> None:
    a, b = replicas
    # In turns: the fifth failure, whichever replica sees it, raises the alert; no other does.
    seen = [await (a, b)[i % 2].count_auth_failure("ip:203.0.113.9", 5, 60.0) for i in range(12)]
    assert [alerted for alerted, _ in seen] == [False] * 4 + [True] + [False] * 7
    assert [failures for _, failures in seen] == [1, 2, 3, 4] + [5] * 8  # counted up to the threshold

    # All at once, on both: still one alert.
    subject = "account:user:acme/ada"
    at_once = await asyncio.gather(*(store.count_auth_failure(subject, 5, 60.0) for store in replicas * 10))
    assert sum(alerted for alerted, _ in at_once) == 1, at_once

    assert await a.count_auth_failure("ip:198.51.100.1", 5, 60.0) == (False, 1)  # per subject


async def test_a_spike_is_counted_within_its_window_and_alerted_once_per_window(
    replicas: tuple[PgStore, PgStore],
) -> None:
    a, b = replicas
    window = 1.0

    async def fail(store: PgStore, subject: str) -> bool:
        return (await store.count_auth_failure(subject, 3, window))[0]

    assert [await fail(a, "ip:x"), await fail(b, "ip:x"), await fail(a, "ip:x")] == [False, False, True]
    assert await fail(b, "ip:x") is False  # the same window: alerted already
    await asyncio.sleep(window + 0.1)
    assert [await fail(b, "ip:x"), await fail(a, "ip:x"), await fail(b, "ip:x")] == [False, False, True]

    # Three failures, but never three within one window: no alert.
    spread = []
    for store in (a, b, a):
        spread.append(await fail(store, "ip:y"))
        await asyncio.sleep(window / 2 + 0.05)
    assert spread == [False, False, False]


# ---------------------------------------------------------------------- pruning


async def test_rows_idle_for_an_hour_are_pruned_and_nothing_else(replicas: tuple[PgStore, PgStore]) -> None:
    a, b = replicas
    for key in ("idle", "busy"):
        await a.take_rate_token(key, 1.0, 1)
        await a.count_auth_failure(f"ip:{key}", 3, 60.0)
    await a._read(
        lambda c: c.execute(
            "UPDATE rate_buckets SET updated_at = now() - make_interval(secs => $1::float8)"
            " WHERE key = 'idle'",
            LIMITS_IDLE.total_seconds() + 1,
        )
    )
    await a._read(
        lambda c: c.execute(
            "UPDATE auth_spikes SET last_at = now() - make_interval(secs => $1::float8)"
            " WHERE subject = 'ip:idle'",
            LIMITS_IDLE.total_seconds() + 1,
        )
    )
    assert await b.prune_limits() == 2
    keys = {r["key"] for r in await a._fetch("SELECT key FROM rate_buckets")}
    subjects = {r["subject"] for r in await a._fetch("SELECT subject FROM auth_spikes")}
    assert (keys, subjects) == ({"busy"}, {"ip:busy"})
    assert await a.take_rate_token("idle", 1.0, 1) == 0.0  # a pruned bucket starts full
    assert await a.take_rate_token("busy", 1.0, 1) > 0


async def test_a_replica_that_loses_the_database_limits_on_its_own(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    limiter = SharedRateLimiter(store, "address", 1.0, 2)
    spikes = SharedSpikeDetector(store, threshold=2)
    assert await limiter.acquire("ipv4:203.0.113.9") == 0.0
    await store.close()  # what it has next of the database: StorageUnavailable
    with capture_logs() as events:
        waits = [await limiter.acquire("ipv4:203.0.113.9") for _ in range(3)]
        alerts = [await spikes.observe("ip", "203.0.113.9") for _ in range(2)]
    assert waits[:2] == [0.0, 0.0]  # its own, full bucket...
    assert waits[2] > 0  # ...limits: never unlimited
    assert alerts == [False, True]  # counted by this replica alone
    said = [e["event"] for e in events if e["log_level"] == "warning"]
    assert said.count("rate_limit_database_unavailable") == 1
    assert said.count("spike_database_unavailable") == 1
