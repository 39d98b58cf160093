"""Slowing guessers down: token buckets per principal and per client address,
exponential lockout after repeated failed logins, and an alert event when
failures spike. The clock is injected so tests need not sleep.

One control plane keeps its buckets and spike counts in memory
(``RateLimiter``, ``SpikeDetector``). Replicas on one PostgreSQL database
share them through the store (``SharedRateLimiter``, ``SharedSpikeDetector``
over ``store/pg_limits.py``): a budget spent through one replica is spent on
all, a spike split across them is seen. Should the database fail, each
replica falls back to its own bucket or detector, and says so: limited per
replica, never unlimited. ``rate_limiter`` and ``spike_detector`` choose by
what the store can do. The lockout counters are in the store either way."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

import structlog

from testhide.controlplane.errors import StorageUnavailable

log = structlog.get_logger("testhide.auth")

FALLBACK_WARNING_EVERY_S = 60.0
"""A replica limiting on its own because the database failed says so at most this often."""
DATABASE_RETRY_S = 1.0
"""After the database failed, requests are limited locally this long before it is tried again."""
PRUNE_EVERY_S = 600.0
"""How often each shared limiter prunes the buckets and spike counts idle for an hour."""


class Limiter(Protocol):
    async def acquire(self, key: str) -> float:
        """Takes a token for ``key``: 0 when admitted, else the seconds to wait."""
        ...


class FailureSpikes(Protocol):
    async def observe(self, kind: str, key: str) -> bool:
        """One failed authentication of ``key`` (``kind``: ``ip`` or ``account``);
        true when it raises the alert of the window."""
        ...


@runtime_checkable
class SharedLimits(Protocol):
    """What a store shared by replicas offers (``store/pg_limits.py``)."""

    async def take_rate_token(self, key: str, rate_per_s: float, burst: int) -> float: ...
    async def count_auth_failure(self, subject: str, threshold: int, window_s: float) -> tuple[bool, int]: ...
    async def prune_limits(self, idle: timedelta = ...) -> int: ...


class _Fallback:
    """Notes that the database failed; warns at most once per ``every_s``."""

    def __init__(
        self, event: str, clock: Callable[[], float], every_s: float = FALLBACK_WARNING_EVERY_S
    ) -> None:
        self._event = event
        self._clock = clock
        self._every = every_s
        self._warned_at = -math.inf
        self.retry_at = -math.inf

    def failed(self, exc: StorageUnavailable, **fields: object) -> None:
        now = self._clock()
        self.retry_at = now + DATABASE_RETRY_S
        if now - self._warned_at >= self._every:
            self._warned_at = now
            log.warning(self._event, error=str(exc), note="limited by this replica alone", **fields)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by any string; ``take`` returns 0 or the seconds to wait."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.clear()  # a flood of distinct keys must not grow memory without bound
            bucket = self._buckets[key] = _Bucket(float(self._burst), now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate

    async def acquire(self, key: str) -> float:
        return self.take(key)


class SharedRateLimiter:
    """Token buckets in the store, one budget across replicas: keys are kept as
    ``scope:key``, so limiters of different scopes share the table, not buckets.
    When the database cannot be reached, the replica's own bucket for the key
    decides (a warning at most once a minute), for ``DATABASE_RETRY_S`` before
    the database is tried again. Every ``PRUNE_EVERY_S`` one take also prunes
    what has been idle for an hour (``prune_limits``)."""

    def __init__(
        self,
        store: SharedLimits,
        scope: str,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._scope = scope
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._local = RateLimiter(rate_per_s, burst, clock)
        self._fallback = _Fallback("rate_limit_database_unavailable", clock)
        self._prune_at = clock() + PRUNE_EVERY_S

    async def acquire(self, key: str) -> float:
        now = self._clock()
        if now >= self._fallback.retry_at:
            try:
                wait = await self._store.take_rate_token(f"{self._scope}:{key}", self._rate, self._burst)
            except StorageUnavailable as exc:
                self._fallback.failed(exc, scope=self._scope)
            else:
                if now >= self._prune_at:
                    self._prune_at = now + PRUNE_EVERY_S
                    await self._prune()
                return wait
        return self._local.take(key)

    async def _prune(self) -> None:
        try:
            pruned = await self._store.prune_limits()
        except StorageUnavailable as exc:
            log.warning("rate_limit_prune_failed", error=str(exc))
        else:
            log.debug("rate_limits_pruned", rows=pruned)


@dataclass(frozen=True)
class LockoutPolicy:
    failures: int = 5
    window: timedelta = timedelta(minutes=15)
    first_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(minutes=15)

    def delay(self, failures: int) -> timedelta:
        """How long after the last failure the next attempt must wait."""
        if failures < self.failures:
            return timedelta(0)
        factor: int = 2 ** (failures - self.failures)  # never a fraction: failures >= self.failures
        return min(self.max_delay, self.first_delay * factor)


# Failed logins from one client address (all accounts together) before backoff:
# spraying one password over many accounts, or many keys, from one place.
DEFAULT_ADDRESS_LOCKOUT = LockoutPolicy(failures=20)


def client_network(peer: str) -> str:
    """What a per-address failure budget counts, from a gRPC peer string:
    ``ipv4:203.0.113.9:5000`` -> ``203.0.113.9``; an IPv6 address by its /64
    (a single host is routinely given a whole /64), an IPv4-mapped one as IPv4.
    Anything else (a Unix socket) as it is, without the port."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


