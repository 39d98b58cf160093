"""When the control plane renews its own server certificate."""

from __future__ import annotations

from pathlib import Path

from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.datadir import SERVER_CERT_LIFETIME, DataDir, initialise


async def test_the_server_certificate_is_due_once_a_third_of_its_life_is_left(tmp_path: Path) -> None:
    await initialise(tmp_path / "cp", ["localhost"])
    directory = DataDir(tmp_path / "cp")
    state = CertificateState(directory, directory.master_key(), allow_development=False)
    issued = state.current.server_certificate.not_valid_before_utc
    assert not state.server_certificate_due(now=issued + SERVER_CERT_LIFETIME / 2)
    assert state.server_certificate_due(now=issued + SERVER_CERT_LIFETIME * 0.7)
    assert state.reload_if_changed() is None  # nothing rotated yet
