"""Every call of the store timed, whichever the backend: a slow one logged (a warning,
metrics or not), each one observed by the store-call histogram when metrics are on
(``metrics.py``, which alone imports prometheus_client, and only when metrics are on)."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from testhide.controlplane.metrics import ControlPlaneMetrics

log = structlog.get_logger("testhide.metrics")

T = TypeVar("T")

SLOW_STORE_CALL_S = 0.25
"""A store call that takes longer is logged as ``store_call_slow`` (a warning)."""
SLOW_STORE_CALL_REPEAT_S = 60.0
"""At most one such warning per call name in this long; the next counts the slow calls left out."""
LONG_STORE_CALLS = frozenset({"listen", "snapshot"})
"""Never slow: LISTEN lasts as long as its connection, a snapshot copies the whole database."""


def time_store_calls(store: object, metrics: ControlPlaneMetrics | None = None) -> None:
    """Time every call of the store's interface, whichever the backend: each public
    coroutine method is shadowed, on this instance only, by a timed one. A slow call
    is logged, metrics or not; with ``metrics``, every call is observed too."""
    histogram = metrics._store_calls if metrics is not None else None
    for name in dir(type(store)):
        if name.startswith("_") or isinstance(getattr(type(store), name, None), property):
            continue
        method = getattr(store, name)
        if inspect.iscoroutinefunction(method):
            setattr(store, name, _timed(method, histogram, name))


class _SlowCalls:
    """One call name's slow calls: the first is logged, then at most one every
    ``SLOW_STORE_CALL_REPEAT_S`` (a database that is slow for everyone would otherwise
    write a line per call)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logged_at = -math.inf
        self._unlogged = 0

    def seen(self, took_s: float, failed: bool) -> None:
        now = time.monotonic()
        if now - self._logged_at < SLOW_STORE_CALL_REPEAT_S:
            self._unlogged += 1
            return
        log.warning(
            "store_call_slow",
            call=self._name,
            took_s=round(took_s, 3),
            threshold_s=SLOW_STORE_CALL_S,
            failed=failed,
            unlogged_since_last=self._unlogged,
        )
        self._logged_at, self._unlogged = now, 0


def _timed(
    call: Callable[..., Awaitable[T]], histogram: Histogram | None, name: str
) -> Callable[..., Awaitable[T]]:
    observe: Callable[[float], None] | None = None
    slow = None if name in LONG_STORE_CALLS else _SlowCalls(name)

    async def timed(*args: Any, **kwargs: Any) -> T:
        nonlocal observe
        started = time.perf_counter()
        failed = True
        try:
            result = await call(*args, **kwargs)
            failed = False
            return result
        finally:
            took_s = time.perf_counter() - started
            if histogram is not None:
                if observe is None:  # a series only for calls that happen
                    observe = histogram.labels(name).observe
                observe(took_s)
            if slow is not None and took_s > SLOW_STORE_CALL_S:
                slow.seen(took_s, failed)

    return timed
