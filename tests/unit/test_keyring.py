"""The master key ring (controlplane/atrest.py) and master-key rotation
(controlplane/masterkey.py) on a real data dir in tmp_path."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from testhide.controlplane import masterkey
from testhide.controlplane.atrest import LEGACY_KEY_ID, MASTER_KEY_ENV, MasterKey, key_id, seal, sealed_by
from testhide.controlplane.auth.audit import AuditChain, AuditEvent, Auditor, legacy_audit_key
from testhide.controlplane.datadir import AUDIT_KEY, DataDir, initialise
from testhide.controlplane.errors import ConfigError, FailedPrecondition, IntegrityError
from testhide.controlplane.jobs.blobs import BlobVault
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogStream
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.store.sqlite import SqliteStore

OLD, NEW, OTHER = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


def b64(*keys: bytes) -> str:
    return "".join(base64.b64encode(k).decode() + "\n" for k in keys)


# ------------------------------------------------------------------ the ring


def test_seal_names_the_current_key_and_every_ring_key_opens_its_own() -> None:
    old_sealed = MasterKey(OLD).seal(b"private key", b"cas/ca-1.key.sealed")
    ring = MasterKey(NEW, OLD)
    new_sealed = ring.seal(b"private key", b"cas/ca-1.key.sealed")
    assert sealed_by(old_sealed) == key_id(OLD)
    assert sealed_by(new_sealed) == key_id(NEW) == ring.current_id
    assert ring.unseal(old_sealed, b"cas/ca-1.key.sealed") == ring.unseal(new_sealed, b"cas/ca-1.key.sealed")
    assert ring.is_current(new_sealed)
    assert not ring.is_current(old_sealed)
    assert ring.is_current(ring.reseal(old_sealed, b"cas/ca-1.key.sealed"))


def test_a_key_missing_from_the_ring_is_named() -> None:
    sealed = MasterKey(OLD).seal(b"x", b"a")
    with pytest.raises(
        IntegrityError, match=f"sealed by master key {key_id(OLD)}, which is not in the key ring"
    ):
        MasterKey(NEW).unseal(sealed, b"a")


def test_legacy_format_opens_with_the_original_key_anywhere_in_the_ring() -> None:
    legacy = seal(OLD, b"data key", b"data-key:job-1")
    assert sealed_by(legacy) == LEGACY_KEY_ID
    assert MasterKey(NEW, OLD).unwrap_data_key(legacy, b"job-1") == b"data key"
    rewrapped = MasterKey(NEW, OLD).rewrap_data_key(legacy, b"job-1")
    assert MasterKey(NEW).unwrap_data_key(rewrapped, b"job-1") == b"data key"
    with pytest.raises(IntegrityError):
        MasterKey(NEW, OTHER).unwrap_data_key(legacy, b"job-1")


def test_key_id_and_header_are_authenticated() -> None:
    ring = MasterKey(NEW, OLD)
    sealed = bytearray(ring.seal(b"x", b"a"))
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(IntegrityError):
            ring.unseal(bytes(tampered), b"a")
    # The same body presented as if another ring key had sealed it fails too.
    relabelled = b"TH2" + bytes.fromhex(key_id(OLD)) + bytes(sealed[7:])
    with pytest.raises(IntegrityError):
        ring.unseal(relabelled, b"a")


def test_ring_file_and_environment_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "master.key"
    MasterKey(NEW, OLD).save(path)
    assert path.read_text() == b64(NEW, OLD)
    assert path.stat().st_mode & 0o777 == 0o600
    assert MasterKey.load(path).key_ids == (key_id(NEW), key_id(OLD))
    assert MasterKey.load(path).source == path
    monkeypatch.setenv(MASTER_KEY_ENV, ",".join(b64(OTHER, NEW).split()))
    from_env = MasterKey.load(path)
    assert from_env.key_ids == (key_id(OTHER), key_id(NEW))
    assert from_env.source is None


def test_the_same_key_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        MasterKey(NEW, NEW)


def test_reload_follows_the_file_and_an_environment_ring_never_changes(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    MasterKey(OLD).save(path)
    ring = MasterKey.load(path)
    assert not ring.reload()
    path.write_text(b64(NEW, OLD))
    os.utime(path, ns=(1, 1))
    assert ring.reload()
    assert ring.current_id == key_id(NEW)
    assert not ring.reload()
    assert not MasterKey(OLD).reload()


# ------------------------------------------------------------------ rotation

NOW = datetime(2030, 1, 2, tzinfo=UTC)


@pytest.fixture
async def datadir(tmp_path: Path) -> AsyncIterator[tuple[DataDir, SqliteStore]]:
    await initialise(tmp_path / "dd", ["localhost"])
    directory = DataDir(tmp_path / "dd")
    store = await SqliteStore.open(directory.db_path)
    try:
        yield directory, store
    finally:
        await store.close()


async def _fill(store: SqliteStore, master: MasterKey) -> str:
    """A job with a log, a blob and a secret, all under ``master``."""
    job_id = "j" + os.urandom(4).hex()
    _, wrapped = master.new_data_key(job_id.encode())
    await store.create_job(
        Job(job_id, "default", JobSpec(image="busybox", command=("true",)), JobStatus.QUEUED, NOW), wrapped
    )
    job = await store.assign_job("default", job_id, "agent-1", NOW, NOW + timedelta(minutes=1))
    assert job is not None
    await LogBook(store, master).append(
        "default", "agent-1", job_id, job.epoch, 1, [(LogStream.STDOUT, b"old log\n")]
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield b"artifact bytes"

    await BlobVault(store, master).write("default", "artifact", job_id, "out/a.txt", chunks(), 1 << 20)
    await SecretVault(store, master).set("default", "TOKEN", b"s3cret")
    return job_id


async def _read_back(store: SqliteStore, master: MasterKey, job_id: str) -> tuple[bytes, bytes, str]:
    log = b"".join([c.data async for c in LogBook(store, master).read("default", job_id, 0)])
    found = await store.find_blob("default", job_id, "artifact", "out/a.txt")
    assert found is not None
    blob = b"".join([c async for c in BlobVault(store, master).read(*found)])
    return log, blob, (await SecretVault(store, master).resolve("default", ("TOKEN",)))["TOKEN"]


def _db_key_ids(directory: DataDir) -> set[str]:
    with sqlite3.connect(directory.db_path) as conn:
        rows = [
            r[0]
            for query in (
                "SELECT data_key FROM jobs",
                "SELECT data_key FROM blobs",
                "SELECT data_key FROM secrets",
            )
            for r in conn.execute(query)
        ]
    return {sealed_by(bytes(r)) for r in rows}


def _file_key_ids(directory: DataDir) -> set[str]:
    return {sealed_by((directory.path / n).read_bytes()) for n in directory.sealed_files()}


async def test_rotation_rewraps_rows_and_files_and_drops_the_old_key(
    datadir: tuple[DataDir, SqliteStore],
) -> None:
    directory, store = datadir
    old = directory.master_key()
    job_id = await _fill(store, old)
    result = await masterkey.rotate(directory, store, directory.master_key())
    assert result.dropped
    assert result.rewrapped == 3
    assert result.resealed_files == len(directory.sealed_files()) == 4
    assert result.retired_key_ids == (old.current_id,)
    new = directory.master_key()
    assert new.key_ids == (result.new_key_id,)
    assert _db_key_ids(directory) == _file_key_ids(directory) == {result.new_key_id}
    assert await _read_back(store, new, job_id) == (b"old log\n", b"artifact bytes", "s3cret")
    directory.tls_material(new)  # sealed private keys open with the new key alone
    with pytest.raises(IntegrityError):
        directory.tls_material(old)


async def test_rotation_resumes_after_a_crash_between_steps(datadir: tuple[DataDir, SqliteStore]) -> None:
    directory, store = datadir
    old = directory.master_key()
    job_id = await _fill(store, old)
    # Crash after the new key was added and half the work was done.
    ring = old.with_new_current()
    directory.master_key_path.write_text(ring.serialise())
    await masterkey.rewrap_data_keys(store, ring)
    result = await masterkey.rotate(directory, store, directory.master_key())
    assert result.new_key_id == ring.current_id
    assert result.rewrapped == 0
    assert result.dropped
    assert _db_key_ids(directory) == _file_key_ids(directory) == {ring.current_id}
    assert await _read_back(store, directory.master_key(), job_id) == (
        b"old log\n",
        b"artifact bytes",
        "s3cret",
    )


async def test_rotation_of_a_legacy_data_dir(datadir: tuple[DataDir, SqliteStore]) -> None:
    """Rows and files sealed in the format from before key rings (TH1)."""
    directory, store = datadir
    raw = base64.b64decode(directory.master_key_path.read_text())
    job_id = "jlegacy"
    await store.create_job(
        Job(job_id, "default", JobSpec(image="b", command=("true",)), JobStatus.QUEUED, NOW),
        seal(raw, os.urandom(32), b"data-key:" + job_id.encode()),
    )
    (directory.path / "server.key.sealed").write_bytes(
        seal(
            raw,
            directory.master_key().unseal(
                (directory.path / "server.key.sealed").read_bytes(), b"server.key.sealed"
            ),
            b"server.key.sealed",
        )
    )
    assert LEGACY_KEY_ID in _db_key_ids(directory) | _file_key_ids(directory)
    result = await masterkey.rotate(directory, store, directory.master_key())
    assert _db_key_ids(directory) == _file_key_ids(directory) == {result.new_key_id}
    directory.tls_material(directory.master_key())


async def test_a_tampered_data_key_is_reported_and_keeps_the_old_key(
    datadir: tuple[DataDir, SqliteStore],
) -> None:
    directory, store = datadir
    job_id = await _fill(store, directory.master_key())
    with sqlite3.connect(directory.db_path) as conn:
        (wrapped,) = conn.execute("SELECT data_key FROM jobs WHERE id = ?", (job_id,)).fetchone()
        # Flip a bit: overwriting the last byte with a constant left the key intact one run in 256.
        tampered = bytes(wrapped[:-1]) + bytes([wrapped[-1] ^ 0x01])
        conn.execute("UPDATE jobs SET data_key = ? WHERE id = ?", (tampered, job_id))
    result = await masterkey.rotate(directory, store, directory.master_key())
    assert not result.dropped
    assert len(result.damaged) == 1
    assert job_id in result.damaged[0]
    assert len(directory.master_key().key_ids) == 2
    # Never served: reading that job's log still fails authentication.
    with pytest.raises(IntegrityError):
        await _read_back(store, directory.master_key(), job_id)
    forced = await masterkey.rotate(directory, store, directory.master_key(), force=True)
    assert forced.dropped
    assert len(directory.master_key().key_ids) == 1


async def test_an_environment_ring_of_one_key_refuses_with_the_procedure(
    datadir: tuple[DataDir, SqliteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, store = datadir
    monkeypatch.setenv(MASTER_KEY_ENV, directory.master_key_path.read_text().strip())
    with pytest.raises(FailedPrecondition, match="NEW,OLD"):
        await masterkey.rotate(directory, store, directory.master_key())


async def test_an_environment_ring_is_rewrapped_but_not_dropped(
    datadir: tuple[DataDir, SqliteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, store = datadir
    await _fill(store, directory.master_key())
    old_text = directory.master_key_path.read_text().strip()
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(NEW).decode() + "," + old_text)
    result = await masterkey.rotate(directory, store, directory.master_key())
    assert not result.dropped
    assert not result.damaged
    assert result.new_key_id == key_id(NEW)
    assert _db_key_ids(directory) == _file_key_ids(directory) == {key_id(NEW)}
    assert directory.master_key_path.read_text().strip() == old_text  # the file is not the ring in use


async def test_rotation_waits_for_running_serves_and_gives_up_clearly(
    datadir: tuple[DataDir, SqliteStore],
) -> None:
    directory, store = datadir
    master = directory.master_key()
    lagging = masterkey.RingAnnouncement(directory, master)
    lagging.publish()  # this process "serves" with the old ring and never reloads
    dead = directory.path / "run" / "serve-999999999-dead.json"
    dead.write_text(json.dumps({"pid": 999_999_999, "key_ids": ["00000000"]}))
    with pytest.raises(FailedPrecondition, match=f"{os.getpid()} still seal"):
        await masterkey.rotate(directory, store, master, holder_timeout=timedelta(seconds=0.2))
    assert not dead.exists()
    # Picking up the ring (as serve's watcher does) lets the rotation, run again, finish.
    assert master.reload()
    lagging.publish()
    result = await masterkey.rotate(
        directory, store, directory.master_key(), holder_timeout=timedelta(seconds=2)
    )
    assert result.dropped
    lagging.withdraw()


async def test_a_second_rotation_at_the_same_time_is_refused(datadir: tuple[DataDir, SqliteStore]) -> None:
    from testhide.common.files import file_lock

    directory, store = datadir
    with file_lock(directory.path / ".rotation.lock"), pytest.raises(FailedPrecondition, match="another"):
        await masterkey.rotate(directory, store, directory.master_key())


# ------------------------------------------------------------------ the audit key


async def test_audit_chain_survives_rotation(datadir: tuple[DataDir, SqliteStore]) -> None:
    directory, store = datadir
    auditor = Auditor(store, await directory.audit_key(directory.master_key(), store))
    await auditor.record("before", "operator:test")
    await masterkey.rotate(directory, store, directory.master_key())
    after = Auditor(store, await directory.audit_key(directory.master_key(), store))
    await after.record("after", "operator:test")
    entries, problems = await after.verify()
    assert [e.event.action for e in entries] == ["before", "after"]
    assert problems == []


async def test_a_data_dir_from_before_the_audit_key_keeps_its_chain(
    datadir: tuple[DataDir, SqliteStore],
) -> None:
    directory, store = datadir
    (directory.path / AUDIT_KEY).unlink()
    raw = base64.b64decode(directory.master_key_path.read_text())
    legacy = AuditChain(legacy_audit_key(raw))
    await store.append_audit(AuditEvent("made_before", "operator:test"), legacy)
    key = await directory.audit_key(directory.master_key(), store)
    assert key == legacy_audit_key(raw)
    assert (directory.path / AUDIT_KEY).exists()
    await masterkey.rotate(directory, store, directory.master_key())
    _, problems = await Auditor(store, await directory.audit_key(directory.master_key(), store)).verify()
    assert problems == []
