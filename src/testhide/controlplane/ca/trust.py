"""The certificate material a running control plane serves, kept current.

gRPC calls the credential fetchers below on every new connection; they hand
out a new configuration only when the material changed, so rotations reach new
connections without a restart while open streams carry on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.datadir import DataDir, TlsMaterial

log = structlog.get_logger("testhide.trust")

# Rotate the server certificate automatically once less than this share of
# its lifetime is left.
SERVER_RENEW_AT_REMAINING = 1 / 3


class CertificateState:
    def __init__(self, directory: DataDir, master: MasterKey, allow_development: bool) -> None:
        self._directory = directory
        self._master = master
        self._allow_development = allow_development
        self._files = directory.fingerprint_of_files()
        self.current: TlsMaterial = directory.tls_material(master, allow_development)
        self.version = 1
        self.trust_only_grew = True
        """No CA has left the trusted set since this process started: every client certificate the
        agent port's handshakes accepted is signed by a CA in ``current.trusted``."""

    def reload_if_changed(self) -> tuple[TlsMaterial, TlsMaterial] | None:
        """(old, new) if a rotation changed the files, else None."""
        files = self._directory.fingerprint_of_files()
        if files == self._files:
            return None
        old = self.current
        self.current = self._directory.tls_material(self._master, self._allow_development)
        if not set(old.trusted_fingerprints) <= set(self.current.trusted_fingerprints):
            self.trust_only_grew = False  # for good: an open connection may have been verified by it
        self._files = files
        self.version += 1
        log.info(
            "certificates_reloaded",
            server_serial=format(self.current.server_certificate.serial_number, "x"),
            active_ca=self.current.active_ca.certificate.subject.rfc4514_string(),
            trusted=len(self.current.trusted),
        )
        return old, self.current

    def issuer_of(self, cert: x509.Certificate) -> str | None:
        """The fingerprint of the trusted CA that issued an agent port client's certificate, None
        if none of them did (any more)."""
        material = self.current
        return issuer_of(
            cert, material.trusted, material.trusted_fingerprints, handshake_checked=self.trust_only_grew
        )

    def server_certificate_due(self, now: datetime | None = None) -> bool:
        cert = self.current.server_certificate
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        return cert.not_valid_after_utc - (now or datetime.now(UTC)) < lifetime * SERVER_RENEW_AT_REMAINING

    def _configuration(self, client_auth: bool) -> grpc.ServerCertificateConfiguration:
        material = self.current
        return grpc.ssl_server_certificate_configuration(
            [(material.server_key_pem, material.server_chain_pem)],
            root_certificates=material.bundle_pem if client_auth else None,
        )

    def credentials(self, client_auth: bool) -> grpc.ServerCredentials:
        served = self.version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            if served == self.version:
                return None
            served = self.version
            return self._configuration(client_auth)

        fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = fetch
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(client_auth),
            fetcher,  # type: ignore[arg-type]  # grpc documents None as "no change"; its stub omits it
            require_client_authentication=client_auth,
        )


def issuer_of(
    cert: x509.Certificate,
    trusted: tuple[x509.Certificate, ...],
    fingerprints: tuple[str, ...],
    *,
    handshake_checked: bool,
) -> str | None:
    """The fingerprint (from ``fingerprints``, in ``trusted``'s order) of the CA in ``trusted`` that
    signed ``cert``, None if none did.

    ``handshake_checked``: the certificate came from a TLS handshake that required and verified it
    against CAs that are all still in ``trusted``. The TLS layer has then checked that one of them
    signed it, and as each CA generation has a name of its own and signs no other CA (path length
    0), the one CA named as its issuer is that one: its signature is not verified again (an eighth
    of a renewal's cost). Two CAs of one name, or a CA that has left the set since some handshake,
    and the signature is verified."""
    named = [i for i, ca in enumerate(trusted) if ca.subject == cert.issuer]
    if handshake_checked and len(named) == 1:
        return fingerprints[named[0]]
    for i in named:
        try:
            cert.verify_directly_issued_by(trusted[i])
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprints[i]
    return None
