"""The master key ring wrapped by a key in an HSM, through PKCS#11 against
Debian's SoftHSM: every test gets its own token. ``init --master-key pkcs11:...``
leaves no master.key, serve runs on it, the HSM key never leaves the module,
backup and restore and an online rotation work through it, and what goes wrong
with the HSM (PIN, token, key label, module, a tampered ring) is one line.

Everything that opens the module runs in its own process, as operators run
it: a PKCS#11 module reads its configuration (SOFTHSM2_CONF) once per process."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from testhide.controlplane.atrest import key_id, sealed_by
from testhide.controlplane.datadir import DataDir
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import ControlPlaneProcess, free_port, operator, unavailable

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL, OBJECT = "testhide", "master"
PIN, SO_PIN = "4711-0815", "0815-4711"


@dataclass(frozen=True)
class Token:
    """A SoftHSM token of this test, and its PIN in a 0600 file."""

    pin_file: Path

    def uri(
        self,
        token: str = LABEL,
        key: str = OBJECT,
        module: Path = MODULE,
        pin_file: Path | None = None,
    ) -> str:
        pin = f"&pin-source=file:{pin_file or self.pin_file}"
        return f"pkcs11:token={token};object={key}?module-path={module}{pin}"


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Token:
    util = shutil.which("softhsm2-util")
    if util is None or not MODULE.is_file():
        unavailable("SoftHSM is not installed (Debian's softhsm2; scripts/host-setup installs it)")
    if importlib.util.find_spec("pkcs11") is None:
        unavailable("python-pkcs11 is not installed (scripts/venv installs the lock)")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))  # for every process this test starts
    monkeypatch.delenv("TESTHIDE_MASTER_KEY", raising=False)
    monkeypatch.delenv("TESTHIDE_PKCS11_PIN", raising=False)
    subprocess.run(
        [util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
    )
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return Token(pin_file)


async def init(tmp_path: Path, token: Token, name: str = "controlplane") -> tuple[Path, str]:
    data_dir = tmp_path / name
    code, out, err = await operator("init", "--data-dir", str(data_dir), "--master-key", token.uri())
    assert code == 0, err
    return data_dir, out.strip().splitlines()[-1]


async def failure(*args: str) -> str:
    """The one error line of a command that must fail."""
    code, _, err = await operator(*args)
    return one_line_error(code, err)


def one_line_error(code: int, err: str) -> str:
    """The command failed with one ``Error:`` line and no traceback; that line."""
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, err
    return errors[0]


async def current_key_id(data_dir: Path) -> str:
    code, out, err = await operator("master-key", "status", "--data-dir", str(data_dir))
    assert code == 0, err
    first = out.splitlines()[0]
    assert f"ring from {data_dir / 'keyring.pkcs11'}, wrapped by key 'master' in token 'testhide'" in first
    return first.rsplit("(current ", 1)[1].rstrip(")")


@asynccontextmanager
async def serve(data_dir: Path) -> AsyncIterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(data_dir, free_port(), free_port())
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


@asynccontextmanager
async def api(cp: ControlPlaneProcess, api_key: str) -> AsyncIterator[jobs_pb2_grpc.SecretsStub]:
    """The secrets service of a serve process, logged in with ``api_key`` over TLS."""
    credentials = grpc.ssl_channel_credentials((cp.data_dir / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{cp.api_port}", credentials) as channel:
        pair = await auth_pb2_grpc.AuthStub(channel).Login(auth_pb2.LoginRequest(api_key=api_key), timeout=30)
        secrets = jobs_pb2_grpc.SecretsStub(channel)
        metadata = (("authorization", f"Bearer {pair.access_token}"),)
        await secrets.Set(jobs_pb2.SetSecretRequest(name="PROBE", value=b"v"), metadata=metadata, timeout=30)
        yield secrets


async def test_init_keeps_the_ring_wrapped_by_the_hsm_and_serve_runs_on_it(
    tmp_path: Path, token: Token
) -> None:
    data_dir, admin_key = await init(tmp_path, token)
    assert not (data_dir / "master.key").exists()
    ring_file = data_dir / "keyring.pkcs11"
    assert ring_file.stat().st_mode & 0o777 == 0o600
    recorded = json.loads(ring_file.read_text())
    assert recorded["uri"] == token.uri()
    assert "pin-value" not in ring_file.read_text()
    assert PIN not in ring_file.read_text()

    # The ring's key is not in the file in clear: no 32 bytes of it, raw or decoded, have its id.
    current = await current_key_id(data_dir)
    blobs = [ring_file.read_bytes()] + [base64.b64decode(recorded[f]) for f in ("nonce", "ring")]
    windows = {blob[i : i + 32] for blob in blobs for i in range(len(blob) - 31)}
    assert current not in {key_id(window) for window in windows}
    assert {sealed_by((data_dir / n).read_bytes()) for n in DataDir(data_dir).sealed_files()} == {current}

    async with serve(data_dir) as cp:
        code, new_key, err = await operator(
            "api-keys", "create", "--data-dir", str(data_dir), "--name", "ci", "--scope", "secrets:write"
        )
        assert code == 0, err
        code, enrollment, err = await operator("enroll-token", "create", "--data-dir", str(data_dir))
        assert code == 0, err
        assert enrollment.strip()
        for key in (admin_key, new_key.strip().splitlines()[-1]):
            async with api(cp, key):
                pass
        ports = ("--listen", f"127.0.0.1:{cp.api_port}", "--agent-listen", f"127.0.0.1:{cp.agent_port}")
        code, out, err = await operator("doctor", "--data-dir", str(data_dir), *ports)
        assert code == 0, out + err
        assert "ok    master key: from " in out, out
        assert "wrapped by key 'master' in token 'testhide'" in out


async def test_the_hsm_key_never_leaves_the_module(tmp_path: Path, token: Token) -> None:
    await init(tmp_path, token)
    probe = f"""
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
token = pkcs11.lib({str(MODULE)!r}).get_token(token_label={LABEL!r})
with token.open(user_pin={PIN!r}) as session:
    key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label={OBJECT!r})
    print("length", key[Attribute.VALUE_LEN])
    for name in ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "TOKEN",
                 "WRAP", "SIGN"):
        print(name, key[getattr(Attribute, name)])
    try:
        key[Attribute.VALUE]
        print("VALUE READ")
    except pkcs11.exceptions.AttributeSensitive:
        print("VALUE refused")
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "length 32",
        "SENSITIVE True",
        "EXTRACTABLE False",
        "ALWAYS_SENSITIVE True",
        "NEVER_EXTRACTABLE True",
        "TOKEN True",
        "WRAP False",
        "SIGN False",
        "VALUE refused",
    ]


