"""Renewal: a new certificate for the identity an agent already holds, signed
from its CSR, recorded with its audit entry before anyone sees it.

Renewals come in waves (a fleet started together renews together), and one
store transaction each (two, with the audit entry) made the store's writer the
bottleneck. So they are recorded in groups (group commit): whatever arrives
while one transaction runs goes into the next, one transaction and one audit
append for the lot; a renewal alone is written at once, as before. A caller is
answered only once the transaction holding its certificate has committed; if
that transaction fails, every renewal in it fails with the same error.

For the same reason, renewals of one pool asking for its certificate lifetime
at the same time share one store read, and what every renewal under the same
certificate material sends back (the CA bundle, the issuer's fingerprint) is
computed once per material, not once per renewal. The certificates themselves
are signed off the event loop, in batches (ca/signer.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import hashes

from testhide.common.identity import AgentIdentity
from testhide.controlplane.auth.audit import AuditEvent, Auditor
from testhide.controlplane.ca.enrollment import certificate_lifetime
from testhide.controlplane.ca.signer import Signer
from testhide.controlplane.ca.store import AgentStore, CertificateRenewal
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.datadir import TlsMaterial
from testhide.controlplane.errors import PermissionDenied

MAX_BATCH = 256
"""Renewals in one transaction at most: bounds how long the store's writer is held."""

RENEWED = "agent_certificate_renewed"


@dataclass(frozen=True)
class Renewed:
    certificate_pem: bytes
    ca_bundle_pem: bytes
    serial: str
    not_after: datetime


@dataclass(frozen=True)
class _Issuing:
    """What every renewal under one certificate material shares."""

    material: TlsMaterial
    bundle_pem: bytes
    issuer: str
    """The active CA's fingerprint, as the agent's row records it."""

    @classmethod
    def of(cls, material: TlsMaterial) -> _Issuing:
        issuer = material.active_ca.certificate.fingerprint(hashes.SHA256()).hex()
        return cls(material, material.bundle_pem, issuer)


class Renewals:
    def __init__(
        self,
        store: AgentStore,
        certs: CertificateState,
        cert_ttl: timedelta,
        auditor: Auditor,
        signer: Signer | None = None,
    ) -> None:
        self._store = store
        self._signer = signer or Signer()
        self._certs = certs
        self._cert_ttl = cert_ttl
        self._log = RenewalLog(store, auditor)
        self._issuing = _Issuing.of(certs.current)
        self._lifetime_reads: dict[tuple[str, str], asyncio.Future[timedelta]] = {}

    async def renew(self, identity: AgentIdentity, csr_pem: bytes, source_ip: str = "") -> Renewed:
        """For an agent already authenticated (and not revoked) by its current certificate."""
        if self._issuing.material is not self._certs.current:  # rotated since
            self._issuing = _Issuing.of(self._certs.current)
        issuing = self._issuing
        ca = issuing.material.active_ca
        lifetime = await self._lifetime(identity.org, identity.pool)
        issued = await self._signer.issue_agent(ca, csr_pem, identity, lifetime)
        serial = format(issued.serial, "x")
        details = {"serial": serial, "not_after": issued.not_after.isoformat()}
        event = AuditEvent(
            RENEWED, f"agent:{identity.agent_id}", identity.org, identity.agent_id, details, source_ip
        )
        await self._log.record(
            CertificateRenewal(
                identity.org,
                identity.agent_id,
                serial,
                issued.not_after,
                issuing.issuer,
                event,
            )
        )
        return Renewed(issued.certificate_pem, issuing.bundle_pem, serial, issued.not_after)

    async def _lifetime(self, org: str, pool: str) -> timedelta:
        """The pool's certificate lifetime. Renewals asking while a read for their pool
        is under way join it: a read that started a moment before they asked, as if
        they had asked a moment earlier (a lifetime changed meanwhile applies from the
        next read on). A caller that goes away does not cancel the read for the others."""
        key = (org, pool)
        read = self._lifetime_reads.get(key)
        if read is None:
            read = asyncio.ensure_future(certificate_lifetime(self._store, org, pool, self._cert_ttl))
            self._lifetime_reads[key] = read
            read.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(read)

    def _read_done(self, key: tuple[str, str], read: asyncio.Future[timedelta]) -> None:
        del self._lifetime_reads[key]
        if not read.cancelled():
            read.exception()  # retrieved: its callers hear it; if all went away, nobody must


class RenewalLog:
    """The group commit. One writer task at a time, started by the first renewal
    to find none running, ending when nothing is left: no task to manage, and a
    caller that goes away (its deadline passed) never strands the others."""

    def __init__(self, store: AgentStore, auditor: Auditor, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._auditor = auditor
        self._max_batch = max_batch
        self._waiting: list[tuple[CertificateRenewal, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, renewal: CertificateRenewal) -> None:
        """Returns once ``renewal`` is durable; PermissionDenied if the agent was
        revoked (or removed) before it could be, the store's error if it failed."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((renewal, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        if not await future:
            raise PermissionDenied("this agent has been revoked")

    def _next_batch(self) -> list[tuple[CertificateRenewal, asyncio.Future[bool]]]:
        """The oldest waiting renewals, each agent at most once (a second renewal
        of the same agent goes in the next batch, so the last one asked wins)."""
        batch: list[tuple[CertificateRenewal, asyncio.Future[bool]]] = []
        later: list[tuple[CertificateRenewal, asyncio.Future[bool]]] = []
        agents: set[tuple[str, str]] = set()
        for item in self._waiting:
            key = (item[0].org, item[0].agent_id)
            if len(batch) >= self._max_batch or key in agents:
                later.append(item)
            else:
                agents.add(key)
                batch.append(item)
        self._waiting = later
        return batch

    async def _write(self) -> None:
        batch: list[tuple[CertificateRenewal, asyncio.Future[bool]]] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                try:
                    recorded = await self._store.record_agent_renewals(
                        [renewal for renewal, _ in batch], self._auditor.chain
                    )
                except Exception as exc:  # every caller of the batch hears it (StorageUnavailable...)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), done in zip(batch, recorded, strict=True):
                    if not future.done():
                        future.set_result(done)
        finally:
            self._writer = None
            for _, future in batch + self._waiting:  # cancelled (the server stopping): nobody waits forever
                if not future.done():
                    future.cancel()
            self._waiting = []
