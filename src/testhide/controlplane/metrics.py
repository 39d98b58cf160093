"""What the control plane measures for Prometheus (``serve --metrics-listen``).

One registry per daemon (tests run several in one process). Each figure is
taken where it cannot drift:

- read at scrape time, on the event loop: jobs by status and the queue from the
  store (the same on every replica: they share the database), the agents
  connected to this replica and their certificates, this control plane's own
  certificates;
- histograms observed as jobs move (pickup, queue wait, duration) and around
  every call of the store's interface, on SQLite and PostgreSQL alike;
- counters of events: log bytes received, renewals, enrollments,
  authentication failures, rate-limited calls;
- the scheduled backups' outcome (``BackupMetrics``), only where backups are scheduled.

Labels are bounded: org and pool (operators create them), a store call's name,
an API method (only methods the server serves reach the interceptor that
counts them). Never a job id or an agent id. The names are listed in the README.

The store's job counts are one grouped query over an index; they are taken at
most every ``JOB_COUNTS_MAX_AGE_S``, however many scrapers ask."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter as Tally
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from testhide.common.metrics_http import LoopCollector, MetricsListener, new_registry
from testhide.common.metrics_tls import ServingCertificate, certificate_files, choose_certificate
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.jobs.model import Job, JobStatus

if TYPE_CHECKING:
    from testhide.controlplane.ca.trust import CertificateState
    from testhide.controlplane.config import ControlPlaneConfig
    from testhide.controlplane.jobs.scheduler import Scheduler

log = structlog.get_logger("testhide.metrics")

T = TypeVar("T")

JOB_COUNTS_MAX_AGE_S = 5.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
ENROLL_METHOD = "/testhide.v1.Enrollment/Enroll"

# The same SQL on both backends; the jobs_queue index (org, pool, status, id) covers the first.
_JOB_COUNTS = "SELECT org, pool, status, COUNT(*) AS jobs FROM jobs GROUP BY org, pool, status"
_OLDEST_QUEUED = (
    "SELECT org, pool, MIN(created_at) AS oldest FROM jobs WHERE status = 'QUEUED' GROUP BY org, pool"
)


class ControlPlaneMetrics:
    """The registry, the hooks the control plane's parts call as things happen,
    and ``listen()``, which opens the metrics port."""

    def __init__(self, job_counts_max_age_s: float = JOB_COUNTS_MAX_AGE_S) -> None:
        self.registry = registry = new_registry()
        pool = ["org", "pool"]
        self._pickup = Histogram(
            "testhide_job_pickup_seconds",
            "From a job's submission to its first assignment to an agent.",
            pool,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "testhide_job_queue_wait_seconds",
            "From a job's submission to its start on an agent (RUNNING), requeues included.",
            pool,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._duration = Histogram(
            "testhide_job_duration_seconds",
            "From a job's start to the result its agent reported.",
            pool,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._log_bytes = Counter(
            "testhide_log_bytes_received",
            "Bytes of job output received from agents (a batch replayed after a reconnect counts again).",
            pool,
            registry=registry,
        )
        self._renewals = Counter(
            "testhide_agents_certificate_renewals", "Agent certificates renewed.", registry=registry
        )
        self._enrollments = Counter(
            "testhide_agents_enrollments",
            "Enrollment requests by outcome: enrolled, or refused (a bad token or request, a rate limit).",
            ["outcome"],
            registry=registry,
        )
        self._auth_failures = Counter(
            "testhide_auth_failures",
            "Failed authentications: API calls answered UNAUTHENTICATED (port=api); agent streams and"
            " calls refused an expired, untrusted, unknown or revoked certificate (port=agent).",
            ["port"],
            registry=registry,
        )
        self._rate_limited = Counter(
            "testhide_rate_limited_calls",
            "API calls refused with RESOURCE_EXHAUSTED (rate limits, login backoff, a full password queue).",
            ["method"],
            registry=registry,
        )
        self._store_calls = Histogram(
            "testhide_store_call_seconds",
            "Calls of the store (SQLite or PostgreSQL), by name, failed ones included.",
            ["call"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        for outcome in ("enrolled", "refused"):
            self._enrollments.labels(outcome)
        for port in ("api", "agent"):
            self._auth_failures.labels(port)
        self._job_counts_max_age_s = job_counts_max_age_s
        self._counted_at = -math.inf
        self._counting = asyncio.Lock()
        self._counts: list[tuple[str, str, str, int]] = []
        self._oldest: dict[tuple[str, str], datetime] = {}

    # hooks --------------------------------------------------------------------------
    def job_assigned(self, job: Job, now: datetime) -> None:
        if job.epoch == 1:  # a requeued job's next assignment is no pickup
            self._pickup.labels(job.org, job.spec.pool).observe(_seconds(job.created_at, now))

    def job_started(self, job: Job) -> None:
        if job.started_at is not None:
            self._queue_wait.labels(job.org, job.spec.pool).observe(_seconds(job.created_at, job.started_at))

    def job_finished(self, job: Job) -> None:
        if job.started_at is not None and job.finished_at is not None:
            self._duration.labels(job.org, job.spec.pool).observe(_seconds(job.started_at, job.finished_at))

    def log_received(self, org: str, pool: str, size: int) -> None:
        self._log_bytes.labels(org, pool).inc(size)

    def certificate_renewed(self) -> None:
        self._renewals.inc()

    def agent_refused(self) -> None:
        """The agent port refused a certificate (the handshake let it through)."""
        self._auth_failures.labels("agent").inc()

    def api_call_ended(self, method: str, code: grpc.StatusCode | None) -> None:
        """Every API-port call, as it ends (``code`` None: OK)."""
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._rate_limited.labels(method).inc()
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            self._auth_failures.labels("api").inc()
        if method == ENROLL_METHOD:
            enrolled = code is None or code is grpc.StatusCode.OK
            self._enrollments.labels("enrolled" if enrolled else "refused").inc()

    def backup_metrics(self) -> BackupMetrics:
        """The scheduled backups' figures, registered now: a control plane without
        ``--backup-every`` has none, so an alert on their age cannot fire there."""
        return BackupMetrics(self.registry)

    # the port ---------------------------------------------------------------------------
    async def listen(
        self, config: ControlPlaneConfig, scheduler: Scheduler, store: object, certs: CertificateState
    ) -> MetricsListener:
        """Serve the registry on ``config.metrics_listen``: plain HTTP on loopback; elsewhere
        TLS with the named certificate or else the server certificate, as it rotates."""
        assert config.metrics_listen is not None
        named = None
        if config.metrics_cert is not None and config.metrics_key is not None:
            named = certificate_files(config.metrics_cert, config.metrics_key)

        def server_certificate() -> ServingCertificate:
            material = certs.current
            return ServingCertificate(material.server_chain_pem, material.server_key_pem)

        certificate = choose_certificate(config.metrics_listen, named, server_certificate)
        loop = asyncio.get_running_loop()
        self.registry.register(LoopCollector(loop, lambda: self._collect(scheduler, store, certs)))
        listener = MetricsListener(config.metrics_listen, self.registry, certificate)
        try:
            await listener.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from exc
        return listener

    async def _collect(self, scheduler: Scheduler, store: object, certs: CertificateState) -> list[Metric]:
        now = datetime.now(UTC)
        families = _certificate_families(certs, now)
        try:
            families += await self._job_families(store, now)
        except Exception as exc:  # the database away: the rest is still worth serving
            log.warning("metrics_job_counts_failed", error=str(exc))
        # A pool with jobs and no agent here shows 0 connected, rather than nothing.
        with_jobs = {(org, pool) for org, pool, _, _ in self._counts}
        return families + _agent_families(scheduler, now, with_jobs)

    async def _job_families(self, store: object, now: datetime) -> list[Metric]:
        async with self._counting:  # concurrent scrapes share one query
            if time.monotonic() - self._counted_at >= self._job_counts_max_age_s:
                counts = await _rows(store, _JOB_COUNTS)
                queued = await _rows(store, _OLDEST_QUEUED)
                self._counts = [(r["org"], r["pool"], r["status"], int(r["jobs"])) for r in counts]
                self._oldest = {(r["org"], r["pool"]): _timestamp(r["oldest"]) for r in queued}
                self._counted_at = time.monotonic()
        by_status = {(org, pool, status): n for org, pool, status, n in self._counts}
        pools = sorted({(org, pool) for org, pool, _, _ in self._counts})
        jobs = GaugeMetricFamily(
            "testhide_jobs",
            "Jobs in the store by status (the shared database's: the same on every replica).",
            labels=["org", "pool", "status"],
        )
        depth = GaugeMetricFamily(
            "testhide_queue_depth", "Jobs waiting for an agent.", labels=["org", "pool"]
        )
        age = GaugeMetricFamily(
            "testhide_queue_oldest_job_age_seconds",
            "Since the submission of the oldest job waiting for an agent (0: none waits).",
            labels=["org", "pool"],
        )
        for org, pool in pools:
            for status in JobStatus:
                jobs.add_metric([org, pool, status.value], by_status.get((org, pool, status.value), 0))
            depth.add_metric([org, pool], by_status.get((org, pool, JobStatus.QUEUED.value), 0))
            oldest = self._oldest.get((org, pool))
            age.add_metric([org, pool], _seconds(oldest, now) if oldest is not None else 0.0)
        return [jobs, depth, age]


class BackupMetrics:
    """What ``serve --backup-every`` did: when the last backup succeeded, how long it
    took and how large it was, and how many attempts failed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._last_success = Gauge(
            "testhide_backup_last_success_timestamp_seconds",
            "When the last scheduled backup was written (Unix time; 0: none yet since serve started).",
            registry=registry,
        )
        self._failures = Counter(
            "testhide_backup_failures",
            "Scheduled backups that failed (each is logged as backup_failed with its reason, and retried).",
            registry=registry,
        )
        self._duration = Gauge(
            "testhide_backup_duration_seconds",
            "How long the last successful scheduled backup took.",
            registry=registry,
        )
        self._size = Gauge(
            "testhide_backup_size_bytes", "Size of the last successful scheduled backup.", registry=registry
        )

    def succeeded(self, finished_at: datetime, seconds: float, size: int) -> None:
        self._last_success.set(finished_at.timestamp())
        self._duration.set(seconds)
        self._size.set(size)

    def failed(self) -> None:
        self._failures.inc()


