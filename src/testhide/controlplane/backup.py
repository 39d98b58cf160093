"""Backup and restore of a data dir, online and consistent.

A backup is a tar stream of the data dir, encrypted with ``backupfile``: the
database as one SQLite online-backup snapshot, and every other file of the
data dir (certificates, sealed keys, state) copied under the sealing lock so
that no rotation is half in it. The master key is never inside: restoring
needs it, given the usual way.

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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from testhide.common.files import atomic_file
from testhide.common.safetar import UnsafeMember, extract_all
from testhide.controlplane import backupfile
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.datadir import DataDir, build_atomically
from testhide.controlplane.errors import IntegrityError
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.sqlite import SqliteStore

DB_NAME = "testhide.db"
_EXCLUDED = {"master.key", DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"}
_EXCLUDED_DIRS = {"run"}


@dataclass(frozen=True)
class BackupSummary:
    backup_id: str
    master_key_id: str
    size: int
    sha256: str
    files: int


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
    files = _data_dir_files(directory)
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=directory.path) as scratch:
        snapshot = Path(scratch) / DB_NAME
        await store.snapshot(snapshot)
        header, sha256 = await asyncio.to_thread(_write_backup, out, master, files, snapshot)
    size = (await asyncio.to_thread(out.stat)).st_size
    return BackupSummary(header.backup_id, header.master_key_id, size, sha256, len(files) + 1)


class _Hashing:
    """Passes writes on and hashes them: the backup's sha256 without reading it back."""

    def __init__(self, out: BinaryIO) -> None:
        self._out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._out.write(data)


def _write_backup(
    out: Path, master: MasterKey, files: dict[str, bytes], snapshot: Path
) -> tuple[backupfile.BackupHeader, str]:
    with atomic_file(out, 0o600) as handle:
        hashing = _Hashing(handle)
        writer = backupfile.BackupWriter(hashing, master)
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


async def restore(
    source: Path, path: Path, master: MasterKey, master_key_text: str | None, actor: str
) -> RestoreSummary:
    """Restore ``source`` into ``path`` (absent or empty). ``master_key_text``
    is written as the new data dir's master.key; None when the key comes from
    the environment."""
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
    directory: DataDir, source: Path, master: MasterKey, master_key_text: str | None, actor: str
) -> RestoreSummary:
    header = await asyncio.to_thread(_unpack, source, master, directory)
    if master_key_text is not None:
        fd = os.open(directory.master_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(master_key_text)
    directory.require_initialised()
    store = await SqliteStore.open(directory.db_path)
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
    return RestoreSummary(header.backup_id, header.created_at.isoformat(), len(entries) + 1)
