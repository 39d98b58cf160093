"""The metrics ports' decisions and hooks, without a socket: which address may
be plain HTTP, which certificate is served where, what the TLS context offers,
what each hook counts, the store timer, the collection on the event loop.
tests/integration/test_metrics.py scrapes the real ports."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from testhide.agent import metrics as agent_metrics
from testhide.agent.config import AgentConfig
from testhide.agent.errors import ConfigError as AgentConfigError
from testhide.common.identity import AgentIdentity
from testhide.common.metrics_http import LoopCollector
from testhide.common.metrics_tls import (
    ServingCertificate,
    check_metrics_options,
    choose_certificate,
    is_loopback,
    tls_context,
)
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus
from testhide.controlplane.jobs.scheduler import AgentSession, Scheduler
from testhide.controlplane.metrics import ENROLL_METHOD, ControlPlaneMetrics
from testhide.controlplane.store_timing import time_store_calls
from tests.unit.fakes import MemoryJobs

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
CERT, KEY = Path("metrics.pem"), Path("metrics.key")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),  # all of 127.0.0.0/8 is the machine's own
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),  # every interface
        ("::", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("metrics.example.com", False),  # never resolved: a name may point anywhere
        ("localhost.example.com", False),
    ],
)
def test_only_loopback_addresses_may_be_plain(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_options_are_checked_together() -> None:
    check_metrics_options(None, None, None, own_certificate=False)
    check_metrics_options("127.0.0.1:9100", None, None, own_certificate=False)
    check_metrics_options("0.0.0.0:9100", None, None, own_certificate=True)
    check_metrics_options("0.0.0.0:9100", CERT, KEY, own_certificate=False)
    with pytest.raises(ValueError, match="together"):
        check_metrics_options("127.0.0.1:9100", CERT, None, own_certificate=True)
    with pytest.raises(ValueError, match="needs a metrics port"):
        check_metrics_options(None, CERT, KEY, own_certificate=True)
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_metrics_options("9100", None, None, own_certificate=True)
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:9100 is not a loopback address, so it serves TLS only"):
        check_metrics_options("0.0.0.0:9100", None, None, own_certificate=False)


def test_an_agent_away_from_loopback_needs_a_named_certificate(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="--metrics-cert, --metrics-key"):
        AgentConfig(data_dir=tmp_path, metrics_listen="0.0.0.0:9100")
    AgentConfig(data_dir=tmp_path, metrics_listen="0.0.0.0:9100", metrics_cert=CERT, metrics_key=KEY)
    AgentConfig(data_dir=tmp_path, metrics_listen="127.0.0.1:9100")
    # The control plane has its server certificate to fall back on.
    ControlPlaneConfig(data_dir=tmp_path, metrics_listen="0.0.0.0:9100")


def test_which_certificate_is_served_where() -> None:
    def named() -> ServingCertificate:
        return ServingCertificate(b"named", b"")

    def own() -> ServingCertificate:
        return ServingCertificate(b"own", b"")

    assert choose_certificate("127.0.0.1:0", None, own) is None
    assert choose_certificate("127.0.0.1:0", named, own) is named  # named: TLS on loopback too
    assert choose_certificate("0.0.0.0:0", None, own) is own
    assert choose_certificate("[::]:0", named, own) is named
    with pytest.raises(ValueError, match="serves TLS only"):
        choose_certificate("0.0.0.0:0", None, None)


def certificate() -> ServingCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metrics")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
        .not_valid_after(datetime.now(UTC) + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServingCertificate(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def test_the_tls_context_offers_tls12_and_up_with_aead_suites_only() -> None:
    context = tls_context(certificate())
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    suites = context.get_ciphers()
    assert suites
    for suite in suites:
        if suite["protocol"] == "TLSv1.3":
            continue
        assert suite["aead"], suite["name"]
        assert suite["kea"] == "kx-ecdhe", suite["name"]


def test_a_key_that_is_no_pem_key_is_refused() -> None:
    with pytest.raises(ssl.SSLError, match="not an unencrypted PEM private key"):
        tls_context(replace(certificate(), key_pem=b"not a key"))


def registry_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def job(epoch: int = 1, started_at: datetime | None = None, finished_at: datetime | None = None) -> Job:
    spec = JobSpec(image="busybox", command=("true",), pool="gpu")
    return Job(
        "j1",
        "acme",
        spec,
        JobStatus.ASSIGNED,
        START,
        epoch=epoch,
        started_at=started_at,
        finished_at=finished_at,
    )


def test_job_timings_go_to_their_pool() -> None:
    metrics = ControlPlaneMetrics()
    pool = {"org": "acme", "pool": "gpu"}
    metrics.job_assigned(job(), START + timedelta(seconds=2))
    metrics.job_assigned(job(epoch=3), START + timedelta(seconds=50))  # requeued: no pickup
    metrics.job_started(job(started_at=START + timedelta(seconds=3)))
    metrics.job_finished(
        job(started_at=START + timedelta(seconds=3), finished_at=START + timedelta(seconds=13))
    )
    metrics.job_finished(job(finished_at=START))  # never started: no duration
    registry = metrics.registry
    assert registry_value(registry, "testhide_job_pickup_seconds_count", **pool) == 1
    assert registry_value(registry, "testhide_job_pickup_seconds_sum", **pool) == 2
    assert registry_value(registry, "testhide_job_queue_wait_seconds_sum", **pool) == 3
    assert registry_value(registry, "testhide_job_duration_seconds_count", **pool) == 1
    assert registry_value(registry, "testhide_job_duration_seconds_sum", **pool) == 10


def test_what_each_api_answer_counts() -> None:
    metrics = ControlPlaneMetrics()
    metrics.api_call_ended("/testhide.v1.Jobs/List", None)
    metrics.api_call_ended("/testhide.v1.Jobs/List", grpc.StatusCode.RESOURCE_EXHAUSTED)
    metrics.api_call_ended("/testhide.v1.Auth/Login", grpc.StatusCode.RESOURCE_EXHAUSTED)
    metrics.api_call_ended("/testhide.v1.Auth/Login", grpc.StatusCode.UNAUTHENTICATED)
    metrics.api_call_ended("/testhide.v1.Jobs/Get", grpc.StatusCode.PERMISSION_DENIED)  # authorization
    metrics.api_call_ended(ENROLL_METHOD, None)
    metrics.api_call_ended(ENROLL_METHOD, grpc.StatusCode.UNAUTHENTICATED)  # a bad token
    metrics.api_call_ended(ENROLL_METHOD, grpc.StatusCode.INVALID_ARGUMENT)
    metrics.agent_refused()
    metrics.certificate_renewed()
    metrics.log_received("acme", "gpu", 100)
    registry = metrics.registry
    limited = "testhide_rate_limited_calls_total"
    assert registry_value(registry, limited, method="/testhide.v1.Jobs/List") == 1
    assert registry_value(registry, limited, method="/testhide.v1.Auth/Login") == 1
    assert registry_value(registry, "testhide_auth_failures_total", port="api") == 2
    assert registry_value(registry, "testhide_auth_failures_total", port="agent") == 1
    assert registry_value(registry, "testhide_agents_enrollments_total", outcome="enrolled") == 1
    assert registry_value(registry, "testhide_agents_enrollments_total", outcome="refused") == 2
    assert registry_value(registry, "testhide_agents_certificate_renewals_total") == 1
    assert registry_value(registry, "testhide_log_bytes_received_total", org="acme", pool="gpu") == 100


class Backend:
    """Stands for a store: coroutine methods, a property, a plain method, a private helper."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def driver(self) -> str:
        return "fake"

    def plain(self) -> int:
        return 1

    async def _tx(self) -> None:
        self.calls += 1

    async def get_job(self, org: str) -> str:
        await self._tx()
        return org

    async def fail(self) -> None:
        raise LookupError("gone")


