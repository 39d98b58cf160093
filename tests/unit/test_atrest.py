"""controlplane/atrest.py: AES-256-GCM sealing and the master key."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey, seal, unseal
from testhide.controlplane.errors import ConfigError, IntegrityError

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def test_round_trip_and_layout() -> None:
    sealed = seal(KEY, b"hello world", b"aad")
    assert sealed.startswith(b"TH1")
    assert len(sealed) == 3 + 12 + len(b"hello world") + 16
    assert b"hello world" not in sealed
    assert unseal(KEY, sealed, b"aad") == b"hello world"


def test_empty_plaintext_round_trips() -> None:
    assert unseal(KEY, seal(KEY, b"", b""), b"") == b""


def test_fresh_nonce_every_time() -> None:
    a, b = seal(KEY, b"same", b"aad"), seal(KEY, b"same", b"aad")
    assert a[3:15] != b[3:15]
    assert a != b


def test_tampering_any_byte_is_detected() -> None:
    sealed = seal(KEY, b"secret data", b"job:1")
    for index in range(len(sealed)):
        for flip in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[index] ^= flip
            with pytest.raises(IntegrityError):
                unseal(KEY, bytes(tampered), b"job:1")


@pytest.mark.parametrize("cut", [0, 1, 3, 15, 30])
def test_truncated_is_malformed(cut: int) -> None:
    sealed = seal(KEY, b"", b"")  # exactly 31 bytes
    with pytest.raises(IntegrityError, match="malformed"):
        unseal(KEY, sealed[:cut], b"")


def test_truncated_tag_is_refused() -> None:
    sealed = seal(KEY, b"some plaintext", b"")
    with pytest.raises(IntegrityError):
        unseal(KEY, sealed[:-1], b"")


def test_wrong_magic_is_malformed() -> None:
    sealed = seal(KEY, b"x", b"")
    with pytest.raises(IntegrityError, match="malformed"):
        unseal(KEY, b"TH2" + sealed[3:], b"")


def test_wrong_aad_is_refused() -> None:
    sealed = seal(KEY, b"data", b"log:job1:1:0")
    with pytest.raises(IntegrityError, match="failed authentication"):
        unseal(KEY, sealed, b"log:job1:1:1")
    with pytest.raises(IntegrityError):
        unseal(KEY, sealed, b"")


def test_wrong_key_is_refused() -> None:
    with pytest.raises(IntegrityError):
        unseal(OTHER_KEY, seal(KEY, b"data", b"a"), b"a")


@PROPS
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_round_trip_property(plaintext: bytes, aad: bytes) -> None:
    assert unseal(KEY, seal(KEY, plaintext, aad), aad) == plaintext


@PROPS
@given(st.binary(max_size=64), st.binary(max_size=16), st.data())
def test_tamper_property(plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    sealed = bytearray(seal(KEY, plaintext, aad))
    index = data.draw(st.integers(0, len(sealed) - 1))
    sealed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(IntegrityError):
        unseal(KEY, bytes(sealed), aad)


@PROPS
@given(st.binary(max_size=32), st.binary(max_size=16), st.binary(max_size=16))
def test_aad_binding_property(plaintext: bytes, aad: bytes, other: bytes) -> None:
    sealed = seal(KEY, plaintext, aad)
    if other == aad:
        assert unseal(KEY, sealed, other) == plaintext
    else:
        with pytest.raises(IntegrityError):
            unseal(KEY, sealed, other)


# ------------------------------------------------------------------ MasterKey


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        MasterKey(b"k" * length)


@pytest.mark.parametrize("value", ["not base64!", "AAAA", base64.b64encode(b"x" * 16).decode(), ""])
def test_from_env_value_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        MasterKey.from_env_value(value)


def test_master_seal_unseal_and_key_identity() -> None:
    master = MasterKey(KEY)
    sealed = master.seal(b"ca key", b"ca.key.sealed")
    assert sealed.startswith(b"TH2" + bytes.fromhex(master.current_id))
    assert master.unseal(sealed, b"ca.key.sealed") == b"ca key"
    from_env = MasterKey.from_env_value(base64.b64encode(KEY).decode())
    assert from_env.unseal(sealed, b"ca.key.sealed") == b"ca key"
    with pytest.raises(IntegrityError):
        MasterKey(OTHER_KEY).unseal(sealed, b"ca.key.sealed")


def test_generate_gives_distinct_usable_keys() -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    sealed = a.seal(b"x", b"")
    assert a.unseal(sealed, b"") == b"x"
    with pytest.raises(IntegrityError):
        b.unseal(sealed, b"")


def test_save_writes_0600_base64_and_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    MasterKey(KEY).save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert base64.b64decode(path.read_text().strip()) == KEY
    loaded = MasterKey.load(path)
    assert loaded.unseal(MasterKey(KEY).seal(b"p", b"a"), b"a") == b"p"


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    MasterKey(KEY).save(path)
    with pytest.raises(FileExistsError):
        MasterKey(OTHER_KEY).save(path)
    assert base64.b64decode(path.read_text()) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(KEY).decode() + "\n")
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        MasterKey.load(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(KEY).decode() + "\n")
    os.chmod(path, mode)
    sealed = seal(KEY, b"x", b"y")
    assert MasterKey.load(path).unseal(sealed, b"y") == b"x"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=MASTER_KEY_ENV):
        MasterKey.load(tmp_path / "absent.key")


def test_env_key_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(KEY).decode())
    os.chmod(path, 0o640)  # would be refused if it were read
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(OTHER_KEY).decode())
    master = MasterKey.load(path)
    assert master.unseal(seal(OTHER_KEY, b"x", b""), b"") == b"x"
    with pytest.raises(IntegrityError):
        master.unseal(seal(KEY, b"x", b""), b"")
    # ... and no file is needed at all.
    assert MasterKey.load(tmp_path / "absent.key").unseal(seal(OTHER_KEY, b"z", b""), b"") == b"z"


def test_bad_env_key_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, "definitely not a key")
    with pytest.raises(ConfigError, match=MASTER_KEY_ENV):
        MasterKey.load(tmp_path / "master.key")


def test_data_key_wrap_is_bound_to_aad() -> None:
    master = MasterKey(KEY)
    data_key, wrapped = master.new_data_key(b"job-1")
    assert len(data_key) == 32
    assert data_key not in wrapped
    assert master.unwrap_data_key(wrapped, b"job-1") == data_key
    AESGCM(data_key)  # a usable AES-256 key
    with pytest.raises(IntegrityError):
        master.unwrap_data_key(wrapped, b"job-2")
    with pytest.raises(IntegrityError):
        MasterKey(OTHER_KEY).unwrap_data_key(wrapped, b"job-1")
    # Domain separation: a wrapped data key is not a plain sealed object of that aad.
    with pytest.raises(IntegrityError):
        master.unseal(wrapped, b"job-1")


def test_data_keys_are_fresh() -> None:
    master = MasterKey(KEY)
    (k1, w1), (k2, w2) = master.new_data_key(b"j"), master.new_data_key(b"j")
    assert k1 != k2
    assert w1 != w2
