"""``testhide-agent enroll``: pin the server by the CA fingerprint in the
token, then trade the token and a CSR for a certificate. The private key is
made here and never leaves the host."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.errors import EnrollmentError
from testhide.common.enrollment_token import EnrollmentToken
from testhide.common.tls import PinError, fetch_pinned_ca, secure_channel, split_target
from testhide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc


def endpoint_for(api_endpoint: str, advertised: str) -> str:
    """The agent port: the control plane may leave the host to us."""
    if advertised.startswith(":"):
        return f"{split_target(api_endpoint)[0]}{advertised}"
    return advertised


async def enroll(server: str, token: str, data_dir: Path, name: str) -> Credentials:
    if (data_dir / "agent.json").exists():
        raise EnrollmentError(f"{data_dir} already holds an enrolled agent; use another --data-dir")
    try:
        pinned = EnrollmentToken.parse(token).ca_fingerprint
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    try:
        ca_pem = await asyncio.to_thread(fetch_pinned_ca, server, pinned)
    except (PinError, ValueError) as exc:
        raise EnrollmentError(f"refusing to enroll: {exc}") from exc
    except OSError as exc:
        raise EnrollmentError(f"cannot reach {server}: {exc}") from exc
    key_pem, csr_pem = new_key_and_csr()
    async with secure_channel(server, ca_pem) as channel:
        try:
            response = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(token=token.strip(), csr_pem=csr_pem, name=name), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise EnrollmentError(f"enrollment refused: {exc.details()}") from exc
    certificate = x509.load_pem_x509_certificate(response.certificate_pem)
    csr_key = x509.load_pem_x509_csr(csr_pem).public_key()
    if certificate.public_key() != csr_key:
        raise EnrollmentError("the issued certificate is not for this agent's key")
    try:
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollmentError("the issued certificate was not signed by the pinned CA") from exc
    credentials = Credentials(
        response.agent_id,
        server,
        endpoint_for(server, response.agent_endpoint),
        key_pem,
        response.certificate_pem,
        ca_pem,
    )
    credentials.save(data_dir)
    return credentials
