"""The metrics ports (``--metrics-listen``): both daemons scraped over real HTTP
and parsed with the Prometheus client's own parser after a real job; the agent's
``/healthz``; plain HTTP only on loopback, TLS with the named certificate or the
control plane's server certificate (following its rotation) otherwise.

No test sends anything beyond loopback. The choice "away from loopback, serve
TLS with the server certificate" is exercised on 127.0.0.1 by making the
loopback test say no; that test itself is checked in tests/unit/test_metrics.py."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import signal
import socket
import ssl
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from testhide.agent.credentials import new_key_and_csr
from testhide.agent.model import LogStream
from testhide.agent.runtime.base import ContainerSpec, OutputQueue
from testhide.agent.runtime.fake import FakeContainer, FakeRuntime, Script
from testhide.common import metrics_http, metrics_tls
from testhide.controlplane.datadir import initialise
from testhide.controlplane.jobs.model import JobSpec, JobStatus
from testhide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    REPO,
    RunningControlPlane,
    control_plane,
    eventually,
    in_status,
    operator,
    running_agent,
    wait_until,
)
from tests.integration.test_transport import agent_certificate, connect_with, our_ca

LOOPBACK = "127.0.0.1:0"
OUTPUT = b"hello from the job\n"

CONTROL_PLANE_FAMILIES = {
    "testhide_jobs",
    "testhide_queue_depth",
    "testhide_queue_oldest_job_age_seconds",
    "testhide_job_pickup_seconds",
    "testhide_job_queue_wait_seconds",
    "testhide_job_duration_seconds",
    "testhide_log_bytes_received",
    "testhide_agents_connected",
    "testhide_agents_certificate_expiry_seconds",
    "testhide_agents_certificate_renewals",
    "testhide_agents_enrollments",
    "testhide_server_certificate_expiry_seconds",
    "testhide_ca_certificate_expiry_seconds",
    "testhide_auth_failures",
    "testhide_rate_limited_calls",
    "testhide_store_call_seconds",
}
AGENT_FAMILIES = {
    "testhide_agent_running_jobs",
    "testhide_agent_max_jobs",
    "testhide_agent_connected",
    "testhide_agent_accepting_jobs",
    "testhide_agent_container_engine_up",
    "testhide_agent_container_engine_errors",
    "testhide_agent_spool_bytes",
    "testhide_agent_certificate_expiry_seconds",
    "testhide_agent_certificate_renewals",
}
COUNTERS = {
    "testhide_log_bytes_received",
    "testhide_agents_certificate_renewals",
    "testhide_agents_enrollments",
    "testhide_auth_failures",
    "testhide_rate_limited_calls",
    "testhide_agent_container_engine_errors",
    "testhide_agent_certificate_renewals",
}


class Talkative(FakeRuntime):
    """Every job prints a line, then exits 0."""

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> FakeContainer:
        self.scripts.setdefault(spec.job_id, Script(output=[(LogStream.STDOUT, OUTPUT)]))
        return await super().start(spec, output)


def fetch(port: int, path: str = "/metrics", tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """GET from 127.0.0.1 (http.client: no proxy from the environment applies)."""
    connection = (
        http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=10)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def scrape(port: int, tls: ssl.SSLContext | None = None) -> dict[str, Metric]:
    status, body = await asyncio.to_thread(fetch, port, "/metrics", tls)
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


async def scrape_counted(port: int, *counted: tuple[str, dict[str, str], float]) -> dict[str, Metric]:
    """A scrape once each sample (name, labels) has reached its count: what a call or a job's end
    counts is counted a moment after the client sees that end (an API call's done callback, a
    job's duration once its end has committed)."""

    def reached(served: dict[str, Metric]) -> bool:
        return all((found(served, name, **labels) or 0) >= count for name, labels, count in counted)

    async def scraped() -> dict[str, Metric] | None:
        served = await scrape(port)
        return served if reached(served) else None

    served: dict[str, Metric] = await eventually(scraped, 30, f"the counts {counted}")
    return served


def samples_of(families: dict[str, Metric], name: str) -> list[Any]:
    """The samples of the family of sample ``name`` (a family's own name, or one with a suffix)."""
    family = families.get(name.removesuffix("_total").removesuffix("_count").removesuffix("_sum"))
    return family.samples if family is not None else []


def found(families: dict[str, Metric], name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with these labels; None if it is not there."""
    for one in samples_of(families, name):
        if one.name == name and all(one.labels.get(k) == v for k, v in labels.items()):
            return float(one.value)
    return None


def sample(families: dict[str, Metric], name: str, **labels: str) -> float:
    value = found(families, name, **labels)
    assert value is not None, f"no sample {name} {labels} in {samples_of(families, name)}"
    return value


async def submit(cp: RunningControlPlane) -> str:
    assert cp.daemon.jobs is not None
    return (await cp.daemon.jobs.submit("default", JobSpec(image=JOB_IMAGE, command=("true",)))).id


async def test_both_daemons_are_scraped_after_a_job(tmp_path: Path) -> None:
    async with (
        control_plane(tmp_path, metrics_listen=LOOPBACK) as cp,
        running_agent(cp, tmp_path, Talkative(), metrics_listen=LOOPBACK) as agent,
    ):
        job_id = await submit(cp)
        await eventually(lambda: in_status(cp, job_id, JobStatus.SUCCEEDED), 30, "the job to succeed")

        served = await scrape_counted(cp.daemon.metrics_port, ("testhide_job_duration_seconds_count", {}, 1))
        assert set(served) >= CONTROL_PLANE_FAMILIES
        pool = {"org": "default", "pool": "default"}
        assert sample(served, "testhide_jobs", status="SUCCEEDED", **pool) == 1
        assert sample(served, "testhide_jobs", status="QUEUED", **pool) == 0
        assert sample(served, "testhide_queue_depth", **pool) == 0
        assert sample(served, "testhide_queue_oldest_job_age_seconds", **pool) == 0
        for histogram in ("pickup", "queue_wait", "duration"):
            assert sample(served, f"testhide_job_{histogram}_seconds_count", **pool) == 1
        assert 0 <= sample(served, "testhide_job_pickup_seconds_sum", **pool) < 30
        assert sample(served, "testhide_log_bytes_received_total", **pool) == len(OUTPUT)
        assert sample(served, "testhide_agents_connected", **pool) == 1
        assert 0 < sample(served, "testhide_agents_certificate_expiry_seconds", **pool) <= 3600
        assert sample(served, "testhide_agents_enrollments_total", outcome="enrolled") == 1
        assert sample(served, "testhide_server_certificate_expiry_seconds") > 0
        assert sample(served, "testhide_ca_certificate_expiry_seconds") > 0
        assert sample(served, "testhide_store_call_seconds_count", call="create_jobs") == 1
        assert sample(served, "testhide_store_call_seconds_count", call="assign_jobs") >= 1
        assert sample(served, "testhide_auth_failures_total", port="api") == 0

        own = await scrape(agent.metrics_port)
        assert set(own) >= AGENT_FAMILIES
        assert sample(own, "testhide_agent_connected") == 1
        assert sample(own, "testhide_agent_running_jobs") == 0
        assert sample(own, "testhide_agent_max_jobs") == 1
        assert sample(own, "testhide_agent_accepting_jobs") == 1
        assert sample(own, "testhide_agent_container_engine_up") == 1
        assert sample(own, "testhide_agent_container_engine_errors_total") == 0
        assert sample(own, "testhide_agent_spool_bytes") == 0
        assert 0 < sample(own, "testhide_agent_certificate_expiry_seconds") <= 3600

        status, body = await asyncio.to_thread(fetch, agent.metrics_port, "/healthz")
        assert status == 200
        assert json.loads(body) == {
            "status": "ok",
            "connected": True,
            "accepting_jobs": True,
            "draining": False,
            "running_jobs": 0,
        }
        assert (await asyncio.to_thread(fetch, cp.daemon.metrics_port, "/healthz"))[0] == 404
        assert (await asyncio.to_thread(fetch, agent.metrics_port, "/"))[0] == 404


def test_every_family_is_named_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for family in sorted(CONTROL_PLANE_FAMILIES | AGENT_FAMILIES):
        exposed = f"{family}_total" if family in COUNTERS else family  # a counter's samples end _total
        assert f"`{exposed}`" in readme, exposed


async def test_refusals_and_rate_limits_are_counted(tmp_path: Path) -> None:
    async with control_plane(tmp_path, metrics_listen=LOOPBACK, rate_per_address=1.0) as cp:
        credentials = grpc.ssl_channel_credentials(cp.ca_pem)
        async with grpc.aio.secure_channel(cp.api_target, credentials) as channel:
            jobs = jobs_pb2_grpc.JobsStub(channel)
            codes = []
            for _ in range(4):  # a burst of two, then refused
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await jobs.List(jobs_pb2.ListJobsRequest(), metadata=(("authorization", "Bearer x"),))
                codes.append(refused.value.code())
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
        # The agent port: a certificate of our CA naming an agent that does not exist.
        forged = agent_certificate(our_ca(cp), "a0000000000000009")
        assert await connect_with(cp, *forged) == grpc.StatusCode.PERMISSION_DENIED

        served = await scrape_counted(
            cp.daemon.metrics_port,
            ("testhide_auth_failures_total", {"port": "api"}, 2),
            ("testhide_rate_limited_calls_total", {"method": "/testhide.v1.Jobs/List"}, 2),
        )
        assert sample(served, "testhide_auth_failures_total", port="api") == 2
        assert sample(served, "testhide_auth_failures_total", port="agent") == 1
        assert sample(served, "testhide_rate_limited_calls_total", method="/testhide.v1.Jobs/List") == 2


async def test_a_refused_enrollment_is_counted(tmp_path: Path) -> None:
    async with control_plane(tmp_path, metrics_listen=LOOPBACK) as cp:
        _, csr_pem = new_key_and_csr()
        token = await cp.enrollment_token()
        wrong = token[:-8] + ("0" * 8 if not token.endswith("0" * 8) else "1" * 8)
        async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                    enrollment_pb2.EnrollRequest(token=wrong, csr_pem=csr_pem, name="intruder"), timeout=10
                )
        served = await scrape_counted(
            cp.daemon.metrics_port, ("testhide_agents_enrollments_total", {"outcome": "refused"}, 1)
        )
        assert sample(served, "testhide_agents_enrollments_total", outcome="refused") == 1
        assert sample(served, "testhide_agents_enrollments_total", outcome="enrolled") == 0


async def test_renewals_are_counted_on_both_sides(tmp_path: Path) -> None:
    async with (
        control_plane(tmp_path, metrics_listen=LOOPBACK, agent_cert_ttl=timedelta(seconds=10)) as cp,
        running_agent(cp, tmp_path, FakeRuntime(), metrics_listen=LOOPBACK) as agent,
    ):
        first = agent.credentials.certificate.serial_number
        await wait_until(
            agent.credentials_changed, lambda: agent.credentials.certificate.serial_number != first, 30
        )
        assert sample(await scrape(agent.metrics_port), "testhide_agent_certificate_renewals_total") == 1
        served = await scrape(cp.daemon.metrics_port)
        assert sample(served, "testhide_agents_certificate_renewals_total") == 1


async def test_a_queued_job_shows_in_the_queue_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    async with control_plane(tmp_path, database_url=pg_url, metrics_listen=LOOPBACK) as cp:
        await submit(cp)  # no agent: it waits
        served = await scrape(cp.daemon.metrics_port)
        pool = {"org": "default", "pool": "default"}
        assert sample(served, "testhide_queue_depth", **pool) == 1
        assert sample(served, "testhide_jobs", status="QUEUED", **pool) == 1
        assert sample(served, "testhide_queue_oldest_job_age_seconds", **pool) > 0
        assert sample(served, "testhide_store_call_seconds_count", call="create_jobs") == 1
        assert sample(served, "testhide_agents_connected", **pool) == 0  # a pool with jobs, no agent


async def test_health_says_when_the_agents_loop_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "HEALTH_TIMEOUT_S", 0.2)
    async with (
        control_plane(tmp_path) as cp,
        running_agent(cp, tmp_path, FakeRuntime(), metrics_listen=LOOPBACK) as agent,
    ):
        answered = threading.Event()

        def ask() -> tuple[int, bytes]:
            try:
                return fetch(agent.metrics_port, "/healthz")
            finally:
                answered.set()

        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(ask)
            # The stall itself: this blocks the agent's event loop until the answer has come.
            assert answered.wait(10)
            status, body = asked.result()
        assert status == 503
        assert json.loads(body) == {"status": "event_loop_stalled"}
        assert (await asyncio.to_thread(fetch, agent.metrics_port, "/healthz"))[0] == 200


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that the operator would name, with its key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metrics test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "metrics.pem", directory / "metrics.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def trusting(cert_pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=cert_pem.decode())


async def test_a_named_certificate_serves_tls_on_both_daemons(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with (
        control_plane(tmp_path, metrics_listen=LOOPBACK, metrics_cert=cert, metrics_key=key) as cp,
        running_agent(
            cp, tmp_path, FakeRuntime(), metrics_listen=LOOPBACK, metrics_cert=cert, metrics_key=key
        ) as agent,
    ):
        served = {
            cp.daemon.metrics_port: "testhide_server_certificate_expiry_seconds",
            agent.metrics_port: "testhide_agent_connected",
        }
        for port, family in served.items():
            assert family in await scrape(port, trusting(cert.read_bytes()))
            # Nothing in the clear: a plain HTTP request gets no HTTP answer.
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                await asyncio.to_thread(fetch, port)
        status, _ = await asyncio.to_thread(
            fetch, agent.metrics_port, "/healthz", trusting(cert.read_bytes())
        )
        assert status == 200


def served_serial(port: int, ca_pem: bytes) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        trusting(ca_pem).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_away_from_loopback_the_server_certificate_is_served_as_it_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_tls, "is_loopback", lambda host: False)  # 127.0.0.1 taken as any other
    async with control_plane(tmp_path, metrics_listen=LOOPBACK) as cp:
        port, certificates = cp.daemon.metrics_port, cp.daemon.certificates
        assert certificates is not None
        first = certificates.current.server_certificate.serial_number
        assert await asyncio.to_thread(served_serial, port, cp.ca_pem) == first
        assert "testhide_server_certificate_expiry_seconds" in await scrape(port, trusting(cp.ca_pem))
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            await asyncio.to_thread(fetch, port)

        code, _, err = await operator("server-cert", "rotate", "--data-dir", str(cp.data_dir))
        assert code == 0, err

        async def rotated() -> bool:
            return await asyncio.to_thread(served_serial, port, cp.ca_pem) != first

        await eventually(rotated, 30, "the rotated server certificate on the metrics port")


async def test_serve_takes_the_metrics_flag(tmp_path: Path) -> None:
    data_dir = tmp_path / "controlplane"
    await initialise(data_dir, ["localhost", "127.0.0.1"])
    ports = tmp_path / "ports.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testhide.controlplane.cli",
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        LOOPBACK,
        "--agent-listen",
        LOOPBACK,
        "--metrics-listen",
        LOOPBACK,
        "--port-file",
        str(ports),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await eventually(ports.exists, 30, "serve to write its ports")
        port = json.loads(ports.read_text())["metrics_port"]
        assert "testhide_server_certificate_expiry_seconds" in await scrape(port)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_the_agent_refuses_plain_metrics_away_from_loopback(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testhide.agent.cli",
        "run",
        "--data-dir",
        str(tmp_path / "agent"),
        "--metrics-listen",
        "0.0.0.0:9100",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "0.0.0.0:9100 is not a loopback address, so it serves TLS only" in err.decode()
    assert "--metrics-cert" in err.decode()
