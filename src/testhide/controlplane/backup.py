"""Backup and restore of a data dir, online and consistent.

A backup is a tar stream of the data dir, encrypted with ``backupfile``: the
database as one SQLite online-backup snapshot, and every other file of the
data dir (certificates, sealed keys, state) copied under the sealing lock so
that no rotation is half in it. The master key is never inside: restoring
needs it, given the usual way. A ring that an HSM wraps travels in the
backup's header as the HSM wrapped it (``DIR/keyring.pkcs11``): restoring
needs that HSM key, which unwraps it inside the HSM.

Restore builds the data dir in a sibling staging directory, authenticates the
whole backup before unpacking anything, checks the result opens, and only
then renames it into place; a refused restore leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from testhide.common.files import atomic_file
from testhide.common.safetar import UnsafeMember, extract_all
from testhide.controlplane import backupfile, hsm
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.datadir import BACKUPS_DIR, DataDir, build_atomically
from testhide.controlplane.errors import ConfigError, FailedPrecondition, IntegrityError
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.sqlite import SqliteStore

DB_NAME = "testhide.db"
# keyring.pkcs11 travels in the header instead, where a restore finds it before anything is decrypted.
_EXCLUDED = {
    "master.key",
    hsm.KEYRING_FILE,
    DB_NAME,
    f"{DB_NAME}-wal",
    f"{DB_NAME}-shm",
    f"{DB_NAME}-journal",
}
# run/: what this process holds; backups/: where backups go by default (a backup never holds another).
_EXCLUDED_DIRS = {"run", BACKUPS_DIR}


@dataclass(frozen=True)
class BackupSummary:
    backup_id: str
    master_key_id: str
    size: int
    sha256: str
    files: int
    wrapped_by: str | None = None
    """The HSM key that wraps the key ring in the backup's header; None: the ring is not in it."""


def _data_dir_files(directory: DataDir) -> dict[str, bytes]:
    """Every file but the master key, the live database and transient files."""
    files = {}
    with directory.sealing():
        for path in sorted(directory.path.rglob("*")):
            relative = path.relative_to(directory.path)
            if (
                not path.is_file()
                or relative.parts[0] in _EXCLUDED_DIRS
                or relative.as_posix() in _EXCLUDED
                or relative.name.startswith("master.key")  # copies an operator left beside it, too
                or any(part.startswith(".") for part in relative.parts)
            ):
                continue
            files[relative.as_posix()] = path.read_bytes()
    return files


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    archive.addfile(info, io.BytesIO(data))


def _add_dirs(archive: tarfile.TarFile, names: list[str]) -> None:
    for parent in sorted({str(Path(n).parent) for n in names} - {"."}):
        info = tarfile.TarInfo(parent)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
        archive.addfile(info)


async def create_backup(directory: DataDir, master: MasterKey, store: Store, out: Path) -> BackupSummary:
    """Write an encrypted backup to ``out`` (0600, atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    before = await _wrapped_ring(master)
    files = _data_dir_files(directory)
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=directory.path) as scratch:
        snapshot = Path(scratch) / DB_NAME
        await store.snapshot(snapshot)
        after = await _wrapped_ring(master)
        key_ring: dict[str, Any] | None = None
        if before is not None and after is not None:
            if not set(before[1].key_ids) <= set(after[1].key_ids):
                raise FailedPrecondition(
                    "a master-key rotation retired a key while this backup was taken; run backup again"
                )
            key_ring, master = after[0].as_json(), after[1]
        header, sha256 = await asyncio.to_thread(_write_backup, out, master, files, snapshot, key_ring)
    size = (await asyncio.to_thread(out.stat)).st_size
    wrapped_by = after[0].uri.describe() if after is not None else None
    return BackupSummary(header.backup_id, header.master_key_id, size, sha256, len(files) + 1, wrapped_by)


async def _wrapped_ring(master: MasterKey) -> tuple[hsm.WrappedRing, MasterKey] | None:
    """For a ring an HSM wraps, the wrapped ring as its file has it now and the ring it
    opens to. Taken before and after the copy: the ring in the header must open
    everything the copy holds, whatever a rotation did meanwhile."""
    ring_file = master.ring_file
    if not isinstance(ring_file, hsm.Pkcs11RingFile):
        return None
    return await asyncio.to_thread(ring_file.snapshot)


async def take_backup(
    directory: DataDir, master: MasterKey, store: Store, auditor: Auditor, out: Path, actor: str
) -> BackupSummary:
    """``create_backup``, then its ``backup_created`` audit entry: the same for the
    ``backup`` command and the backups ``serve`` takes on a schedule."""
    summary = await create_backup(directory, master, store, out)
    await auditor.record(
        "backup_created",
        actor,
        target=summary.backup_id,
        out=str(out),
        size=summary.size,
        sha256=summary.sha256,
        master_key_id=summary.master_key_id,
    )
    return summary


class _Hashing:
    """Passes writes on and hashes them: the backup's sha256 without reading it back."""

    def __init__(self, out: BinaryIO) -> None:
        self._out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._out.write(data)


