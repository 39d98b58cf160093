"""Agent certificates signed in helper processes (ca/signer.py): the same certificates
as the CA signs on the event loop, a bad CSR failing only its own request, a helper
that dies costing no certificate, and no helper outliving its control plane."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.controlplane.ca.authority import CertificateAuthority, IssuedCertificate
from testhide.controlplane.ca.signer import Signer
from testhide.controlplane.errors import InvalidArgument
from tests.harness import REPO, control_plane, ended_process, enrolled
from tests.integration.test_renew_on_stream import answer, renew, stream_of

HOUR = timedelta(hours=1)
DEATH_S = 30
"""How long a helper may take to end once told to (it is killed: at once, in practice)."""


def identity(n: int) -> AgentIdentity:
    return AgentIdentity("signer.test", "default", "default", f"a{n:016x}")


def check_issued(issued: IssuedCertificate, ca: CertificateAuthority, key_pem: bytes, n: int) -> None:
    """What the CA's own issue_agent gives: signed by ``ca``, for agent ``n``, on its new key."""
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    certificate.verify_directly_issued_by(ca.certificate)
    assert AgentIdentity.from_certificate(certificate) == identity(n)
    assert certificate.public_key() == serialization.load_pem_private_key(key_pem, None).public_key()
    assert issued.serial == certificate.serial_number
    assert (
        timedelta(minutes=59)
        < issued.not_after - certificate.not_valid_before_utc
        <= HOUR + timedelta(minutes=5)
    )


async def wait_ended(pid: int) -> None:
    with ended_process(pid) as ended:
        await asyncio.wait_for(ended, DEATH_S)


async def test_a_wave_is_signed_in_a_helper_and_a_bad_csr_fails_only_its_own_request() -> None:
    signer = Signer(1)
    ca = CertificateAuthority.create("signer.test")
    try:
        keys = [new_key_and_csr() for _ in range(40)]
        csrs = [csr for _, csr in keys]
        csrs[17] = b"-----BEGIN CERTIFICATE REQUEST-----\nnot one\n-----END CERTIFICATE REQUEST-----\n"
        outcomes = await asyncio.gather(
            *(signer.issue_agent(ca, csr, identity(n), HOUR) for n, csr in enumerate(csrs)),
            return_exceptions=True,
        )
        refused = outcomes.pop(17)
        assert isinstance(refused, InvalidArgument), refused
        assert "not a PEM certificate signing request" in str(refused)
        for n, issued in enumerate(outcomes):
            assert isinstance(issued, IssuedCertificate), issued
            at = n if n < 17 else n + 1
            check_issued(issued, ca, keys[at][0], at)
        (helper,) = signer.helper_pids()
        assert helper != os.getpid()
    finally:
        await signer.close()
    await wait_ended(helper)


async def test_a_request_the_helper_cannot_sign_fails_alone_with_what_went_wrong() -> None:
    """Not the CSR's fault (here, a lifetime past the year 9999): its caller hears why, as it
    would on the event loop; the other requests of its batch get their certificates."""
    signer = Signer(1)
    ca = CertificateAuthority.create("signer.test")
    try:
        keys = [new_key_and_csr() for _ in range(6)]
        lifetimes = [HOUR] * 6
        lifetimes[3] = timedelta(days=4_000_000)
        outcomes = await asyncio.gather(
            *(signer.issue_agent(ca, keys[n][1], identity(n), lifetimes[n]) for n in range(6)),
            return_exceptions=True,
        )
        failed = outcomes.pop(3)
        assert isinstance(failed, RuntimeError), failed
        assert "signing failed: OverflowError" in str(failed)
        for n, issued in zip((0, 1, 2, 4, 5), outcomes, strict=True):
            assert isinstance(issued, IssuedCertificate), issued
            check_issued(issued, ca, keys[n][0], n)
    finally:
        await signer.close()


