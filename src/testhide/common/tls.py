"""Opening TLS channels to the control plane, and fetching its CA pinned by
fingerprint (kubeadm-style discovery) before an agent has any trust anchor."""

from __future__ import annotations

import _ssl
import hashlib
import socket
import ssl
from typing import Any

import grpc

# Large enough for log batches (<= 1 MiB) with headroom; gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class PinError(Exception):
    """The server did not present the CA the token pins."""


def fingerprint(cert_pem_or_der: bytes) -> str:
    """sha256 of a certificate's DER encoding, lowercase hex."""
    # Imported here: the CLI's start-up (every `testhide` command) does not need x509.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = (
        x509.load_pem_x509_certificate(cert_pem_or_der)
        if cert_pem_or_der.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(cert_pem_or_der)
    )
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"invalid address {target!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _peer_chain(host: str, port: int, timeout: float) -> list[bytes]:
    context = ssl.create_default_context()
    # Deliberately unverified: this connection only fetches the chain, which is
    # then checked against the pinned fingerprint and path-validated below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        public = getattr(tls, "get_unverified_chain", None)  # Python >= 3.13: DER bytes
        if public is not None:
            return list(public())
        # Python 3.11/3.12 have the same method on the private object.
        private = tls._sslobj  # type: ignore[attr-defined]  # private, so typeshed does not declare it
        return [c.public_bytes(_ssl.ENCODING_DER) for c in private.get_unverified_chain()]


def fetch_pinned_ca(target: str, ca_fingerprint: str, timeout: float = 10.0) -> bytes:
    """Return the PEM of the CA whose sha256 is ``ca_fingerprint``, provided the
    server at ``target`` presents it and a leaf it signed for that host."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import verification

    host, port = split_target(target)
    chain = [x509.load_der_x509_certificate(der) for der in _peer_chain(host, port, timeout)]
    wanted = ca_fingerprint.lower()
    anchors = [c for c in chain if fingerprint(c.public_bytes(serialization.Encoding.DER)) == wanted]
    if not chain or not anchors:
        raise PinError("the server's certificate chain does not contain the CA pinned by the token")
    store = verification.Store(anchors)
    subject: verification.Subject
    try:
        import ipaddress

        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
    try:
        verifier.verify(chain[0], chain[1:])
    except verification.VerificationError as exc:
        raise PinError(f"the server's certificate does not verify against the pinned CA: {exc}") from exc
    return anchors[0].public_bytes(serialization.Encoding.PEM)


def secure_channel(
    target: str,
    ca_pem: bytes,
    *,
    client_key_pem: bytes | None = None,
    client_cert_pem: bytes | None = None,
    extra_options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=client_key_pem, certificate_chain=client_cert_pem
    )
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS + (extra_options or []))
