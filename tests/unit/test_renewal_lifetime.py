"""controlplane/ca/renewal.py's Renewals against a store whose lifetime reads the
test answers by hand: renewals of one pool asking at once share one read, a
caller that goes away does not take the read from the others, a failed read
fails those who shared it only, and a rotated CA is what the next renewal uses."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AGENT_CERT_BACKDATE, AgentIdentity
from testhide.controlplane.auth.audit import AuditChain, Auditor
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.renewal import Renewals
from testhide.controlplane.ca.store import AgentStore, CertificateRenewal
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.datadir import TlsMaterial
from testhide.controlplane.errors import StorageUnavailable
from tests.unit.fakes import MemoryAudit

DEFAULT = timedelta(hours=1)


class LifetimeStore:
    """``pool_cert_ttl`` waits until the test answers it; renewals are recorded at once."""

    def __init__(self) -> None:
        self.reads = 0
        self.read = asyncio.Condition()
        self.answers: asyncio.Queue[timedelta | Exception | None] = asyncio.Queue()
        self.issuers: list[str] = []

    async def pool_cert_ttl(self, org: str, pool: str) -> timedelta | None:
        async with self.read:
            self.reads += 1
            self.read.notify_all()
        answer = await self.answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def record_agent_renewals(
        self, renewals: Sequence[CertificateRenewal], chain: AuditChain
    ) -> list[bool]:
        self.issuers += [r.issuer for r in renewals]
        return [True] * len(renewals)


class Certs:
    def __init__(self) -> None:
        self.current = material()


def material() -> TlsMaterial:
    ca = CertificateAuthority.create("test.local")
    return TlsMaterial(ca, (ca.certificate,), b"", b"")


def renewals(store: LifetimeStore, certs: Certs) -> Renewals:
    auditor = Auditor(MemoryAudit(), b"k" * 32)
    return Renewals(cast(AgentStore, store), cast(CertificateState, certs), DEFAULT, auditor)


def renew(renewing: Renewals, agent: int) -> asyncio.Task[x509.Certificate]:
    async def run() -> x509.Certificate:
        identity = AgentIdentity("test.local", "acme", "pool", f"a{agent:016x}")
        renewed = await renewing.renew(identity, new_key_and_csr()[1])
        return x509.load_pem_x509_certificate(renewed.certificate_pem)

    return asyncio.create_task(run())


def lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


async def reading(store: LifetimeStore, reads: int) -> None:
    async with asyncio.timeout(5), store.read:
        await store.read.wait_for(lambda: store.reads >= reads)


async def test_renewals_of_a_pool_asking_at_once_share_one_read_and_later_ones_read_again() -> None:
    store = LifetimeStore()
    renewing = renewals(store, Certs())
    wave = [renew(renewing, i) for i in range(5)]
    await reading(store, 1)
    await store.answers.put(timedelta(minutes=10))
    certs = await asyncio.gather(*wave)
    assert store.reads == 1
    assert {lifetime(c) for c in certs} == {timedelta(minutes=10) + AGENT_CERT_BACKDATE}
    later = renew(renewing, 9)
    await reading(store, 2)
    await store.answers.put(None)  # the pool's own lifetime was lifted meanwhile
    assert lifetime(await later) == DEFAULT + AGENT_CERT_BACKDATE


async def test_a_caller_that_goes_away_leaves_the_read_to_the_others() -> None:
    store = LifetimeStore()
    renewing = renewals(store, Certs())
    leaving, staying = renew(renewing, 1), renew(renewing, 2)
    await reading(store, 1)
    leaving.cancel()
    await store.answers.put(timedelta(minutes=10))
    assert lifetime(await staying) == timedelta(minutes=10) + AGENT_CERT_BACKDATE
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_a_failed_read_fails_those_who_shared_it_and_the_next_renewal_reads_again() -> None:
    store = LifetimeStore()
    renewing = renewals(store, Certs())
    wave = [renew(renewing, i) for i in range(3)]
    await reading(store, 1)
    await store.answers.put(StorageUnavailable("the store is down"))
    outcomes = await asyncio.gather(*wave, return_exceptions=True)
    assert all(isinstance(o, StorageUnavailable) for o in outcomes)
    later = renew(renewing, 9)
    await reading(store, 2)
    await store.answers.put(None)
    assert lifetime(await later) == DEFAULT + AGENT_CERT_BACKDATE


async def test_a_renewal_after_a_rotation_is_signed_and_recorded_by_the_new_ca() -> None:
    store, certs = LifetimeStore(), Certs()
    renewing = renewals(store, certs)
    old_ca = certs.current.active_ca.certificate
    before = renew(renewing, 1)
    await store.answers.put(None)
    assert (await before).issuer == old_ca.subject
    certs.current = material()
    new_ca = certs.current.active_ca.certificate
    after = renew(renewing, 2)
    await store.answers.put(None)
    cert = await after
    cert.verify_directly_issued_by(new_ca)
    assert store.issuers == [ca.fingerprint(hashes.SHA256()).hex() for ca in (old_ca, new_ca)]
