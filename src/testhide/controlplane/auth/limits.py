"""Slowing guessers down: token buckets per principal and per client address,
exponential lockout after repeated failed logins, and an alert event when
failures spike. The clock is injected so tests need not sleep."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
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

    def _forget(self, now: float) -> None:
        while self._recent:
            oldest = next(iter(self._recent.values()))
            quiet = oldest.times[-1] < now - self._window if oldest.times else True
            if not quiet and len(self._recent) < self._max_subjects:
                return
            self._recent.popitem(last=False)