async def test_a_helper_killed_costs_no_certificate_and_the_next_batch_starts_another() -> None:
    signer = Signer(1)
    ca = CertificateAuthority.create("signer.test")
    try:
        key, csr = new_key_and_csr()
        check_issued(await signer.issue_agent(ca, csr, identity(0), HOUR), ca, key, 0)
        (first,) = signer.helper_pids()
        os.kill(first, signal.SIGKILL)
        await wait_ended(first)
        # The batch sent to the dead helper is signed here; none of its callers hears of it.
        keys = [new_key_and_csr() for _ in range(8)]
        wave = await asyncio.gather(
            *(signer.issue_agent(ca, c, identity(n), HOUR) for n, (_, c) in enumerate(keys))
        )
        for n, issued in enumerate(wave):
            check_issued(issued, ca, keys[n][0], n)
        key, csr = new_key_and_csr()
        check_issued(await signer.issue_agent(ca, csr, identity(9), HOUR), ca, key, 9)
        (second,) = signer.helper_pids()
        assert second != first
    finally:
        await signer.close()
    await wait_ended(second)


async def test_a_new_ca_is_loaded_by_the_helper_that_signed_under_the_old_one() -> None:
    signer = Signer(1)
    old, new = CertificateAuthority.create("signer.test"), CertificateAuthority.create("signer.test", 2)
    try:
        for ca in (old, new, old):
            key, csr = new_key_and_csr()
            check_issued(await signer.issue_agent(ca, csr, identity(1), HOUR), ca, key, 1)
        assert len(signer.helper_pids()) == 1
    finally:
        await signer.close()


async def test_a_closed_signer_has_no_helper_and_signs_on_the_loop() -> None:
    signer = Signer(1)
    ca = CertificateAuthority.create("signer.test")
    await signer.issue_agent(ca, new_key_and_csr()[1], identity(0), HOUR)
    (helper,) = signer.helper_pids()
    await signer.close()
    await wait_ended(helper)
    key, csr = new_key_and_csr()
    check_issued(await signer.issue_agent(ca, csr, identity(2), HOUR), ca, key, 2)
    assert signer.helper_pids() == []


HELPER_LEFT_BEHIND = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from datetime import timedelta
    from testhide.agent.credentials import new_key_and_csr
    from testhide.common.identity import AgentIdentity
    from testhide.controlplane.ca.authority import CertificateAuthority
    from testhide.controlplane.ca.signer import Signer

    async def main():
        signer = Signer(1)
        who = AgentIdentity("signer.test", "default", "default", "a" * 16)
        ca = CertificateAuthority.create("signer.test")
        await signer.issue_agent(ca, new_key_and_csr()[1], who, timedelta(hours=1))
        print(signer.helper_pids()[0], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no shutdown, no exit handler

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


async def test_a_helper_ends_with_a_control_plane_that_was_killed(tmp_path: Path) -> None:
    program = tmp_path / "killed_controlplane.py"
    program.write_text(HELPER_LEFT_BEHIND)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(program),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 120)
    assert await asyncio.wait_for(process.wait(), DEATH_S) == -signal.SIGKILL
    await wait_ended(int(line))


async def test_the_control_plane_enrolls_and_renews_through_its_helper_and_stops_it(tmp_path: Path) -> None:
    async with control_plane(tmp_path, signing_processes=1) as cp:
        assert cp.daemon.signer is not None
        assert cp.daemon.signer.helper_pids() == []  # none until a certificate is wanted
        credentials = Credentials.load(await enrolled(cp, tmp_path))
        (enrolling,) = cp.daemon.signer.helper_pids()
        key_pem, csr_pem = new_key_and_csr()
        async with stream_of(cp, credentials) as call:
            await call.write(renew(csr_pem))
            renewed = (await answer(call)).renewed
        certificate = x509.load_pem_x509_certificate(renewed.certificate_pem)
        assert AgentIdentity.from_certificate(certificate) == AgentIdentity.from_certificate(
            credentials.certificate
        )
        assert certificate.public_key() == serialization.load_pem_private_key(key_pem, None).public_key()
        assert cp.daemon.signer.helper_pids() == [enrolling]
    await wait_ended(enrolling)
