"""Where no signing helper can be started at all (no processes or semaphores to be had,
as in a container without /dev/shm), the control plane says so once and signs on the
event loop: renewals go on."""

from __future__ import annotations

import asyncio
import multiprocessing
from datetime import timedelta

import pytest
from cryptography import x509
from structlog.testing import capture_logs

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.signer import Signer


async def test_without_helpers_renewals_are_signed_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_semaphores(method: str) -> object:
        raise OSError(38, "Function not implemented")  # what SemLock raises without /dev/shm

    monkeypatch.setattr(multiprocessing, "get_context", no_semaphores)
    signer = Signer(2)
    ca = CertificateAuthority.create("signer.test")
    who = [AgentIdentity("signer.test", "default", "default", f"a{n:016x}") for n in range(5)]
    with capture_logs() as events:
        issued = await asyncio.gather(
            *(signer.issue_agent(ca, new_key_and_csr()[1], who[n], timedelta(hours=1)) for n in range(5))
        )
        issued.append(await signer.issue_agent(ca, new_key_and_csr()[1], who[0], timedelta(hours=1)))
    for certificate in issued:
        x509.load_pem_x509_certificate(certificate.certificate_pem).verify_directly_issued_by(ca.certificate)
    assert [e["event"] for e in events] == ["certificate_helpers_unavailable"]
    assert signer.helper_pids() == []
    await signer.close()