async def test_backup_and_restore_through_the_hsm(tmp_path: Path, token: Token) -> None:
    data_dir, admin_key = await init(tmp_path, token)
    backup = tmp_path / "offsite" / "cp.thb"
    async with serve(data_dir) as cp, api(cp, admin_key):
        code, _, err = await operator("backup", "--data-dir", str(data_dir), "--out", str(backup))
        assert code == 0, err
    assert "only as wrapped by the HSM (key 'master' in token 'testhide'" in err
    assert "master key is NOT in this backup" not in err

    restored = tmp_path / "restored"
    code, _, err = await operator(
        "restore", "--from", str(backup), "--data-dir", str(restored), "--master-key", token.uri()
    )
    assert code == 0, err
    assert "audit log intact" in err
    assert "its key ring is wrapped by the HSM: key 'master' in token 'testhide'" in err
    assert not (restored / "master.key").exists()
    assert (restored / "keyring.pkcs11").stat().st_mode & 0o777 == 0o600
    assert await current_key_id(restored) == await current_key_id(data_dir)
    code, out, err = await operator("audit", "verify", "--data-dir", str(restored))
    assert code == 0, out + err
    async with serve(restored) as cp, api(cp, admin_key):
        pass

    # Without --master-key, the HSM key the backup names; a wrong PIN restores nothing.
    code, _, err = await operator("restore", "--from", str(backup), "--data-dir", str(tmp_path / "again"))
    assert code == 0, err
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000\n")
    wrong_pin.chmod(0o600)
    code, _, err = await operator(
        "restore",
        "--from",
        str(backup),
        "--data-dir",
        str(tmp_path / "refused"),
        "--master-key",
        token.uri(pin_file=wrong_pin),
    )
    assert "the PIN of token 'testhide'" in one_line_error(code, err)
    assert not (tmp_path / "refused").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".refused")]  # nor its staging dir


