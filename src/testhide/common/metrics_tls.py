"""The metrics port's one rule, and the TLS it serves by it: no port of testhide
speaks plaintext beyond the machine. On a loopback address (127.0.0.0/8, ::1,
``localhost``) the metrics port may be plain HTTP; on any other it serves TLS 1.2
or 1.3, forward-secret AEAD suites only, as the gRPC ports do, with the
certificate the operator names or, failing that, one its daemon has (the
control plane's server certificate; the agent has none fit to serve).

Kept apart from the listener (``metrics_http``) so that checking a
configuration does not import the Prometheus client."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testhide.common.tls import split_target

TLS12_SUITES = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites offered: forward secrecy and AEAD only (1.3's are all AEAD)."""


@dataclass(frozen=True)
class ServingCertificate:
    chain_pem: bytes
    """The certificate, then its intermediates, PEM."""
    key_pem: bytes
    """Its private key, PEM, unencrypted."""


CertificateSource = Callable[[], ServingCertificate]
"""Asked on every connection; building a TLS context again only when the answer changed."""


def is_loopback(host: str) -> bool:
    """Traffic to ``host`` cannot leave the machine. Decided without any name lookup:
    an IP literal in 127.0.0.0/8 or ::1, or ``localhost``; anything else (a name,
    0.0.0.0, ::) may be reached from elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _needs_certificate(listen: str) -> ValueError:
    return ValueError(
        f"the metrics port on {listen} is not a loopback address, so it serves TLS only:"
        " name its certificate and key (--metrics-cert, --metrics-key), or listen on 127.0.0.1"
    )


def check_metrics_options(
    listen: str | None, cert: Path | None, key: Path | None, *, own_certificate: bool
) -> None:
    """ValueError unless the options make a metrics port that can be served:
    ``own_certificate``, whether the daemon has a server certificate of its own
    to fall back on away from loopback (the control plane; not the agent)."""
    if (cert is None) != (key is None):
        raise ValueError("give the metrics certificate and its key together (--metrics-cert, --metrics-key)")
    if listen is None:
        if cert is not None:
            raise ValueError("a metrics certificate needs a metrics port (--metrics-listen)")
        return
    host, _ = split_target(listen)
    if cert is None and not own_certificate and not is_loopback(host):
        raise _needs_certificate(listen)


def choose_certificate(
    listen: str, named: CertificateSource | None, default: CertificateSource | None
) -> CertificateSource | None:
    """The certificate the metrics port serves: the one the operator named (on any
    address), else none on a loopback address (plain HTTP), else ``default``.
    ValueError when a non-loopback address would have none."""
    host, _ = split_target(listen)
    if named is not None:
        return named
    if is_loopback(host):
        return None
    if default is None:
        raise _needs_certificate(listen)
    return default


def certificate_files(cert: Path, key: Path) -> CertificateSource:
    """Certificate and key files the operator named, read again on every connection
    (small files), so that replacing them takes effect at the next scrape."""

    def read() -> ServingCertificate:
        return ServingCertificate(cert.read_bytes(), key.read_bytes())

    return read


def tls_context(certificate: ServingCertificate) -> ssl.SSLContext:
    """A server context for ``certificate``. Python loads keys only from files: the
    key goes to one under a one-time password, so it never touches disk in the clear."""
    import secrets
    import tempfile

    from cryptography.hazmat.primitives import serialization

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_SUITES)
    password = secrets.token_urlsafe(32).encode()
    try:
        key = serialization.load_pem_private_key(certificate.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ssl.SSLError(f"the metrics key is not an unencrypted PEM private key: {exc}") from exc
    sealed = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="testhide-metrics-") as directory:
        path = Path(directory) / "certificate.pem"
        path.touch(mode=0o600)
        path.write_bytes(certificate.chain_pem.rstrip(b"\n") + b"\n" + sealed)
        context.load_cert_chain(path, password=password)
    return context
