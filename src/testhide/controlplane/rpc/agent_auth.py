"""Who is on the agent port: the verified client certificate of a stream or RPC,
checked again on each (expiry, a trusted issuer, the agent's record, revocation),
because a connection outlives the certificate and the trust it opened with."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509

from testhide.common.identity import AgentIdentity, IdentityError
from testhide.controlplane.ca.store import AgentStore
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.errors import PermissionDenied, Unauthenticated
from testhide.protos.v1 import agent_pb2

EXPIRED = "the agent certificate has expired; enroll the agent again"
UNTRUSTED_CA = "the agent certificate was issued by a CA that is no longer trusted; enroll the agent again"


class VerifiedAgent:
    def __init__(self, identity: AgentIdentity, certificate: x509.Certificate, issuer: str) -> None:
        self.identity = identity
        self.certificate = certificate
        self.issuer = issuer


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate:
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    if not pem:
        raise Unauthenticated("a client certificate is required")
    return x509.load_pem_x509_certificate(pem)


async def read_message(
    context: grpc.aio.ServicerContext[agent_pb2.AgentMessage, Any],
) -> agent_pb2.AgentMessage | None:
    """The agent's next message, None once it has closed its side of the stream (grpc.aio.EOF,
    which grpc's stub leaves out of read()'s type)."""
    message: object = await context.read()
    return message if isinstance(message, agent_pb2.AgentMessage) else None


async def authenticate_agent(
    context: grpc.aio.ServicerContext[Any, Any], store: AgentStore, certs: CertificateState
) -> VerifiedAgent:
    """Re-checked on every stream and RPC: the handshake alone is not enough,
    because a connection outlives the certificate (and the trust) it opened with."""
    cert = peer_certificate(context)
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise Unauthenticated(EXPIRED)
    issuer = certs.issuer_of(cert)
    if issuer is None:
        raise Unauthenticated(UNTRUSTED_CA)
    try:
        identity = AgentIdentity.from_certificate(cert)
    except IdentityError as exc:
        raise Unauthenticated(str(exc)) from exc
    record = await store.get_agent(identity.org, identity.agent_id)
    if record is None or record.pool != identity.pool:
        raise PermissionDenied("unknown agent")
    if record.revoked_at is not None:
        raise PermissionDenied("this agent has been revoked")
    return VerifiedAgent(identity, cert, issuer)