def _agent_families(scheduler: Scheduler, now: datetime, pools: set[tuple[str, str]]) -> list[Metric]:
    connected: Tally[tuple[str, str]] = Tally()
    soonest: dict[tuple[str, str], datetime] = {}
    for session in scheduler.sessions():
        if session.closed.is_set():
            continue
        pool = (session.identity.org, session.identity.pool)
        connected[pool] += 1
        if pool not in soonest or session.cert_not_after < soonest[pool]:
            soonest[pool] = session.cert_not_after
    agents = GaugeMetricFamily(
        "testhide_agents_connected", "Agents with an open stream to this replica.", labels=["org", "pool"]
    )
    expiry = GaugeMetricFamily(
        "testhide_agents_certificate_expiry_seconds",
        "Until the soonest-expiring certificate of the pool's agents connected here expires"
        " (agents renew at half their certificate's lifetime).",
        labels=["org", "pool"],
    )
    for pool in sorted(pools | connected.keys()):
        agents.add_metric(list(pool), connected[pool])
    for pool in sorted(soonest):
        expiry.add_metric(list(pool), (soonest[pool] - now).total_seconds())
    return [agents, expiry]


def _certificate_families(certs: CertificateState, now: datetime) -> list[Metric]:
    material = certs.current
    server = material.server_certificate.not_valid_after_utc
    ca = material.active_ca.certificate.not_valid_after_utc
    return [
        GaugeMetricFamily(
            "testhide_server_certificate_expiry_seconds",
            "Until the server certificate expires (rotated automatically with a third of its lifetime left).",
            value=(server - now).total_seconds(),
        ),
        GaugeMetricFamily(
            "testhide_ca_certificate_expiry_seconds",
            "Until the active agent CA's certificate expires.",
            value=(ca - now).total_seconds(),
        ),
    ]


async def _rows(store: object, sql: str) -> list[Any]:
    """``sql`` on either backend, through its own query helper (a read, no parameters)."""
    from testhide.controlplane.store.postgres import PgStore
    from testhide.controlplane.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return list(await store._query(sql))
    if isinstance(store, PgStore):
        return list(await store._fetch(sql))
    raise TypeError(f"no job counts from a {type(store).__name__}")


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def _timestamp(value: datetime | str) -> datetime:
    """SQLite keeps times as ISO text, PostgreSQL as timestamptz."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value