async def test_rotation_while_serving_rewraps_through_the_hsm(tmp_path: Path, token: Token) -> None:
    data_dir, admin_key = await init(tmp_path, token)
    old_key = await current_key_id(data_dir)
    old_backup = tmp_path / "before-rotation.thb"
    async with serve(data_dir) as cp:
        async with api(cp, admin_key):  # a secret: its data key is wrapped by the old ring key
            pass
        code, _, err = await operator("backup", "--data-dir", str(data_dir), "--out", str(old_backup))
        assert code == 0, err
        code, _, err = await operator("master-key", "rotate", "--data-dir", str(data_dir))
        assert code == 0, err
        assert "1 data keys re-wrapped" in err  # the secret's (no job yet: no statement key)
        assert f"retired key(s) {old_key} removed from the ring" in err
        assert "failed authentication" not in err
        new_key = await current_key_id(data_dir)
        assert new_key != old_key
        # serve unwrapped the new ring through the HSM and keeps working on it.
        async with api(cp, admin_key):
            pass
        assert "master_key_reloaded" in cp.log_path.read_text()
    assert {sealed_by((data_dir / n).read_bytes()) for n in DataDir(data_dir).sealed_files()} == {new_key}
    assert json.loads((data_dir / "keyring.pkcs11").read_text())["uri"] == token.uri()

    # A backup from before holds the old ring, wrapped by the same HSM key: it still restores.
    code, _, err = await operator(
        "restore", "--from", str(old_backup), "--data-dir", str(tmp_path / "old"), "--master-key", token.uri()
    )
    assert code == 0, err
    assert await current_key_id(tmp_path / "old") == old_key


async def test_what_goes_wrong_with_the_hsm_is_one_line(
    tmp_path: Path, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = await init(tmp_path, token)
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000\n")
    wrong_pin.chmod(0o600)
    cases = {
        token.uri(
            pin_file=wrong_pin
        ): "the PIN of token 'testhide' of /usr/lib/softhsm/libsofthsm2.so is wrong",
        token.uri(token="absent"): "no token 'absent' of /usr/lib/softhsm/libsofthsm2.so",
        token.uri(key="absent"): "token 'testhide' has no AES key labelled 'absent'",
        token.uri(
            module=tmp_path / "libabsent.so"
        ): f"the PKCS#11 module {tmp_path}/libabsent.so does not exist",
        token.uri() + "&pin-value=1234": "holds the PIN itself (pin-value)",
        token.uri(pin_file=tmp_path / "no-pin"): f"the PIN file {tmp_path}/no-pin (pin-source) is missing",
    }
    status = ("master-key", "status", "--data-dir", str(data_dir))
    for uri, says in cases.items():
        line = await failure(*status, "--master-key", uri)
        assert says in line, line

    # The PIN from the environment, for a URI without pin-source.
    no_pin_source = token.uri().split("&pin-source=")[0]
    assert "no PIN for PKCS#11 token 'testhide'" in await failure(*status, "--master-key", no_pin_source)
    monkeypatch.setenv("TESTHIDE_PKCS11_PIN", PIN)
    code, _, err = await operator(*status, "--master-key", no_pin_source)
    assert code == 0, err
    monkeypatch.delenv("TESTHIDE_PKCS11_PIN")

    # A ring key in the environment as well as the HSM: refused rather than guessed.
    monkeypatch.setenv("TESTHIDE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    assert "unset it" in await failure(*status)
    code, _, err = await operator("init", "--data-dir", str(tmp_path / "both"), "--master-key", token.uri())
    assert "not both" in one_line_error(code, err)
    monkeypatch.delenv("TESTHIDE_MASTER_KEY")

    # The wrapped ring tampered with: the HSM's AES-GCM refuses it, serve does not start.
    ring_file = data_dir / "keyring.pkcs11"
    recorded = json.loads(ring_file.read_text())
    sealed = bytearray(base64.b64decode(recorded["ring"]))
    sealed[3] ^= 1
    recorded["ring"] = base64.b64encode(bytes(sealed)).decode()
    ring_file.write_text(json.dumps(recorded))
    tampered = "the key ring in keyring.pkcs11 failed authentication in the HSM"
    assert tampered in await failure(*status)
    ports = ("--listen", f"127.0.0.1:{free_port()}", "--agent-listen", f"127.0.0.1:{free_port()}")
    code, _, err = await operator("serve", "--data-dir", str(data_dir), *ports, within=60)
    assert tampered in one_line_error(code, err)
    code, out, _ = await operator("doctor", "--data-dir", str(data_dir), *ports)
    assert code == 1
    master_line = next(line for line in out.splitlines() if "master key:" in line)
    assert master_line.startswith("FAIL  master key:")
    assert tampered in master_line
