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
from collections.abc import Sequence
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
    from the answer (`agent_endpoints`)."""
    if (data_dir / "agent.json").exists():
        raise EnrollmentError(f"{data_dir} already holds an enrolled agent; use another --data-dir")
    targets = _targets([servers] if isinstance(servers, str) else servers, "--server")
    if not targets:
        raise EnrollmentError("no server to enroll with: give --server HOST:PORT")
    overrides = _targets(agent_servers, "--agent-server")
    try:
        pinned = EnrollmentToken.parse(token).ca_fingerprint
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    key_pem, csr_pem = new_key_and_csr()
    passed_over: list[str] = []
    for server in targets:
        try:
            ca_pem, response = await _enroll_at(server, token, pinned, csr_pem, name)
            break
        except _Unreachable as exc:
            passed_over.append(f"{server}: {exc}")
            log.warning("enrollment_server_unreachable", server=server, error=str(exc))
    else:
        raise EnrollmentError(f"cannot reach {'; nor '.join(passed_over)}")
    certificate = x509.load_pem_x509_certificate(response.certificate_pem)
    csr_key = x509.load_pem_x509_csr(csr_pem).public_key()
    if certificate.public_key() != csr_key:
        raise EnrollmentError("the issued certificate is not for this agent's key")
    try:
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollmentError("the issued certificate was not signed by the pinned CA") from exc
    agents = overrides or _derived_agent_endpoints(targets, server, response.agent_endpoint)
    credentials = Credentials(response.agent_id, targets, agents, key_pem, response.certificate_pem, ca_pem)
    credentials.save(data_dir)
    return credentials