@dataclass
class _RecentFailures:
    times: deque[float]
    alerted_at: float = -math.inf


class SpikeDetector:
    """Emits ``auth_failure_spike`` once per window when one address or one
    account fails authentication ``threshold`` times within ``window``.

    Bounded, because every failed subject is chosen by the caller: a subject
    quiet for a whole window is forgotten, each keeps at most ``threshold``
    timestamps, and beyond ``max_subjects`` the least recently failed go first."""

    def __init__(
        self,
        threshold: int = 20,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_spike: Callable[[str, str, int], None] | None = None,
        max_subjects: int = 10_000,
    ) -> None:
        self._threshold = max(1, threshold)
        self._window = window_s
        self._clock = clock
        self._max_subjects = max_subjects
        # Least recently failed first: forgetting starts at the front.
        self._recent: OrderedDict[str, _RecentFailures] = OrderedDict()
        self._on_spike = on_spike

    def __len__(self) -> int:
        """Subjects remembered now."""
        return len(self._recent)

    def failure(self, kind: str, key: str) -> bool:
        now, name = self._clock(), f"{kind}:{key}"
        self._forget(now)
        recent = self._recent.get(name)
        if recent is None:
            recent = self._recent[name] = _RecentFailures(deque(maxlen=self._threshold))
        self._recent.move_to_end(name)
        events = recent.times
        events.append(now)
        while events and events[0] < now - self._window:
            events.popleft()
        if len(events) >= self._threshold and now - recent.alerted_at >= self._window:
            recent.alerted_at = now
            log.warning(
                "auth_failure_spike", kind=kind, subject=key, failures=len(events), window_s=self._window
            )
            if self._on_spike:
                self._on_spike(kind, key, len(events))
            return True
        return False

    async def observe(self, kind: str, key: str) -> bool:
        return self.failure(kind, key)

    def _forget(self, now: float) -> None:
        while self._recent:
            oldest = next(iter(self._recent.values()))
            quiet = oldest.times[-1] < now - self._window if oldest.times else True
            if not quiet and len(self._recent) < self._max_subjects:
                return
            self._recent.popitem(last=False)


class SharedSpikeDetector:
    """``SpikeDetector``'s alert, counted in the store across replicas: the same
    threshold and window, the alert raised once per window by whichever
    replica's failure reaches the threshold. When the database cannot be
    reached, this replica's own detector counts (a warning at most once a
    minute): a spike split across replicas then goes unseen until it is back."""

    def __init__(
        self,
        store: SharedLimits,
        threshold: int = 20,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._threshold = max(1, threshold)
        self._window = window_s
        self._clock = clock
        self._local = SpikeDetector(threshold, window_s, clock)
        self._fallback = _Fallback("spike_database_unavailable", clock)

    async def observe(self, kind: str, key: str) -> bool:
        if self._clock() < self._fallback.retry_at:
            return self._local.failure(kind, key)
        try:
            alerted, failures = await self._store.count_auth_failure(
                f"{kind}:{key}", self._threshold, self._window
            )
        except StorageUnavailable as exc:
            self._fallback.failed(exc)
            return self._local.failure(kind, key)
        if alerted:
            log.warning(
                "auth_failure_spike", kind=kind, subject=key, failures=failures, window_s=self._window
            )
        return alerted


def rate_limiter(store: object, scope: str, rate_per_s: float, burst: int) -> Limiter:
    """Shared by the replicas when the store can share it (PostgreSQL); else this process's own."""
    if isinstance(store, SharedLimits):
        return SharedRateLimiter(store, scope, rate_per_s, burst)
    return RateLimiter(rate_per_s, burst)


def spike_detector(store: object, threshold: int) -> FailureSpikes:
    """Counted across replicas when the store can share it (PostgreSQL); else in this process."""
    if isinstance(store, SharedLimits):
        return SharedSpikeDetector(store, threshold)
    return SpikeDetector(threshold)
