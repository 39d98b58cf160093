"""``testhide-agent enroll``: pin the server by the CA fingerprint in the
token, then trade the token and a CSR for a certificate. The private key is
made here and never leaves the host.

Several servers (replicas of one control plane) are tried in the order given:
the first that answers enrolls the agent, and the credentials record them all.
A server that cannot be reached is passed over. An answer is final, also a
refusal (a bad, used or expired token; a server without the pinned CA): another
replica of the same control plane would refuse it too."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.endpoints import agent_endpoints
from testhide.agent.errors import EnrollmentError
from testhide.common.enrollment_token import EnrollmentToken
from testhide.common.tls import PinError, fetch_pinned_ca, secure_channel, split_target
from testhide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc

log = structlog.get_logger("testhide.agent.enroll")

PROBE_BYTES = 64 * 1024
"""Well above what the credentials take (a key, two certificates, a CA bundle, agent.json:
a few KiB), each written beside its final name first."""
CREDENTIAL_FILES = ("agent.key", "agent.pem", "ca.pem", "agent.json")


class _Unreachable(Exception):
    """The server did not answer: the next one may."""


def _targets(given: Sequence[str], option: str) -> tuple[str, ...]:
    for target in given:
        try:
            split_target(target)
        except ValueError as exc:
            raise EnrollmentError(f"{option}: {exc}") from None
    return tuple(dict.fromkeys(given))


async def _enroll_at(
    server: str, token: str, pinned: str, csr_pem: bytes, name: str
) -> tuple[bytes, enrollment_pb2.EnrollResponse]:
    """The pinned CA and the enrollment answer of ``server``."""
    try:
        ca_pem = await asyncio.to_thread(fetch_pinned_ca, server, pinned)
    except (PinError, ValueError) as exc:
        raise EnrollmentError(f"refusing to enroll: {exc}") from exc
    except OSError as exc:
        raise _Unreachable(str(exc)) from exc
    async with secure_channel(server, ca_pem) as channel:
        try:
            response = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(token=token.strip(), csr_pem=csr_pem, name=name), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise _Unreachable(exc.details() or "unavailable") from exc
            raise EnrollmentError(f"enrollment refused: {exc.details()}") from exc
    return ca_pem, response


def _derived_agent_endpoints(targets: Sequence[str], answered: str, advertised: str) -> tuple[str, ...]:
    try:
        found, underivable = agent_endpoints(targets, answered, advertised)
    except ValueError as exc:
        raise EnrollmentError(f"{exc}; name each replica's agent port with --agent-server") from exc
    if underivable:
        # The certificate is issued and the token spent: enroll, without those replicas' agent ports.
        log.warning(
            "agent_port_unknown",
            servers=list(underivable),
            note="their agent ports cannot be derived; enroll again with --agent-server for each replica",
        )
    return found


async def enroll(
    servers: str | Sequence[str],
    token: str,
    data_dir: Path,
    name: str,
    agent_servers: Sequence[str] = (),
) -> Credentials:
    """Enroll through the first of ``servers`` (HOST:PORT of API ports) that
    answers. The agent ports are ``agent_servers`` if given, else derived
    from the answer (`agent_endpoints`). The data dir is checked for writing
    before the token goes out, and is left as it was when enrollment fails; if
    saving fails all the same, the error says which agent was enrolled and how
    to recover."""
    targets = _targets([servers] if isinstance(servers, str) else servers, "--server")
    if not targets:
        raise EnrollmentError("no server to enroll with: give --server HOST:PORT")
    overrides = _targets(agent_servers, "--agent-server")
    try:
        pinned = EnrollmentToken.parse(token).ca_fingerprint
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    made = await asyncio.to_thread(check_data_dir, data_dir)  # before the token is spent
    try:
        key_pem, csr_pem = new_key_and_csr()
        server, ca_pem, response = await _enroll_first(targets, token, pinned, csr_pem, name)
        _check_issued(response.certificate_pem, csr_pem, ca_pem)
        agents = overrides or _derived_agent_endpoints(targets, server, response.agent_endpoint)
        credentials = Credentials(
            response.agent_id, targets, agents, key_pem, response.certificate_pem, ca_pem
        )
        await asyncio.to_thread(_save, credentials, data_dir)
        return credentials
    except BaseException:
        if made:
            with suppress(OSError):
                os.rmdir(data_dir)  # only if empty: nothing of an identity is left behind
        raise


async def _enroll_first(
    targets: Sequence[str], token: str, pinned: str, csr_pem: bytes, name: str
) -> tuple[str, bytes, enrollment_pb2.EnrollResponse]:
    """The server that answered, its pinned CA and its answer."""
    passed_over: list[str] = []
    for server in targets:
        try:
            ca_pem, response = await _enroll_at(server, token, pinned, csr_pem, name)
            return server, ca_pem, response
        except _Unreachable as exc:
            passed_over.append(f"{server}: {exc}")
            log.warning("enrollment_server_unreachable", server=server, error=str(exc))
    raise EnrollmentError(f"cannot reach {'; nor '.join(passed_over)}")


def _check_issued(certificate_pem: bytes, csr_pem: bytes, ca_pem: bytes) -> None:
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    csr_key = x509.load_pem_x509_csr(csr_pem).public_key()
    if certificate.public_key() != csr_key:
        raise EnrollmentError("the issued certificate is not for this agent's key")
    try:
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollmentError("the issued certificate was not signed by the pinned CA") from exc


def _save(credentials: Credentials, data_dir: Path) -> None:
    """The control plane has answered and the token is spent: a failure here
    leaves an agent record that never connects, so say which and what to do."""
    try:
        credentials.save(data_dir)
    except OSError as exc:
        for name in CREDENTIAL_FILES:
            with suppress(OSError):
                (data_dir / name).unlink(missing_ok=True)
        agent_id = credentials.agent_id
        raise EnrollmentError(
            f"enrolled as agent {agent_id}, but cannot save its credentials in {data_dir}: "
            f"{exc.strerror or exc}; the token is spent and that agent will never connect: free the space,"
            " enroll again with a new token, and revoke it"
            f" ('testhide-controlplane agents revoke {agent_id}')"
        ) from exc


def check_data_dir(data_dir: Path) -> bool:
    """The data dir exists (made 0700) and takes the credentials: a probe file as
    large is written, synced and removed, so that a full or read-only disk is
    found before the token is spent. True if it was made here."""
    probe = data_dir / f".enroll-probe-{os.getpid()}"
    made = False
    try:
        if (data_dir / "agent.json").exists():
            raise EnrollmentError(f"{data_dir} already holds an enrolled agent; use another --data-dir")
        made = not data_dir.exists()
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(bytes(PROBE_BYTES))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
            if made:
                data_dir.rmdir()
        raise EnrollmentError(f"cannot write the agent data dir {data_dir}: {exc.strerror or exc}") from exc
    with suppress(OSError):
        probe.unlink()
    return made
