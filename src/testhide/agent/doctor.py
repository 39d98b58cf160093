"""``testhide-agent doctor``: what breaks agents in practice, one line per check
with the fix, and a non-zero exit on any failure.

Checked, in order: the data dir (0700, ours), the credentials (present,
readable, the key 0600 and matching the certificate), the certificate's expiry,
this host's clock against the control plane's, Docker (reachable, new enough,
with seccomp), every runtime Docker has registered (the agent's own seccomp
probe, ``runtime/offer.py``, run on each, the default one too), every recorded
control-plane address (TCP, then TLS with the pinned CA and, on agent ports,
this agent's certificate, then a gRPC health check), and free disk for the
spool, the temporary files jobs pass through, and Docker's own data.

**The oldest Docker supported is 20.10 (API 1.41).** The jobs' seccomp profile
is Docker 20.10.24's default (``runtime/seccomp.py``); it answers ``clone3``
with ENOSYS through a per-rule ``errnoRet``, which older engines do not know,
and 20.10 is what the suite runs on (Debian 12's ``docker.io``).

**Clock skew** has no live source: no RPC of the protocol carries the control
plane's time (gRPC's health answer and headers carry none), and the server's
certificate is no clock. The agent's own certificate is one, once: the
control plane writes its clock into ``notBefore`` (backdated by a known 30 s)
and the agent records when the certificate arrived by its own clock. So skew
is measured as of the last enrollment or renewal, to within about a second."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.doctor_engine import check_engine
from testhide.agent.errors import AgentError
from testhide.common.findings import (
    Finding,
    exit_status,
    fail,
    free_space,
    ok,
    render,
    user_name,
    warn,
)
from testhide.common.identity import AGENT_CERT_BACKDATE, AgentIdentity, IdentityError
from testhide.common.sizes import Size, format_size
from testhide.common.statement import issued_by
from testhide.common.tls import secure_channel, split_target

NETWORK_TIMEOUT_S = 5.0
CERT_WARN_LEFT = 0.10
"""Warn when less than this share of the certificate's lifetime is left."""
SKEW_WARN = timedelta(seconds=60)
"""A minute either way is harmless: renewal is timed from the certificate's own lifetime (tested)."""
SKEW_FAIL = timedelta(minutes=5)
"""The server certificate's backdate: further behind, a freshly rotated one is not valid here yet."""
TEMP_WARN_BYTES = 1024**3
DOCKER_WARN_BYTES = 2 * 1024**3


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- data dir and credentials


