"""The health service of both ports, following the store.

Each port answers gRPC health checks for "" and for every service it serves
(``testhide.v1.Jobs``, ...; ``rpc/server.py`` lists them). All of them say
SERVING while the store answers and NOT_SERVING while it does not: almost
every call needs the store, and a load balancer or an orchestrator should send
the work to a replica that has one. A cheap read probes it every second; only a
change is logged. Until the first probe, and from the start of a shutdown on,
every name says NOT_SERVING.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import timedelta
from typing import Protocol

import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from testhide.controlplane.errors import StorageUnavailable

log = structlog.get_logger("testhide.health")

PROBE_INTERVAL = timedelta(seconds=1)
# A store that takes this long to list the organisations is not serving (a lost network, a hung disk).
PROBE_TIMEOUT = timedelta(seconds=5)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ProbedStore(Protocol):
    """What the probe reads: a short list, from a table every install has."""

    async def list_orgs(self) -> list[str]: ...


class StoreHealth:
    """Health servicers, one per port, whose every name follows the store. ``run()`` probes
    until cancelled; ``probe()`` once (``start()`` does, before it reports the daemon started)."""

    def __init__(
        self,
        store: ProbedStore,
        interval: timedelta = PROBE_INTERVAL,
        timeout: timedelta = PROBE_TIMEOUT,
    ) -> None:
        self._store = store
        self._interval_s = interval.total_seconds()
        self._timeout_s = timeout.total_seconds()
        self._servicers: list[tuple[health_aio.HealthServicer, tuple[str, ...]]] = []
        self.serving: bool | None = None
        """The last probe's finding; None before the first."""

    async def servicer(self, services: Iterable[str]) -> health_aio.HealthServicer:
        """A health servicer for one port, answering for "" and ``services``."""
        servicer = health_aio.HealthServicer()
        names = ("", *services)
        for name in names:
            await servicer.set(name, SERVING if self.serving else NOT_SERVING)
        self._servicers.append((servicer, names))
        return servicer

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.probe()

    async def probe(self) -> bool:
        """Reads from the store and sets every name accordingly; whether it answered."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._store.list_orgs()
        except StorageUnavailable as exc:
            await self._change(False, str(exc))
        except TimeoutError:
            await self._change(False, f"the store did not answer within {self._timeout_s:g} s")
        except Exception as exc:  # not a known outage: the traceback, once, for whoever investigates
            if self.serving is not False:
                log.error("store_probe_failed", exc_info=exc)
            await self._change(False, f"the store failed: {type(exc).__name__}")
        else:
            await self._change(True, "")
        return bool(self.serving)

    async def shutting_down(self) -> None:
        """Every name NOT_SERVING from now on, whatever the store does: stop sending work here."""
        for servicer, _ in self._servicers:
            await servicer.enter_graceful_shutdown()

    async def _change(self, serving: bool, reason: str) -> None:
        if serving == self.serving:
            return
        first = self.serving is None
        self.serving = serving
        status = SERVING if serving else NOT_SERVING
        for servicer, names in self._servicers:
            for name in names:
                await servicer.set(name, status)
        if not serving:
            log.warning("store_unavailable", reason=reason, health="NOT_SERVING")
        elif not first:
            log.info("store_available", health="SERVING")
