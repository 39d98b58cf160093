"""The certificate material a running control plane serves, kept current.

gRPC calls the credential fetchers below on every new connection; they hand
out a new configuration only when the material changed, so rotations reach new
connections without a restart while open streams carry on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import structlog

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

    def reload_if_changed(self) -> tuple[TlsMaterial, TlsMaterial] | None:
        """(old, new) if a rotation changed the files, else None."""
        files = self._directory.fingerprint_of_files()
        if files == self._files:
            return None
        old = self.current
        self.current = self._directory.tls_material(self._master, self._allow_development)
        self._files = files
        self.version += 1
        log.info(
            "certificates_reloaded",
            server_serial=format(self.current.server_certificate.serial_number, "x"),
            active_ca=self.current.active_ca.certificate.subject.rfc4514_string(),
            trusted=len(self.current.trusted),
        )
        return old, self.current

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