def _write_backup(
    out: Path, master: MasterKey, files: dict[str, bytes], snapshot: Path, key_ring: dict[str, Any] | None
) -> tuple[backupfile.BackupHeader, str]:
    with atomic_file(out, 0o600) as handle:
        hashing = _Hashing(handle)
        writer = backupfile.BackupWriter(hashing, master, key_ring)
        with tarfile.open(fileobj=writer, mode="w|") as archive:  # type: ignore[call-overload]
            _add_dirs(archive, list(files))
            for name, data in files.items():
                _add(archive, name, data, 0o644 if name.endswith(".pem") or name == "state.json" else 0o600)
            archive.add(snapshot, arcname=DB_NAME, recursive=False)
        writer.close()
    return writer.header, hashing.digest.hexdigest()


@dataclass(frozen=True)
class RestoreSummary:
    backup_id: str
    created_at: str
    audit_entries: int
    wrapped_by: str | None = None
    """The HSM key that wraps the restored data dir's key ring (keyring.pkcs11); None: no HSM."""


async def restore(
    source: Path,
    path: Path,
    master: MasterKey | hsm.Pkcs11Uri | None,
    master_key_text: str | None,
    actor: str,
) -> RestoreSummary:
    """Restore ``source`` into ``path`` (absent or empty). ``master_key_text``
    is written as the new data dir's master.key; None when the key comes from
    the environment. ``master`` a URI (or None): the ring in the backup's header,
    unwrapped by that HSM key (None: the one the backup names), becomes the new
    data dir's keyring.pkcs11."""
    return await build_atomically(
        path,
        "restore",
        "restore into a new directory",
        lambda staging: _restore_into(staging, source, master, master_key_text, actor),
    )


def _unpack(source: Path, master: MasterKey, directory: DataDir) -> backupfile.BackupHeader:
    """Authenticate the whole backup, then unpack it; nothing unauthenticated is unpacked."""
    directory.path.chmod(0o700)
    plain = directory.path / ".backup.tar"
    with (
        open(source, "rb") as src,
        open(os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dest,
    ):
        header = backupfile.decrypt(src, master, dest)
    if not tarfile.is_tarfile(plain):
        raise IntegrityError(
            "the backup holds no data dir: a pre-migration backup of PostgreSQL (*.pgdump.thb) is a pg_dump"
            " archive; write it out with `testhide-controlplane decrypt-backup` and give it to pg_restore"
        )
    with tarfile.open(plain, mode="r:") as archive:
        names = archive.getnames()
        if DB_NAME not in names or "state.json" not in names:
            raise IntegrityError("the backup lacks the database or the data dir state")
        try:
            extract_all(archive, directory.path)
        except UnsafeMember as exc:
            raise IntegrityError(f"the backup holds an unsafe member: {exc}") from exc
        for member in archive.getmembers():
            if member.isdir():  # the "data" filter leaves directories to the umask
                (directory.path / member.name).chmod(0o700)
    plain.unlink()
    return header


async def _restore_into(
    directory: DataDir,
    source: Path,
    master: MasterKey | hsm.Pkcs11Uri | None,
    master_key_text: str | None,
    actor: str,
) -> RestoreSummary:
    if not isinstance(master, MasterKey):
        master = await asyncio.to_thread(_install_key_ring, source, master, directory)
    header = await asyncio.to_thread(_unpack, source, master, directory)
    if master_key_text is not None:
        fd = os.open(directory.master_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(master_key_text)
    directory.require_initialised()
    # As it was backed up: an older schema stays so (serve or migrate bring it up to date, after a backup).
    store = await SqliteStore.open(directory.db_path, migrate=False, create=False, require_current=False)
    try:
        problems = await store.integrity_problems()
        if problems:
            raise IntegrityError(f"the restored database is damaged: {'; '.join(problems[:5])}")
        auditor = Auditor(store, await directory.audit_key(master, store))
        entries, audit_problems = await auditor.verify()
        if audit_problems:
            raise IntegrityError(f"the restored audit log does not verify: {'; '.join(audit_problems[:5])}")
        await auditor.record(
            "backup_restored",
            actor,
            target=header.backup_id,
            backup_created_at=header.created_at.isoformat(),
            master_key_id=header.master_key_id,
        )
    finally:
        await store.close()
    directory.tls_material(master, allow_development=True)  # the sealed keys open with this master key
    ring_file = master.ring_file
    wrapped_by = ring_file.uri().describe() if isinstance(ring_file, hsm.Pkcs11RingFile) else None
    return RestoreSummary(header.backup_id, header.created_at.isoformat(), len(entries) + 1, wrapped_by)


def _install_key_ring(source: Path, uri: hsm.Pkcs11Uri | None, directory: DataDir) -> MasterKey:
    """The ring in the backup's header, opened by the HSM, as the new data dir's keyring.pkcs11."""
    with open(source, "rb") as src:
        header, _ = backupfile.read_header(src)
    if header.key_ring is None:
        if uri is None:
            raise ConfigError(
                "give the master key the backup was made under: --master-key-file, or TESTHIDE_MASTER_KEY"
            )
        raise ConfigError(
            "this backup's master key ring is not wrapped by an HSM: restore it with --master-key-file"
            " or TESTHIDE_MASTER_KEY"
        )
    wrapped = hsm.WrappedRing.decode(header.key_ring, "the key ring in the backup's header")
    return hsm.install_ring(directory.keyring_path, wrapped if uri is None else replace(wrapped, uri=uri))