def data_dir_finding(data_dir: Path) -> Finding:
    name = "data dir"
    if not data_dir.is_dir():
        return fail(
            name,
            f"{data_dir} does not exist",
            f"testhide-agent enroll --server HOST:PORT --token TOKEN --data-dir {data_dir}",
        )
    info = data_dir.stat()
    me = os.geteuid()
    if info.st_uid != me:
        return fail(
            name,
            f"{data_dir} is owned by {user_name(info.st_uid)}, this is {user_name(me)}",
            f"run the doctor as the agent's user, or chown -R {user_name(me)} {data_dir}",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        return fail(
            name,
            f"{data_dir} is mode {stat.S_IMODE(info.st_mode):04o}: others can reach the agent's key",
            f"chmod 700 {data_dir}",
        )
    return ok(name, f"{data_dir}, mode 0700, owned by {user_name(me)}")


def load_credentials(data_dir: Path) -> tuple[Finding, Credentials | None]:
    name = "credentials"
    missing = [f for f in ("agent.json", "agent.key", "agent.pem", "ca.pem") if not (data_dir / f).exists()]
    if missing:
        return fail(
            name,
            f"{data_dir} holds no enrolled agent (missing {', '.join(missing)})",
            f"testhide-agent enroll --server HOST:PORT --token TOKEN --data-dir {data_dir}",
        ), None
    key_path = data_dir / "agent.key"
    try:
        if _mode(key_path) & 0o077:
            return fail(
                name, f"{key_path} is mode {_mode(key_path):04o}, readable by others", f"chmod 600 {key_path}"
            ), None
        credentials = Credentials.load(data_dir)
        key = serialization.load_pem_private_key(credentials.key_pem, password=None)
        certificate = credentials.certificate
    except OSError as exc:
        return fail(name, f"cannot read {exc.filename}: {exc.strerror}", "run as the agent's user"), None
    except (AgentError, ValueError) as exc:
        return fail(name, f"damaged: {exc}", "enroll again, into a new --data-dir"), None
    if key.public_key() != certificate.public_key():
        return fail(
            name,
            "agent.key does not belong to agent.pem",
            "enroll again, into a new --data-dir",
        ), None
    return ok(
        name,
        f"agent {credentials.agent_id}, key 0600; {len(credentials.api_endpoints)} API and "
        f"{len(credentials.agent_endpoints)} agent endpoint(s) recorded",
    ), credentials


def certificate_finding(credentials: Credentials, now: datetime) -> Finding:
    """Expiry by this host's clock, as the agent itself counts it (arrival + lifetime)."""
    name = "certificate"
    certificate = credentials.certificate
    cas = x509.load_pem_x509_certificates(credentials.ca_pem)
    if not any(issued_by(certificate, ca) for ca in cas):
        return fail(
            name,
            "agent.pem was not issued by a CA in ca.pem",
            "enroll again; the control plane's CA bundle and this certificate do not belong together",
        )
    try:
        who = AgentIdentity.from_certificate(certificate)
        identity = f"org {who.org}, pool {who.pool}"
    except IdentityError as exc:
        return fail(name, str(exc), "enroll again")
    lifetime = credentials.lifetime
    left = credentials.expires_at - now
    until = f"{credentials.expires_at:%Y-%m-%d %H:%M:%S} UTC"
    if left <= timedelta(0):
        return fail(
            name,
            f"{identity}; expired at {until}: an expired certificate cannot be renewed",
            "enroll this agent again with a new token (testhide-controlplane enroll-token create),"
            " into a new --data-dir",
        )
    share = left / lifetime
    finding = (
        f"{identity}; valid until {until}, {_duration(left)} ({share:.0%}) of {_duration(lifetime)} left;"
        " the agent renews at half-life while it runs"
    )
    if share < CERT_WARN_LEFT:
        return warn(
            name,
            finding,
            "start the agent (testhide-agent run) so that it renews; if it runs, its log says why it cannot",
        )
    return ok(name, finding)


def clock_finding(credentials: Credentials, now: datetime) -> Finding:
    """Skew as of the last enrollment or renewal (module docstring)."""
    name = "clock"
    # notBefore has whole seconds: the control plane's clock was within the second after it.
    server_then = credentials.certificate.not_valid_before_utc + AGENT_CERT_BACKDATE + timedelta(seconds=0.5)
    skew = server_then - credentials.received_at
    seconds = abs(skew.total_seconds())
    if seconds < 1.5:
        relation = "within a second of the control plane's"
    else:
        relation = f"{seconds:.0f} s {'behind' if skew > timedelta(0) else 'ahead of'} the control plane's"
    finding = (
        f"this host's clock is {relation} (measured at the last enrollment or renewal,"
        f" {_duration(now - credentials.received_at)} ago; the protocol has no live clock)"
    )
    fix = "synchronise this host's clock (NTP: timedatectl set-ntp true), and the control plane's"
    if abs(skew) > SKEW_FAIL:
        return fail(name, finding, fix)
    if abs(skew) > SKEW_WARN:
        return warn(name, finding, fix)
    return ok(name, finding)


def _duration(span: timedelta) -> str:
    seconds = max(0, int(span.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            return f"{whole} {unit}" if not rest or unit == "min" else f"{seconds / size:.1f} {unit}"
    return f"{seconds} s"


# ---------------------------------------------------------------- the control plane's addresses


def _tls_problem(host: str, port: int, ca_pem: bytes, client_files: tuple[Path, Path] | None) -> str | None:
    """TCP, then TLS as the agent's channel does it (pinned CA, host name, client
    certificate on the agent port), then the server's first HTTP/2 frame: a
    server that refused our certificate closes the connection there instead."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        if client_files is not None:
            context.load_cert_chain(certfile=client_files[0], keyfile=client_files[1])
        with socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S) as raw:
            try:
                tls = context.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                return f"TLS: the server's certificate does not verify against ca.pem: {exc.verify_message}"
            with tls:
                try:
                    first = tls.recv(9)
                except TimeoutError:
                    return None
                if not first:
                    return (
                        "the server closed the connection after the TLS handshake: it refused this agent's"
                        + (" certificate" if client_files else " connection")
                    )
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}"
    except TimeoutError:
        return f"no answer within {NETWORK_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    return None


async def endpoint_finding(kind: str, target: str, credentials: Credentials, data_dir: Path) -> Finding:
    name = f"{kind} {target}"
    agent_port = kind == "agent port"
    try:
        host, port = split_target(target)
    except ValueError as exc:
        return fail(name, str(exc), "enroll again with valid --server/--agent-server addresses")
    client_files = (data_dir / "agent.pem", data_dir / "agent.key") if agent_port else None
    started = time.monotonic()
    problem = await asyncio.to_thread(_tls_problem, host, port, credentials.ca_pem, client_files)
    if problem is None:
        problem = await _health_problem(target, credentials, agent_port)
    if problem is not None:
        return fail(name, problem, _connect_fix(problem, kind))
    how = "mutual TLS with this agent's certificate" if agent_port else "TLS with the pinned CA"
    return ok(name, f"{how}, health SERVING in {(time.monotonic() - started) * 1000:.0f} ms")


async def _health_problem(target: str, credentials: Credentials, agent_port: bool) -> str | None:
    client = (credentials.key_pem, credentials.certificate_pem) if agent_port else (None, None)
    channel = secure_channel(target, credentials.ca_pem, client_key_pem=client[0], client_cert_pem=client[1])
    async with channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=NETWORK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            return f"gRPC health check: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)} (stopping?)"
    return None


def _connect_fix(problem: str, kind: str) -> str:
    if "does not verify" in problem:
        return "the control plane's CA or server certificate changed: enroll again with a new token"
    if kind == "agent port" and "certificate" in problem:
        return "see the certificate line: enroll again if it expired, was revoked or the CA was replaced"
    return (
        "is serve running there? check the address, DNS and firewalls; addresses come from enrollment"
        " (--server, --agent-server)"
    )


# ---------------------------------------------------------------- disk


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_findings(data_dir: Path, spool_max: int, docker_root: str | None) -> list[Finding]:
    spool = AgentConfig(data_dir=data_dir).spool_dir
    free = _free_bytes(spool)
    findings = []
    described = f"{free_space(free)} free at {spool}"
    if free < spool_max:
        findings.append(
            fail(
                "disk spool",
                f"{described}, less than --spool-max ({format_size(spool_max)}): output would wait for space",
                "free space there, or lower --spool-max",
            )
        )
    else:
        findings.append(ok("disk spool", f"{described}, --spool-max is {format_size(spool_max)}"))
    temp = Path(tempfile.gettempdir())
    free = _free_bytes(temp)
    described = f"{free_space(free)} free at {temp} (workspaces and artifacts pass through it)"
    if free < TEMP_WARN_BYTES:
        findings.append(warn("disk temp", described, "free space there, or point TMPDIR at a larger disk"))
    else:
        findings.append(ok("disk temp", described))
    if docker_root is not None:
        try:
            free = _free_bytes(Path(docker_root))
        except OSError as exc:
            findings.append(warn("disk docker", f"cannot look at {docker_root}: {exc.strerror or exc}"))
            return findings
        described = f"{free_space(free)} free at {docker_root} (images and job volumes)"
        if free < DOCKER_WARN_BYTES:
            findings.append(warn("disk docker", described, "docker system prune, or give Docker more disk"))
        else:
            findings.append(ok("disk docker", described))
    return findings


# ---------------------------------------------------------------- all of it


async def diagnose(data_dir: Path, spool_max: int, runtime: str) -> list[Finding]:
    now = datetime.now(UTC)
    findings = [data_dir_finding(data_dir)]
    credentials_finding, credentials = load_credentials(data_dir)
    findings.append(credentials_finding)
    engine_task = asyncio.create_task(asyncio.to_thread(check_engine, runtime))
    endpoint_findings: list[Finding] = []
    if credentials is not None:
        findings += guarded("certificate", lambda: [certificate_finding(credentials, now)])
        findings += guarded("clock", lambda: [clock_finding(credentials, now)])
        targets = [("API", t) for t in credentials.api_endpoints]
        targets += [("agent port", t) for t in credentials.agent_endpoints]
        endpoint_findings = list(
            await asyncio.gather(*(endpoint_finding(k, t, credentials, data_dir) for k, t in targets))
        )
    else:
        findings.append(warn("control plane", "not checked: no credentials"))
    engine = await engine_task
    disk = guarded("disk", lambda: disk_findings(data_dir, spool_max, engine.root_dir))
    return findings + engine.findings + endpoint_findings + disk


def guarded(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """A check that could not look at what it checks fails with the reason, never a traceback."""
    try:
        return run()
    except (AgentError, OSError, ValueError) as exc:
        return [fail(check, f"could not be checked: {exc}")]


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    envvar="TESTHIDE_AGENT_DATA_DIR",
    show_envvar=True,
    help="Where the agent keeps its identity.",
)
@click.option(
    "--spool-max",
    type=Size(min=4 * 1024 * 1024),
    default="512MiB",
    show_default=True,
    envvar="TESTHIDE_AGENT_SPOOL_MAX",
    show_envvar=True,
    help="The agent's --spool-max: the spool's filesystem must have this much free.",
)
@click.option(
    "--runtime",
    default="runc",
    show_default=True,
    envvar="TESTHIDE_AGENT_RUNTIME",
    show_envvar=True,
    help="The agent's --runtime: it must be registered in Docker and pass the probe.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
def doctor(data_dir: Path, spool_max: int, runtime: str, as_json: bool, strict: bool) -> None:
    """Check what breaks agents in practice: the data dir and credentials, the
    certificate's expiry, clock skew, Docker and its runtimes (seccomp probe),
    every control-plane address, disk space. One line per check with the fix;
    exit 1 if any check fails (with --strict, also if any warns)."""
    findings = asyncio.run(diagnose(data_dir, spool_max, runtime))
    click.echo(render(findings, as_json, strict))
    raise SystemExit(exit_status(findings, strict))
