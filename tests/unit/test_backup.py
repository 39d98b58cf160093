"""The backup format (controlplane/backupfile.py) and backup/restore of a data
dir (controlplane/backup.py), without a running control plane."""

from __future__ import annotations

import io
import os
import sqlite3
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from testhide.controlplane import backupfile
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey
from testhide.controlplane.backup import create_backup, restore
from testhide.controlplane.datadir import DataDir, initialise
from testhide.controlplane.errors import DataDirError, IntegrityError
from testhide.controlplane.store.sqlite import SqliteStore

KEY, OTHER = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backupfile, "CHUNK", 64)
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


def encrypt(data: bytes, master: MasterKey, pieces: int = 7) -> bytes:
    out = io.BytesIO()
    writer = backupfile.BackupWriter(out, master)
    for start in range(0, len(data), pieces):
        writer.write(data[start : start + pieces])
    writer.close()
    return out.getvalue()


def decrypt(blob: bytes, master: MasterKey) -> bytes:
    dest = io.BytesIO()
    backupfile.decrypt(io.BytesIO(blob), master, dest)
    return dest.getvalue()


def records(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split a backup into its prefix (magic and header) and its records."""
    (length,) = struct.unpack(">I", blob[10:14])
    offset = 14 + length
    prefix, found = blob[:offset], []
    while offset < len(blob):
        (size,) = struct.unpack(">I", blob[offset : offset + 4])
        found.append(blob[offset : offset + 4 + size])
        offset += 4 + size
    return prefix, found


PLAIN = bytes(range(256)) * 3  # 768 bytes: 12 chunks of 64, the last one marked last


@pytest.mark.parametrize("size", [0, 1, 64, 65, 768])
def test_round_trip(size: int) -> None:
    master = MasterKey(KEY)
    blob = encrypt(PLAIN[:size], master)
    assert decrypt(blob, master) == PLAIN[:size]
    assert PLAIN[:size] not in blob or size < 2


def test_the_header_says_which_master_key_and_that_it_is_not_inside() -> None:
    blob = encrypt(b"x", MasterKey(KEY))
    header, _ = backupfile.read_header(io.BytesIO(blob))
    assert header.master_key_id == MasterKey(KEY).current_id
    assert b"the master key is not in this file" in blob[:400]


def test_any_flipped_byte_is_refused() -> None:
    master = MasterKey(KEY)
    blob = encrypt(PLAIN[:200], master)
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x04
        with pytest.raises(IntegrityError):
            decrypt(bytes(tampered), master)


def test_every_truncation_is_refused() -> None:
    master = MasterKey(KEY)
    blob = encrypt(PLAIN[:200], master)
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            decrypt(blob[:cut], master)


def test_reordered_dropped_or_duplicated_chunks_are_refused() -> None:
    master = MasterKey(KEY)
    prefix, chunks = records(encrypt(PLAIN, master))
    assert len(chunks) == 12
    for changed in (
        chunks[1:2] + chunks[:1] + chunks[2:],
        chunks[:5] + chunks[6:],
        chunks[:5] + chunks[4:],
        chunks[:-1],
        chunks + chunks[-1:],
    ):
        with pytest.raises(IntegrityError):
            decrypt(prefix + b"".join(changed), master)


def test_chunks_of_another_backup_are_refused() -> None:
    master = MasterKey(KEY)
    prefix_a, chunks_a = records(encrypt(PLAIN, master))
    _, chunks_b = records(encrypt(PLAIN, master))
    with pytest.raises(IntegrityError):
        decrypt(prefix_a + b"".join(chunks_a[:3] + chunks_b[3:]), master)


def test_the_wrong_master_key_is_named() -> None:
    blob = encrypt(b"data", MasterKey(KEY))
    with pytest.raises(IntegrityError, match=f"master key {MasterKey(KEY).current_id}"):
        decrypt(blob, MasterKey(OTHER))
    assert decrypt(blob, MasterKey(OTHER, KEY)) == b"data"  # a ring holding it will do


def test_not_a_backup() -> None:
    with pytest.raises(IntegrityError, match="not a testhide backup"):
        decrypt(b"SQLite format 3\x00" + b"\x00" * 100, MasterKey(KEY))


# ------------------------------------------------------------------ data dirs


async def _backup(tmp_path: Path) -> tuple[DataDir, Path]:
    await initialise(tmp_path / "live", ["localhost"])
    directory = DataDir(tmp_path / "live")
    store = await SqliteStore.open(directory.db_path)
    try:
        await store.create_org("acme", datetime.now(UTC))
        out = tmp_path / "backups" / "b.thb"
        await create_backup(directory, directory.master_key(), store, out)
    finally:
        await store.close()
    return directory, out


async def test_backup_and_restore_a_data_dir(tmp_path: Path) -> None:
    live, out = await _backup(tmp_path)
    assert out.stat().st_mode & 0o777 == 0o600
    assert live.master_key_path.read_bytes() not in out.read_bytes()
    target = tmp_path / "restored"
    summary = await restore(out, target, live.master_key(), live.master_key_path.read_text(), "operator:test")
    assert summary.audit_entries == 1
    assert sorted(
        p.relative_to(target).as_posix()
        for p in target.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    ) == sorted(
        p.relative_to(live.path).as_posix()
        for p in live.path.rglob("*")
        if p.is_file() and not p.name.startswith(".") and "run" not in p.parts
    )
    assert (target / "master.key").stat().st_mode & 0o777 == 0o600
    assert all((target / d).stat().st_mode & 0o777 == 0o700 for d in ("cas", "signing", "."))
    with sqlite3.connect(target / "testhide.db") as conn:
        assert ("acme",) in conn.execute("SELECT name FROM orgs").fetchall()
    restored = DataDir(target)
    assert (
        restored.tls_material(restored.master_key()).server_key_pem
        == live.tls_material(live.master_key()).server_key_pem
    )


async def test_restore_refuses_a_non_empty_target(tmp_path: Path) -> None:
    live, out = await _backup(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(DataDirError, match="not empty"):
        await restore(out, tmp_path / "busy", live.master_key(), None, "operator:test")


@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong-key"])
async def test_a_refused_restore_leaves_nothing_behind(tmp_path: Path, damage: str) -> None:
    live, out = await _backup(tmp_path)
    data = bytearray(out.read_bytes())
    master = live.master_key()
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        del data[-100:]
    else:
        master = MasterKey(OTHER)
    out.write_bytes(bytes(data))
    parent = tmp_path / "restore-here"
    parent.mkdir()
    with pytest.raises(IntegrityError):
        await restore(out, parent / "dd", master, "key\n", "operator:test")
    assert os.listdir(parent) == []
