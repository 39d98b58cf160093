"""Master-key rotation, online: a running ``serve`` keeps working throughout.

    1. add     a new key goes in front of the ring in ``DIR/master.key`` (or in
               ``DIR/keyring.pkcs11``, the ring the HSM wraps again)
    2. wait    until every running serve holds the new ring (each says which
               key ids it holds in ``DIR/run/``; its watcher reloads the file
               within a second), so nothing new is sealed by an old key
    3. sweep   re-wrap every data key in the store and re-seal every sealed
               file under the new key, again until a sweep finds nothing left
    4. drop    the old keys leave the ring

Every step is idempotent and the ring file records how far a rotation got, so
running ``rotate`` again after a crash finishes it: a ring of more than one
key means a rotation is under way. An object that fails authentication under
every key is reported and keeps the old key in the ring (unless forced): no
rotation may be the reason data becomes unreadable.

With the ring in ``TESTHIDE_MASTER_KEY`` this process cannot change what a
running serve was started with: the operator restarts serve with the new key
in front of the old, rotation re-wraps (steps 2 and 3), and the operator
removes the old key from the variable (step 4).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from testhide.common.files import atomic_write, file_lock
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey, sealed_by
from testhide.controlplane.cluster import REPLICA_TIMEOUT
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import FailedPrecondition, IntegrityError
from testhide.controlplane.jobs.secrets import secret_aad
from testhide.controlplane.store.base import DATA_KEY_TABLES, Store, WrappedDataKey
from testhide.controlplane.store.postgres import PgStore

log = structlog.get_logger("testhide.masterkey")

PAGE = 500
HOLDER_TIMEOUT = timedelta(seconds=30)
_POLL_S = 0.1

ENV_HELP = (
    f"the master key comes from {MASTER_KEY_ENV}, which a command cannot change for a running serve. "
    "To rotate it: (1) 'testhide-controlplane master-key generate' prints a new key; (2) restart serve "
    f"with {MASTER_KEY_ENV}=NEW,OLD (new key first); (3) run 'master-key rotate' with that same value: it "
    f"re-wraps everything under NEW; (4) restart serve with {MASTER_KEY_ENV}=NEW."
)


@dataclass(frozen=True)
class RingHolder:
    """A running serve and the key ids it holds, current first."""

    pid: int
    key_ids: tuple[str, ...]


class RingAnnouncement:
    """Published by a serve so rotations know when it holds a new ring."""

    def __init__(self, directory: DataDir, master: MasterKey) -> None:
        self._master = master
        self._path = directory.path / "run" / f"serve-{os.getpid()}-{secrets.token_hex(4)}.json"

    def publish(self) -> None:
        self._path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(
            self._path, json.dumps({"pid": os.getpid(), "key_ids": list(self._master.key_ids)}).encode()
        )

    def withdraw(self) -> None:
        self._path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ring_holders(directory: DataDir) -> list[RingHolder]:
    """Running serves of this data dir; announcements of dead ones are removed."""
    holders = []
    for path in sorted((directory.path / "run").glob("serve-*.json")):
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue
        if not _alive(int(data["pid"])):
            path.unlink(missing_ok=True)
            continue
        holders.append(RingHolder(int(data["pid"]), tuple(data["key_ids"])))
    return holders


async def _lagging(directory: DataDir, store: Store | None, current_id: str) -> list[str]:
    """The running serves that do not seal with ``current_id`` yet: those of this
    data dir (its run/ announcements) and, on PostgreSQL, every live replica of it
    on any machine (their heartbeats say which keys they hold)."""
    lagging = [f"pid {h.pid}" for h in ring_holders(directory) if h.key_ids[:1] != (current_id,)]
    if isinstance(store, PgStore):
        since = datetime.now(UTC) - REPLICA_TIMEOUT
        lagging += [
            f"replica {replica} (pid {pid} on {host})"
            for replica, host, pid, key_ids in await store.replica_key_ids(since)
            if key_ids[:1] != (current_id,)
        ]
    return lagging


async def wait_for_holders(
    directory: DataDir,
    current_id: str,
    holder_timeout: timedelta = HOLDER_TIMEOUT,
    store: Store | None = None,
) -> None:
    """Until every running serve seals with ``current_id``; past ``holder_timeout``, a
    FailedPrecondition that names the serves still on another key."""
    deadline = time.monotonic() + holder_timeout.total_seconds()
    while True:
        lagging = await _lagging(directory, store, current_id)
        if not lagging:
            return
        if time.monotonic() > deadline:
            pids = ", ".join(lagging)
            raise FailedPrecondition(
                f"running serve process(es) {pids} still seal with another key than {current_id} after "
                f"{holder_timeout.total_seconds():.0f}s; if the key comes from {MASTER_KEY_ENV}, restart "
                "them with the new key first. Run rotate again to continue."
            )
        await asyncio.sleep(_POLL_S)


@dataclass(frozen=True)
class Sweep:
    changed: int
    damaged: tuple[str, ...]


def _data_key_aad(key: WrappedDataKey) -> bytes:
    return secret_aad(*key.owner) if key.table == "secrets" else key.owner[0].encode()


async def rewrap_data_keys(store: Store, master: MasterKey) -> Sweep:
    """Re-wrap every data key not under the current key; a row that changed
    meanwhile is left for the next sweep."""
    changed, damaged = 0, []
    for table in DATA_KEY_TABLES:
        after = 0
        while page := await store.data_keys(table, after, PAGE):
            updates = []
            for key in page:
                if master.is_current(key.wrapped):
                    continue
                try:
                    updates.append(
                        (key.rowid, key.wrapped, master.rewrap_data_key(key.wrapped, _data_key_aad(key)))
                    )
                except IntegrityError as exc:
                    damaged.append(f"{table} {'/'.join(key.owner)}: {exc}")
            if updates:
                changed += await store.replace_data_keys(table, updates)
            after = page[-1].rowid
    return Sweep(changed, tuple(damaged))


def reseal_files(directory: DataDir, master: MasterKey) -> Sweep:
    changed, damaged = 0, []
    with directory.sealing():
        for name in directory.sealed_files():
            path = directory.path / name
            sealed = path.read_bytes()
            if master.is_current(sealed):
                continue
            try:
                atomic_write(path, master.reseal(sealed, name.encode()), 0o600)
                changed += 1
            except IntegrityError as exc:
                damaged.append(f"file {name}: {exc}")
    return Sweep(changed, tuple(damaged))


async def census(directory: DataDir, store: Store) -> Counter[str]:
    """How many stored keys and sealed files each master key id seals."""
    counts: Counter[str] = Counter()
    for table in DATA_KEY_TABLES:
        after = 0
        while page := await store.data_keys(table, after, PAGE * 4):
            counts.update(_sealed_by(k.wrapped) for k in page)
            after = page[-1].rowid
    counts.update(_sealed_by((directory.path / name).read_bytes()) for name in directory.sealed_files())
    return counts


def _sealed_by(sealed: bytes) -> str:
    try:
        return sealed_by(sealed)
    except IntegrityError:
        return "malformed"


@dataclass(frozen=True)
class RotationResult:
    new_key_id: str
    retired_key_ids: tuple[str, ...]
    rewrapped: int
    resealed_files: int
    damaged: tuple[str, ...]
    dropped: bool
    """Whether the old keys left the ring (never for a ring from the environment)."""
    seconds: float


@contextmanager
def _exclusive(directory: DataDir) -> Iterator[None]:
    try:
        with file_lock(directory.path / ".rotation.lock", blocking=False):
            yield
    except BlockingIOError as exc:
        raise FailedPrecondition("another master-key rotation is running on this data dir") from exc


def _begin(directory: DataDir, master: MasterKey) -> MasterKey:
    """The ring to rotate to: a rotation under way is resumed."""
    if len(master.key_ids) > 1:
        return master
    if master.source is None:
        raise FailedPrecondition(ENV_HELP)
    ring = master.with_new_current()
    ring.persist()
    log.info("master_key_added", key_id=ring.current_id, retiring=list(ring.key_ids[1:]))
    return ring


async def rotate(
    directory: DataDir,
    store: Store,
    master: MasterKey,
    *,
    force: bool = False,
    holder_timeout: timedelta = HOLDER_TIMEOUT,
    progress: Callable[[str], None] = lambda _: None,
) -> RotationResult:
    started = time.monotonic()
    with _exclusive(directory):
        ring = _begin(directory, master)
        progress(f"new master key {ring.current_id}; retiring {', '.join(ring.key_ids[1:])}")
        await wait_for_holders(directory, ring.current_id, holder_timeout, store)
        rewrapped = resealed = 0
        while True:
            rows, files = await rewrap_data_keys(store, ring), reseal_files(directory, ring)
            rewrapped, resealed = rewrapped + rows.changed, resealed + files.changed
            damaged = rows.damaged + files.damaged
            progress(f"sweep: {rows.changed} data keys re-wrapped, {files.changed} files re-sealed")
            if rows.changed or files.changed:
                continue
            # A serve that started on the old ring and announced late has caught up by now.
            await wait_for_holders(directory, ring.current_id, holder_timeout, store)
            counts = await census(directory, store)
            if sum(n for kid, n in counts.items() if kid != ring.current_id) <= len(damaged):
                break
        dropped = ring.source is not None and (not damaged or force)
        if dropped:
            ring.only_current().persist()
    log.info(
        "master_key_rotated",
        key_id=ring.current_id,
        retired=list(ring.key_ids[1:]),
        rewrapped=rewrapped,
        resealed_files=resealed,
        damaged=len(damaged),
        dropped=dropped,
    )
    return RotationResult(
        ring.current_id, ring.key_ids[1:], rewrapped, resealed, damaged, dropped, time.monotonic() - started
    )


def holders_summary(directory: DataDir) -> list[str]:
    return [f"serve pid {h.pid} holds {', '.join(h.key_ids)}" for h in ring_holders(directory)]
