"""Agent certificates signed off the event loop, in helper processes.

The CA's work for one certificate (the CSR's signature checked, the
certificate built and signed: ~0.45 ms here) holds the GIL, as cryptography
does not release it: a thread would not help, and on the event loop a fleet
enrolling or renewing together (10,000 agents: ~4.5 s of signing) stalls every
stream and call meanwhile. So the control plane signs in ``processes`` helper
processes (started when first needed, ended with it), in batches: what arrives
while every helper is busy goes in the next batch, one message each way for the
lot (group signing, as renewals are group-committed: ca/renewal.py). With 0
processes (a single-core host, or ``--signing-processes 0``) it signs on the
event loop, as before.

The CA's key goes to a helper over its pipe with each batch (it keeps the last
CA it loaded): a helper holds nothing the control plane's process does not,
runs as the same user, and reads nothing else. A helper that dies (killed,
out of memory) costs time, not renewals: its batch is signed on the event loop
and the next one starts a new helper. A bad CSR fails its own request only,
with InvalidArgument, never the others of its batch. Where no helper can be
started at all, the control plane says so once and signs on the event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import timedelta

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from testhide.common.identity import AgentIdentity
from testhide.common.orphans import end_with
from testhide.controlplane.ca.authority import CertificateAuthority, IssuedCertificate
from testhide.controlplane.errors import InvalidArgument

log = structlog.get_logger("testhide.controlplane.ca.signer")

MAX_BATCH = 256
"""Certificates in one batch at most: bounds how long a helper holds one caller's answer."""


