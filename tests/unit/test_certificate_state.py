"""When the control plane renews its own server certificate, and which CA issued an agent's."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.common.tls import fingerprint
from testhide.controlplane.ca import rotation
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.trust import CertificateState, issuer_of
from testhide.controlplane.datadir import SERVER_CERT_LIFETIME, DataDir, initialise


async def test_the_server_certificate_is_due_once_a_third_of_its_life_is_left(tmp_path: Path) -> None:
    await initialise(tmp_path / "cp", ["localhost"])
    directory = DataDir(tmp_path / "cp")
    state = CertificateState(directory, directory.master_key(), allow_development=False)
    issued = state.current.server_certificate.not_valid_before_utc
    assert not state.server_certificate_due(now=issued + SERVER_CERT_LIFETIME / 2)
    assert state.server_certificate_due(now=issued + SERVER_CERT_LIFETIME * 0.7)
    assert state.reload_if_changed() is None  # nothing rotated yet


def _fingerprint(ca: CertificateAuthority) -> str:
    return fingerprint(ca.certificate.public_bytes(serialization.Encoding.DER))


def _issued_by(ca: CertificateAuthority) -> x509.Certificate:
    _, csr_pem = new_key_and_csr()
    identity = AgentIdentity(ca.trust_domain, "default", "default", "a0000000000000001")
    return x509.load_pem_x509_certificate(
        ca.issue_agent(csr_pem, identity, timedelta(hours=1)).certificate_pem
    )


def test_the_issuer_is_found_by_its_signature_unless_a_handshake_already_checked_it() -> None:
    real = CertificateAuthority.create("example.test", generation=1)
    impostor = CertificateAuthority.create("example.test", generation=1)  # the same name, its own key
    assert real.certificate.subject == impostor.certificate.subject
    forged = _issued_by(impostor)

    def issuer(trusted: tuple[CertificateAuthority, ...], handshake_checked: bool) -> str | None:
        return issuer_of(
            forged,
            tuple(ca.certificate for ca in trusted),
            tuple(_fingerprint(ca) for ca in trusted),
            handshake_checked=handshake_checked,
        )

    # Not from a handshake against these CAs only: the name alone is not enough.
    assert issuer((real,), handshake_checked=False) is None
    # Two trusted CAs of one name: the signature decides, handshake or not.
    for checked in (False, True):
        assert issuer((real, impostor), checked) == _fingerprint(impostor)
        assert issuer((impostor, real), checked) == _fingerprint(impostor)
    # A CA of another name never answers for it.
    other = CertificateAuthority.create("example.test", generation=2)
    assert issuer((other,), handshake_checked=True) is None
    assert issuer((other,), handshake_checked=False) is None


async def test_trust_counts_as_checked_by_the_handshakes_until_a_ca_leaves_the_trusted_set(
    tmp_path: Path,
) -> None:
    await initialise(tmp_path / "cp", ["localhost"])
    directory = DataDir(tmp_path / "cp")
    master = directory.master_key()
    state = CertificateState(directory, master, allow_development=False)
    first = directory.load_ca(master)
    agent = _issued_by(first)
    assert state.issuer_of(agent) == _fingerprint(first)
    assert state.trust_only_grew

    rotation.prepare(directory, master)
    assert state.reload_if_changed() is not None
    assert state.trust_only_grew  # a CA added: what the handshakes checked is still trusted
    rotation.activate(directory, master)
    assert state.reload_if_changed() is not None
    assert state.trust_only_grew
    assert state.issuer_of(agent) == _fingerprint(first)
    second = directory.load_ca(master)
    renewed = _issued_by(second)
    assert state.issuer_of(renewed) == _fingerprint(second)
    assert state.current.trusted_fingerprints == (_fingerprint(first), _fingerprint(second))

    assert rotation.retire(directory)
    assert state.reload_if_changed() is not None
    # For good: the retired CA may have verified an open connection; its certificates are refused.
    assert (state.trust_only_grew, state.issuer_of(agent)) == (False, None)
    assert state.issuer_of(renewed) == _fingerprint(second)
    assert list(state.current.trusted_fingerprints) == [_fingerprint(second)]
