"""What the agent measures for Prometheus (``testhide-agent run
--metrics-listen``), and its ``/healthz``.

Gauges are read from the agent at scrape time, on its event loop (running
jobs, the spool, the connection, the certificate); counters count events (the
container engine not answering, renewals). The port serves plain HTTP on a
loopback address only: anywhere else the operator names its certificate. The
agent's own certificate is no candidate: it names the agent to the control
plane (a SPIFFE URI, client authentication), not a host a scraper could check.

``/healthz`` answers 200 while the agent's loop runs and it is connected or
trying to connect (draining included), 503 once it stops or when its loop has
not answered within two seconds; the body is a short JSON object."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from testhide.agent.errors import ConfigError
from testhide.common.metrics_http import LoopCollector, MetricsListener, new_registry
from testhide.common.metrics_tls import certificate_files, choose_certificate

if TYPE_CHECKING:
    from testhide.agent.daemon import Agent


class AgentMetrics:
    """The registry, the hooks the agent calls as things happen, and ``listen()``."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self._engine_errors = Counter(
            "testhide_agent_container_engine_errors",
            "Calls to the container engine that found it not answering (no jobs are taken until it does).",
            registry=self.registry,
        )
        self._renewals = Counter(
            "testhide_agent_certificate_renewals", "This agent's certificate renewed.", registry=self.registry
        )

    def engine_error(self) -> None:
        self._engine_errors.inc()

    def certificate_renewed(self) -> None:
        self._renewals.inc()

    async def listen(self, agent: Agent) -> MetricsListener:
        config = agent.config
        assert config.metrics_listen is not None
        named = None
        if config.metrics_cert is not None and config.metrics_key is not None:
            named = certificate_files(config.metrics_cert, config.metrics_key)
        try:
            certificate = choose_certificate(config.metrics_listen, named, None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.registry.register(LoopCollector(asyncio.get_running_loop(), lambda: _collect(agent)))
        listener = MetricsListener(config.metrics_listen, self.registry, certificate, lambda: _health(agent))
        try:
            await listener.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from exc
        return listener


async def _collect(agent: Agent) -> list[Metric]:
    expires = agent.credentials.certificate.not_valid_after_utc
    return [
        GaugeMetricFamily(
            "testhide_agent_running_jobs",
            "Jobs whose container the agent runs (or sets up, or cleans up).",
            value=len(agent.executing()),
        ),
        GaugeMetricFamily(
            "testhide_agent_max_jobs", "Jobs the agent runs at once.", value=agent.config.max_jobs
        ),
        GaugeMetricFamily(
            "testhide_agent_connected",
            "1 while the agent's stream to a control plane is open.",
            value=int(agent.connected),
        ),
        GaugeMetricFamily(
            "testhide_agent_accepting_jobs",
            "1 while the agent takes new jobs (0: draining, or its container engine is not answering).",
            value=int(agent.accepting()),
        ),
        GaugeMetricFamily(
            "testhide_agent_container_engine_up",
            "0 while the container engine is not answering.",
            value=int(not agent.runtime_down),
        ),
        GaugeMetricFamily(
            "testhide_agent_spool_bytes",
            "Job output waiting for the control plane in the spool (on disk, or in memory: a bounded"
            " share while connected, and what the disk refuses).",
            value=agent.outbox.spooled_bytes,
        ),
        GaugeMetricFamily(
            "testhide_agent_certificate_expiry_seconds",
            "Until the agent's certificate expires (it renews at half its lifetime).",
            value=(expires - datetime.now(UTC)).total_seconds(),
        ),
    ]


async def _health(agent: Agent) -> tuple[bool, Mapping[str, object]]:
    if not agent.running:
        return False, {"status": "stopped"}
    return True, {
        "status": "ok",
        "connected": agent.connected,
        "accepting_jobs": agent.accepting(),
        "draining": agent.draining.is_set(),
        "running_jobs": len(agent.executing()),
    }