async def test_every_store_call_is_timed_by_name_and_still_behaves() -> None:
    metrics, store = ControlPlaneMetrics(), Backend()
    time_store_calls(store, metrics)
    assert await store.get_job("acme") == "acme"
    assert await store.get_job("acme") == "acme"
    with pytest.raises(LookupError, match="gone"):
        await store.fail()
    assert store.plain() == 1
    assert store.driver == "fake"
    assert isinstance(store, Backend)
    registry = metrics.registry
    assert registry_value(registry, "testhide_store_call_seconds_count", call="get_job") == 2
    assert registry_value(registry, "testhide_store_call_seconds_count", call="fail") == 1
    assert registry.get_sample_value("testhide_store_call_seconds_count", {"call": "_tx"}) is None
    # A series only for calls that happened: a store's hundred methods are not a thousand zeros.
    assert registry.get_sample_value("testhide_store_call_seconds_count", {"call": "plain"}) is None


async def test_pickup_is_observed_when_the_scheduler_assigns() -> None:
    store, metrics = MemoryJobs(), ControlPlaneMetrics()
    scheduler = Scheduler(store, metrics=metrics)
    spec = JobSpec(image="busybox", command=("true",))
    store.jobs["j1"] = Job("j1", "acme", spec, JobStatus.QUEUED, datetime.now(UTC))
    identity = AgentIdentity("td", "acme", "default", "a1")
    session = AgentSession(identity, 1, START, "ca")
    dispatcher = asyncio.create_task(scheduler.run())
    try:
        scheduler.attach(session)
        async with asyncio.timeout(5):
            await session.outbox.get()
    finally:
        dispatcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dispatcher
    labels = {"org": "acme", "pool": "default"}
    assert registry_value(metrics.registry, "testhide_job_pickup_seconds_count", **labels) == 1


async def test_families_are_collected_on_the_loop_from_another_thread() -> None:
    loop = asyncio.get_running_loop()
    seen: list[asyncio.AbstractEventLoop] = []

    async def families() -> list[Metric]:
        seen.append(asyncio.get_running_loop())
        return [GaugeMetricFamily("testhide_probe", "a probe", value=1)]

    async def broken() -> list[Metric]:
        raise RuntimeError("the store is away")

    collected = await asyncio.to_thread(lambda: list(LoopCollector(loop, families).collect()))
    assert [family.name for family in collected] == ["testhide_probe"]
    assert seen == [loop]
    # A failure costs these families, not the scrape.
    assert await asyncio.to_thread(lambda: list(LoopCollector(loop, broken).collect())) == []


async def test_agent_health_follows_its_run() -> None:
    stopped = SimpleNamespace(running=False)
    assert await agent_metrics._health(cast(Any, stopped)) == (False, {"status": "stopped"})
    trying = SimpleNamespace(
        running=True,
        connected=False,
        accepting=lambda: True,
        draining=asyncio.Event(),
        executing=lambda: ["j1"],
    )
    healthy, facts = await agent_metrics._health(cast(Any, trying))
    assert healthy  # not connected, but trying: a control plane away is no reason to restart the agent
    assert facts == {
        "status": "ok",
        "connected": False,
        "accepting_jobs": True,
        "draining": False,
        "running_jobs": 1,
    }
