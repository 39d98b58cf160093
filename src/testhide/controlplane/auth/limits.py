"""Slowing guessers down: token buckets per principal and per client address,
exponential lockout after repeated failed logins, and an alert event when
failures spike. The clock is injected so tests need not sleep."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog

log = structlog.get_logger("testhide.auth")


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


class SpikeDetector:
    """Emits ``auth_failure_spike`` once per window when one address or one
    account fails authentication ``threshold`` times within ``window``."""

    def __init__(
        self,
        threshold: int = 20,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_spike: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self._threshold = threshold
        self._window = window_s
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._alerted: dict[str, float] = {}
        self._on_spike = on_spike

    def failure(self, kind: str, key: str) -> bool:
        now, name = self._clock(), f"{kind}:{key}"
        events = self._events.setdefault(name, deque())
        events.append(now)
        while events and events[0] < now - self._window:
            events.popleft()
        if len(events) >= self._threshold and now - self._alerted.get(name, -1e18) >= self._window:
            self._alerted[name] = now
            log.warning(
                "auth_failure_spike", kind=kind, subject=key, failures=len(events), window_s=self._window
            )
            if self._on_spike:
                self._on_spike(kind, key, len(events))
            return True
        return False