def default_processes() -> int:
    """A helper for each core but one, up to 4; none on a single core (it would only add a hop)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class _Request:
    csr_pem: bytes
    identity: AgentIdentity
    lifetime: timedelta


def _helper_started(parent: int) -> None:
    """In a new helper: end with the control plane, however it ends (a helper left behind
    would hold the CA's key with nobody to answer). A helper waits on a pipe that it holds
    both ends of, so the parent's death alone would not wake it: the kernel's parent-death
    signal does. It comes when the thread that started the helper ends: helpers are started
    by ``submit`` on the event loop's thread, which lives as long as the control plane."""
    end_with(parent)


_Refused = tuple[bool, str]
"""A request that got no certificate: (whether its CSR was at fault, what was wrong)."""


_loaded: dict[bytes, CertificateAuthority] = {}
"""In a helper: the CA it last loaded, by certificate."""


def _sign_batch(
    certificate_pem: bytes, key_pem: bytes, trust_domain: str, requests: list[_Request]
) -> tuple[int, list[IssuedCertificate | _Refused]]:
    """In a helper: its pid, and each request's certificate or why it got none."""
    ca = _loaded.get(certificate_pem)
    if ca is None:
        key = load_pem_private_key(key_pem, password=None)
        # The CA's own key, as CertificateAuthority made it.
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ca = CertificateAuthority(x509.load_pem_x509_certificate(certificate_pem), key, trust_domain)
        _loaded.clear()
        _loaded[certificate_pem] = ca
    return os.getpid(), _sign_with(ca, requests)


def _sign_with(ca: CertificateAuthority, requests: list[_Request]) -> list[IssuedCertificate | _Refused]:
    """Each request on its own: one that fails, for whatever reason, fails alone."""
    signed: list[IssuedCertificate | _Refused] = []
    for request in requests:
        try:
            signed.append(ca.issue_agent(request.csr_pem, request.identity, request.lifetime))
        except InvalidArgument as exc:
            signed.append((True, str(exc)))
        except Exception as exc:  # reported to its caller alone, as on the event loop
            signed.append((False, repr(exc)))
    return signed


_Waiting = tuple[CertificateAuthority, _Request, "asyncio.Future[IssuedCertificate]"]


class Signer:
    def __init__(self, processes: int = 0, max_batch: int = MAX_BATCH) -> None:
        self.processes = processes
        self._max_batch = max_batch
        self._pool: ProcessPoolExecutor | None = None
        self._waiting: list[_Waiting] = []
        self._busy = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._ca_pems: tuple[CertificateAuthority, bytes, bytes] | None = None
        self._closed = False
        self._pids: set[int] = set()
        self._unavailable = False
        """No helper could be started (and none will be): everything is signed here."""

    async def issue_agent(
        self, ca: CertificateAuthority, csr_pem: bytes, identity: AgentIdentity, lifetime: timedelta
    ) -> IssuedCertificate:
        """``ca.issue_agent``, in a helper when there is one."""
        if not self.processes or self._closed or self._unavailable:
            return ca.issue_agent(csr_pem, identity, lifetime)
        future: asyncio.Future[IssuedCertificate] = asyncio.get_running_loop().create_future()
        self._waiting.append((ca, _Request(csr_pem, identity, lifetime), future))
        self._start_batches()
        return await future

    def helper_pids(self) -> list[int]:
        """The current helpers that have signed (for CPU accounting and tests)."""
        return sorted(self._pids)

    def _start_batches(self) -> None:
        while self._waiting and self._busy < self.processes:
            # Spread what waits over the free helpers; each batch under one CA.
            size = min(self._max_batch, -(-len(self._waiting) // (self.processes - self._busy)))
            ca = self._waiting[0][0]
            batch: list[_Waiting] = []
            rest: list[_Waiting] = []
            for item in self._waiting:
                (batch if item[0] is ca and len(batch) < size else rest).append(item)
            self._waiting = rest
            self._busy += 1
            task = asyncio.create_task(self._sign(ca, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _sign(self, ca: CertificateAuthority, batch: list[_Waiting]) -> None:
        requests = [request for _, request, _ in batch]
        try:
            signed = await self._in_helper(ca, requests)
            for (_, _, future), result in zip(batch, signed, strict=True):
                if future.done():  # its caller went away
                    continue
                if isinstance(result, IssuedCertificate):
                    future.set_result(result)
                elif result[0]:
                    future.set_exception(InvalidArgument(result[1]))
                else:
                    future.set_exception(RuntimeError(f"signing failed: {result[1]}"))
        except BaseException as exc:  # every caller of the batch hears it; cancelled: the server stops
            for _, _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            if not self._closed:
                self._start_batches()

    async def _in_helper(
        self, ca: CertificateAuthority, requests: list[_Request]
    ) -> list[IssuedCertificate | _Refused]:
        """Signed by a helper, or here if it died (or none can be started)."""
        if self._unavailable:
            return _sign_with(ca, requests)
        try:
            pool = self._helpers()
        except OSError as exc:  # no process or semaphore to be had (a container without /dev/shm...)
            log.warning("certificate_helpers_unavailable", error=repr(exc), note="signing on the event loop")
            self._unavailable = True
            return _sign_with(ca, requests)
        try:
            pid, signed = await asyncio.wrap_future(pool.submit(_sign_batch, *self._pems(ca), requests))
        except (BrokenProcessPool, OSError) as exc:
            log.warning("certificate_helper_failed", error=repr(exc), batch=len(requests), note="signed here")
            self._drop_pool(pool)
            return _sign_with(ca, requests)
        self._pids.add(pid)
        return signed

    def _pems(self, ca: CertificateAuthority) -> tuple[bytes, bytes, str]:
        if self._ca_pems is None or self._ca_pems[0] is not ca:
            self._ca_pems = (ca, ca.certificate_pem, ca.key_pem())
        return self._ca_pems[1], self._ca_pems[2], ca.trust_domain

    def _helpers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, never fork: a forked copy of a process running gRPC's threads is not safe.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=context, initializer=_helper_started, initargs=(os.getpid(),)
            )
        return self._pool

    def _drop_pool(self, pool: ProcessPoolExecutor) -> None:
        """A broken pool is replaced once: batches still out on it fail alike, and must not
        take down the new pool that an earlier one's failure started."""
        if self._pool is pool:
            self._pool = None
            self._pids.clear()
            pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        """Stop the helpers; callers still waiting are cancelled, later ones sign here."""
        self._closed = True
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        for _, _, future in self._waiting:
            future.cancel()
        self._waiting = []
        self._pids.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
