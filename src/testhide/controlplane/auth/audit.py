"""The audit log: append-only, each entry chained to the previous one by an
HMAC under the audit key, and a MAC'd head recording the last entry. Editing,
deleting, reordering or truncating entries breaks the chain or the head;
forging a consistent chain needs the audit key, which is kept sealed under the
master key (``DIR/audit.key.sealed``), so master-key rotation re-seals it and
never touches the chain. Data dirs made before it existed derived the key from
the master key; that derived key becomes their audit key on first open.

Operators who want protection against an attacker holding the master key
export the log (``audit export``) and keep the head elsewhere."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from testhide.controlplane.auth.store import AuditStore

log = structlog.get_logger("testhide.audit")
GENESIS = b"\x00" * 32


@dataclass(frozen=True)
class AuditEvent:
    action: str
    actor: str
    org: str = ""
    target: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    source_ip: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    event: AuditEvent
    prev_hash: bytes
    hash: bytes

    def as_json(self) -> dict[str, Any]:
        e = self.event
        return {
            "seq": self.seq,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "org": e.org,
            "action": e.action,
            "target": e.target,
            "details": e.details,
            "source_ip": e.source_ip,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


def canonical(seq: int, event: AuditEvent) -> bytes:
    return json.dumps(
        [
            seq,
            event.at.isoformat(),
            event.actor,
            event.org,
            event.action,
            event.target,
            event.details,
            event.source_ip,
        ],
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def legacy_audit_key(master_key_material: bytes) -> bytes:
    """The audit key of data dirs made before it was stored on its own."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"testhide audit chain v1").derive(
        master_key_material
    )


class AuditChain:
    """The keyed hashing of the chain; storage is the store's business."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def entry(self, seq: int, prev_hash: bytes, event: AuditEvent) -> AuditEntry:
        digest = hmac.new(self._key, prev_hash + canonical(seq, event), hashlib.sha256).digest()
        return AuditEntry(seq, event, prev_hash, digest)

    def head_mac(self, seq: int, head_hash: bytes) -> bytes:
        return hmac.new(self._key, b"head:" + str(seq).encode() + b":" + head_hash, hashlib.sha256).digest()

    def verify(self, entries: Iterable[AuditEntry], head: tuple[int, bytes, bytes] | None) -> list[str]:
        """Every problem found, in order; empty means intact."""
        problems: list[str] = []
        expected_seq, prev = 1, GENESIS
        for stored in entries:
            if stored.seq != expected_seq:
                problems.append(f"entry {expected_seq} is missing (found {stored.seq} next)")
            if stored.prev_hash != prev:
                problems.append(
                    f"entry {stored.seq} does not follow the entry before it (reordered or removed)"
                )
            recomputed = self.entry(stored.seq, stored.prev_hash, stored.event)
            if not hmac.compare_digest(recomputed.hash, stored.hash):
                problems.append(f"entry {stored.seq} was altered")
            expected_seq, prev = stored.seq + 1, stored.hash
        last_seq = expected_seq - 1
        if head is None:
            if last_seq:
                problems.append("the audit head is missing")
        else:
            seq, head_hash, mac = head
            if not hmac.compare_digest(mac, self.head_mac(seq, head_hash)):
                problems.append("the audit head was altered")
            elif seq != last_seq or head_hash != prev:
                problems.append(
                    f"the log ends at entry {last_seq} but the head records entry {seq} "
                    "(entries removed from the end)"
                )
        return problems


class Auditor:
    """Records privileged actions; every caller goes through here."""

    def __init__(self, store: AuditStore, key: bytes) -> None:
        self._store = store
        self._chain = AuditChain(key)

    @property
    def chain(self) -> AuditChain:
        """For a store transaction that appends its entries along with its own writes
        (``AgentStore.record_agent_renewals``): both commit, or neither."""
        return self._chain

    async def record(
        self, action: str, actor: str, *, org: str = "", target: str = "", source_ip: str = "", **details: Any
    ) -> AuditEntry:
        return await self._store.append_audit(
            AuditEvent(action, actor, org, target, details, source_ip), self._chain
        )

    async def verify(self) -> tuple[list[AuditEntry], list[str]]:
        entries, head = await self._store.read_audit()
        return entries, self._chain.verify(entries, head)
