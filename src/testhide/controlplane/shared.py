"""A data dir's shared files, kept in step across the copies of a replicated
data dir (PostgreSQL store).

A copy of the data dir is all another machine needs to run a replica; after
that, what any copy rotates (the CA, the server certificate, the token signing
keys, the master key's re-sealing) reaches the others through the database:

- **shared files** are everything in the data dir but the local ones
  (``master.key``, ``database.url``, ``run/``, locks, the SQLite file): the
  state, certificates and sealed keys that the daemons read from disk;
- ``publish`` writes those a copy changed since it last synced (by content
  digest) into ``shared_files``, each **sealed under the master key** with its
  name as associated data, so the database never holds a usable private key
  and a row changed or swapped there fails to open instead of planting a CA;
- ``pull`` writes what changed in the database since the copy's last version
  into the copy (atomically, under the sealing lock); the daemons' reload
  logic then picks it up as it picks up a local rotation.

Concurrent rotations of the same file on two copies: the later publish wins
and the other copy follows it on its next pull (each replica's certificate is
valid either way: one CA signs both). The master key itself is never shared:
every copy needs it (or TESTHIDE_MASTER_KEY) to open the rows."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import structlog

from testhide.common.files import atomic_write
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.datadir import BACKUPS_DIR, DATABASE_URL_FILE, DataDir
from testhide.controlplane.errors import IntegrityError
from testhide.controlplane.hsm import KEYRING_FILE

log = structlog.get_logger("testhide.shared")

LOCAL_ONLY = frozenset(
    {"master.key", KEYRING_FILE, DATABASE_URL_FILE, "testhide.db", "testhide.db-wal", "testhide.db-shm"}
)
"""Never shared: the local secret (or the ring an HSM wraps: its URI names this machine's module
and PIN file), where the database is, and a SQLite file left from before."""
LOCAL_DIRS = frozenset({"run", BACKUPS_DIR})
"""Never shared: what this copy's serves hold (run/), and the backups taken here (backups/: a
pre-migration pg_dump of the database must not go into the database)."""


class SharedFilesStore(Protocol):
    async def shared_version(self) -> int: ...
    async def shared_files(self, since: int) -> list[tuple[str, str, bytes | None, int]]: ...
    async def put_shared_files(self, files: list[tuple[str, str, bytes | None]]) -> int: ...


def _aad(name: str) -> bytes:
    return f"shared:{name}".encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(directory: DataDir) -> dict[str, bytes]:
    """The data dir's shared files by relative name."""
    found: dict[str, bytes] = {}
    for path in sorted(directory.path.rglob("*")):
        relative = path.relative_to(directory.path)
        if not path.is_file() or path.is_symlink():
            continue
        if relative.parts[0] in LOCAL_DIRS or any(part.startswith(".") for part in relative.parts):
            continue
        name = relative.as_posix()
        if name in LOCAL_ONLY or name.endswith((".tmp", ".next")):
            continue
        found[name] = path.read_bytes()
    return found


class SharedFiles:
    def __init__(self, directory: DataDir, master: MasterKey, store: SharedFilesStore) -> None:
        self._directory = directory
        self._master = master
        self._store = store
        self.version = 0
        self._synced: dict[str, str] = {}
        """Name -> digest as of the last pull or publish (what this copy agrees with)."""
        self._reported: set[tuple[str, int]] = set()

    async def start(self) -> bool:
        """At start: take the database's files if it has any (this copy may be
        behind); otherwise this copy's files are the first version. True if
        local files changed."""
        if await self._store.shared_version() == 0:
            await self.publish()
            return False
        return await self.pull()

    async def follow(self) -> bool:
        """``pull`` when the database moved on (one cheap query otherwise)."""
        if await self._store.shared_version() <= self.version:
            return False
        return await self.pull()

    async def pull(self) -> bool:
        """Bring this copy up to the database's version; True if a file changed."""
        rows = await self._store.shared_files(self.version)
        if not rows:
            return False
        changed = False
        root = self._directory.path
        unread = None
        with self._directory.sealing():
            for name, digest, sealed, version in rows:
                try:
                    path = _inside(root, name)
                except IntegrityError as exc:
                    log.error("shared_file_refused", file=name[:200], error=str(exc))
                    continue
                if sealed is None:
                    if path.exists():
                        path.unlink()
                        changed = True
                    self._synced.pop(name, None)
                else:
                    try:
                        data = self._master.unseal(sealed, _aad(name))
                    except IntegrityError as exc:
                        # Sealed under a key this copy lacks yet (a master-key rotation elsewhere),
                        # or tampered with: keep ours, and read it again on the next pull.
                        if (name, version) not in self._reported:
                            self._reported.add((name, version))
                            log.error("shared_file_unreadable", file=name, error=str(exc))
                        unread = version if unread is None else min(unread, version)
                        continue
                    if _digest(data) != digest:
                        log.error("shared_file_digest_mismatch", file=name)
                        continue
                    if not path.exists() or path.read_bytes() != data:
                        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        atomic_write(path, data, 0o600 if name.endswith(".sealed") else 0o644)
                        changed = True
                    self._synced[name] = digest
                self.version = max(self.version, version)
        if unread is not None:
            self.version = min(self.version, unread - 1)
        if changed:
            log.debug("shared_files_pulled", version=self.version)
        return changed

    async def publish(self, everything: bool = False, master: MasterKey | None = None) -> int:
        """Write what this copy changed since it last synced (``everything``: all
        of it, e.g. sealed under a new master key, ``master``); how many files."""
        if master is not None:
            self._master = master
        with self._directory.sealing():
            local = {name: (data, _digest(data)) for name, data in local_files(self._directory).items()}
        files: list[tuple[str, str, bytes | None]] = [
            (name, digest, self._master.seal(data, _aad(name)))
            for name, (data, digest) in sorted(local.items())
            if everything or self._synced.get(name) != digest
        ]
        files += [(name, "", None) for name in sorted(self._synced) if name not in local]
        if not files:
            return 0
        version = await self._store.put_shared_files(files)
        for name, digest, data in files:
            if data is None:
                self._synced.pop(name, None)
            else:
                self._synced[name] = digest
        if self.version == version - 1:
            self.version = version  # nobody else wrote in between: we are at the head
        log.debug("shared_files_published", files=[name for name, _, _ in files], version=version)
        return len(files)


def _inside(root: Path, name: str) -> Path:
    """``name`` below ``root`` and nowhere else (a row names its file)."""
    path = (root / name).resolve()
    if root.resolve() not in path.parents or name in LOCAL_ONLY or Path(name).parts[0] in LOCAL_DIRS:
        raise IntegrityError(f"shared file {name!r} would land outside the data dir's shared files")
    return path
