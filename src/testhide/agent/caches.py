"""The agent's caches (``--cache KEY``): what a job's fetch step downloaded,
kept on this host so that the next job of the same org, pool and key skips
the download. Each is a Docker volume of its own (``cache_volumes.py``).

The index (``caches.json`` in the data dir, 0600, replaced atomically) says
which volume is the cache of each (org, pool, key), its size and when it was
last used; the volumes' labels rebuild it when it is missing or damaged (per
identity the newest volume wins: after the index was lost, a volume whose
fetch step a crash cut short may be taken for a cache). A volume with the
cache labels that the index does not name is a miss being filled, or one a
crash left: ``keep`` removes those no job of this process uses.

After a miss is kept, the least recently used caches are removed until the
total is within ``max_bytes``; a cache a job is using (pinned) is never
removed, and one larger than ``max_bytes`` alone is not kept at all. Two jobs
missing one key at once each fill their own volume; the later ``keep`` wins
and the other volume goes at its ``release``.

One asyncio lock orders this process's changes; a file lock beside the index
orders them with ``testhide-agent caches clear``, which cannot see this
process's pins: it removes only volumes Docker says no container uses, and
leaves alone a volume no entry names for ``UNKEPT_GRACE`` after it was made
(the agent may be filling it, between two containers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import docker.errors
import structlog

from testhide.agent.cache_volumes import (
    CACHE_MOUNT,
    CacheEntry,
    CacheVolumes,
    Identity,
    Removal,
    check_key,
)
from testhide.agent.errors import JobSetupError, RuntimeUnavailable
from testhide.agent.runtime.docker import engine
from testhide.common.files import atomic_write, file_lock
from testhide.common.sizes import describe_size

__all__ = [
    "CACHE_MOUNT",
    "CacheEntry",
    "CacheLease",
    "Caches",
    "ClearReport",
    "check_key",
    "choose_evictions",
]

log = structlog.get_logger("testhide.agent.caches")

INDEX_VERSION = 1
UNKEPT_GRACE = timedelta(minutes=10)
"""``clear`` leaves a volume no index entry names alone this long: the agent (another
process, whose pins it cannot see) may be filling it, between two containers."""


@dataclass(frozen=True)
class CacheLease:
    """A cache a job is using, pinned until ``Caches.release``."""

    org: str
    pool: str
    key: str
    volume: str
    """Mount at /cache (``no_copy``)."""
    hit: bool
    """True: restored, skip the fetch step. False: a fresh empty volume for the fetch step to fill."""

    @property
    def identity(self) -> Identity:
        return (self.org, self.pool, self.key)


@dataclass(frozen=True)
class ClearReport:
    removed: tuple[CacheEntry, ...]
    skipped: tuple[CacheEntry, ...]
    """In use: by a job of this process, or, as Docker says, by a container."""

    @property
    def removed_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.removed)


def choose_evictions(
    entries: Sequence[CacheEntry], max_bytes: int, pinned: Container[str]
) -> list[CacheEntry]:
    """The caches to remove, least recently used first, until the rest fit in
    ``max_bytes``; a pinned volume is never chosen (the rest may then not fit)."""
    total = sum(entry.size_bytes for entry in entries)
    chosen: list[CacheEntry] = []
    for entry in sorted(entries, key=lambda e: (e.last_used_at, e.created_at, e.volume)):
        if total <= max_bytes:
            break
        if entry.volume not in pinned:
            chosen.append(entry)
            total -= entry.size_bytes
    return chosen


def _now() -> datetime:
    return datetime.now(UTC)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class _Index:
    entries: dict[Identity, CacheEntry] = field(default_factory=dict)
    changed: bool = False

    def volumes(self) -> set[str]:
        return {entry.volume for entry in self.entries.values()}

    def put(self, entry: CacheEntry) -> None:
        self.entries[entry.identity] = entry
        self.changed = True

    def drop(self, identity: Identity) -> None:
        if self.entries.pop(identity, None) is not None:
            self.changed = True


class Caches:
    """The caches of agent ``owner`` on ``client``'s engine, indexed at ``index_path``."""

    def __init__(
        self,
        client: docker.DockerClient,
        index_path: Path,
        max_bytes: int,
        owner: str,
        job_user: str,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._volumes = CacheVolumes(client, owner, job_user)
        self._path = index_path
        self._max = max_bytes
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pins: Counter[str] = Counter()

    # -- the executor's interface --------------------------------------------------------------

    async def acquire(self, org: str, pool: str, key: str) -> CacheLease:
        """The cache of (org, pool, key), pinned until ``release``: a hit (its
        last use is now), or a fresh empty volume for the fetch step to fill."""
        check_key(key)
        if not org or not pool:
            raise ValueError("a cache needs an org and a pool")
        async with self._lock:
            # Shielded: a job canceled meanwhile must not leave a volume pinned for ever.
            setup = asyncio.ensure_future(engine(self._acquire, (org, pool, key)))
            try:
                return await asyncio.shield(setup)
            except (docker.errors.DockerException, OSError) as exc:
                explanation = getattr(exc, "explanation", None) or exc
                raise JobSetupError(f"could not set up cache {key!r}: {explanation}") from exc
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await self._unpin(await setup, kept=False)
                raise

    async def keep(self, lease: CacheLease) -> str:
        """After a fetch step that filled a miss: make it the key's cache (the one
        before, filled concurrently, goes once unpinned), then evict the least
        recently used. Returns "" or one line for the job's log: not kept (too
        big, or Docker failed: the job goes on without it), or what was evicted."""
        if lease.hit:
            return ""
        async with self._lock:
            try:
                return await engine(self._keep, lease)
            except (docker.errors.DockerException, OSError) as exc:
                explanation = getattr(exc, "explanation", None) or exc
                log.warning("cache_not_kept", key=lease.key, volume=lease.volume, error=str(explanation))
                return f"cache {lease.key} not kept: {explanation}"

    async def release(self, lease: CacheLease, kept: bool) -> None:
        """Unpin; a volume that is no key's cache (a miss not kept, a cache
        replaced meanwhile) is removed once no job of this process uses it."""
        async with self._lock:
            await self._unpin(lease, kept)

    async def _unpin(self, lease: CacheLease, kept: bool) -> None:
        self._pins[lease.volume] -= 1
        if self._pins[lease.volume] > 0:
            return
        del self._pins[lease.volume]
        try:
            await engine(self._release, lease, kept)
        except (RuntimeUnavailable, docker.errors.DockerException, OSError) as exc:
            # Left for the next keep, which removes volumes no index entry names.
            log.warning("cache_volume_not_removed", volume=lease.volume, error=str(exc))

    async def entries(self) -> list[CacheEntry]:
        """Every cache of this agent, most recently used first."""
        async with self._lock:
            return await engine(self._entries)

    async def clear(
        self, org: str | None = None, pool: str | None = None, key: str | None = None
    ) -> tuple[int, int]:
        """Remove the caches matching every filter given (all when none): (count, bytes)."""
        report = await self.clear_report(org, pool, key)
        return len(report.removed), report.removed_bytes

    async def clear_report(
        self, org: str | None = None, pool: str | None = None, key: str | None = None
    ) -> ClearReport:
        """``clear``, saying which caches were removed and which were in use."""
        async with self._lock:
            return await engine(self._clear, (org, pool, key))

    # -- in a worker thread, under the lock ----------------------------------------------------

    def _acquire(self, identity: Identity) -> CacheLease:
        with self._index() as index:
            entry = index.entries.get(identity)
            if entry is not None and self._volumes.is_cache_of(entry.volume, identity):
                index.put(replace(entry, last_used_at=self._clock()))
                self._pins[entry.volume] += 1
                log.info("cache_hit", org=identity[0], pool=identity[1], key=identity[2], volume=entry.volume)
                return CacheLease(*identity, volume=entry.volume, hit=True)
            if entry is not None:
                log.warning("cache_volume_missing", volume=entry.volume, key=identity[2])
                index.drop(identity)
            volume = self._volumes.create(identity)
            self._pins[volume] += 1
            log.info("cache_miss", org=identity[0], pool=identity[1], key=identity[2], volume=volume)
            return CacheLease(*identity, volume=volume, hit=False)

    def _keep(self, lease: CacheLease) -> str:
        if not self._volumes.is_cache_of(lease.volume, lease.identity):
            return f"cache {lease.key} not kept: its volume was removed meanwhile"
        size = self._volumes.size_of(lease.volume)
        if size > self._max:
            log.warning("cache_not_kept", key=lease.key, size_bytes=size, max_bytes=self._max)
            return (
                f"cache {lease.key} ({describe_size(size)}) is larger than the agent's "
                f"--cache-max ({describe_size(self._max)}): not kept"
            )
        with self._index() as index:
            now = self._clock()
            previous = index.entries.get(lease.identity)
            index.put(CacheEntry(*lease.identity, lease.volume, size, now, now))
            if previous is not None and previous.volume != lease.volume and not self._pins[previous.volume]:
                self._volumes.remove(previous.volume)
            evicted = self._evict(index)
            self._remove_unnamed(index.volumes())
        log.info("cache_kept", key=lease.key, volume=lease.volume, size_bytes=size, evicted=len(evicted))
        if not evicted:
            return ""
        return (
            f"evicted {_plural(len(evicted), 'least recently used cache')} "
            f"({describe_size(sum(e.size_bytes for e in evicted))}) to stay within the agent's "
            f"--cache-max ({describe_size(self._max)})"
        )

    def _evict(self, index: _Index) -> list[CacheEntry]:
        """Remove LRU caches until the rest fit; one Docker says is in use stays."""
        evicted: list[CacheEntry] = []
        refused: set[str] = set()
        while chosen := choose_evictions(
            list(index.entries.values()), self._max, self._pins.keys() | refused
        ):
            for entry in chosen:
                if self._volumes.remove(entry.volume) is Removal.IN_USE:
                    refused.add(entry.volume)
                    continue
                index.drop(entry.identity)
                evicted.append(entry)
                log.info("cache_evicted", key=entry.key, volume=entry.volume, size_bytes=entry.size_bytes)
        return evicted

    def _release(self, lease: CacheLease, kept: bool) -> None:
        with self._index() as index:
            entry = index.entries.get(lease.identity)
            if not lease.hit and not kept and entry is not None and entry.volume == lease.volume:
                index.drop(lease.identity)
            if lease.volume not in index.volumes():
                self._volumes.remove(lease.volume)

    def _entries(self) -> list[CacheEntry]:
        with self._index() as index:
            return sorted(index.entries.values(), key=lambda e: e.last_used_at, reverse=True)

    def _clear(self, filters: tuple[str | None, str | None, str | None]) -> ClearReport:
        def wanted(identity: Identity) -> bool:
            return all(
                given is None or given == value for given, value in zip(filters, identity, strict=True)
            )

        removed: list[CacheEntry] = []
        skipped: list[CacheEntry] = []
        with self._index() as index:
            named, made_before = index.volumes(), self._clock() - UNKEPT_GRACE
            unnamed = [
                e
                for e in self._volumes.labeled_entries(self._clock())
                if e.volume not in named and e.created_at < made_before
            ]
            for entry in [*index.entries.values(), *unnamed]:
                if not wanted(entry.identity):
                    continue
                outcome = Removal.IN_USE if self._pins[entry.volume] else self._volumes.remove(entry.volume)
                if outcome is Removal.IN_USE:
                    skipped.append(entry)
                    continue
                if index.entries.get(entry.identity) == entry:
                    index.drop(entry.identity)
                if outcome is Removal.REMOVED:
                    removed.append(entry)
        return ClearReport(tuple(removed), tuple(skipped))

    # -- the index -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _index(self) -> Iterator[_Index]:
        """The index, read under the file lock; written back (atomically, 0600) if changed."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._path.with_name(self._path.name + ".lock")):
            index = self._read()
            yield index
            if index.changed:
                document = {"version": INDEX_VERSION, "caches": [e.to_json() for e in index.entries.values()]}
                atomic_write(self._path, json.dumps(document, indent=2).encode() + b"\n", 0o600)

    def _read(self) -> _Index:
        try:
            raw = json.loads(self._path.read_bytes())
            if raw.get("version") != INDEX_VERSION:
                raise ValueError(f"unknown version {raw.get('version')!r}")
            found = [CacheEntry.from_json(item) for item in raw["caches"]]
            return _Index({entry.identity: entry for entry in found})
        except FileNotFoundError:
            return self._rebuild("missing")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._rebuild(f"unreadable: {exc}")

    def _rebuild(self, why: str) -> _Index:
        """The index the volumes' labels give: per identity, its newest volume."""
        index = _Index(changed=True)
        for entry in sorted(self._volumes.labeled_entries(self._clock()), key=lambda e: e.created_at):
            index.put(entry)
        if index.entries or why != "missing":
            log.warning("cache_index_rebuilt", path=str(self._path), why=why, caches=len(index.entries))
        return index

    def _remove_unnamed(self, named: set[str]) -> None:
        """Cache volumes no index entry names and no job of this process uses: crash leftovers."""
        for volume in self._volumes.labeled():
            unused = volume.name not in named and not self._pins[volume.name]
            if unused and self._volumes.remove(volume.name) is Removal.REMOVED:
                log.info("cache_leftover_removed", volume=volume.name)
