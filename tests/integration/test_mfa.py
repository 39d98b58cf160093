"""TOTP second factors against a real control plane, through the API and the
``testhide`` command as users run it: an admin cannot log in before enrolling,
enrolling and confirming, the code then required, the ``amr`` of the tokens,
codes and recovery codes accepted once, wrong codes counted toward lockout,
the operator's reset, and the secret never in the database in clear."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pyotp
import pytest
from structlog.testing import capture_logs

from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.controlplane.auth.passwords import hash_password
from testhide.controlplane.store.base import UserRecord
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc
from tests.harness import Cli, RunningControlPlane, control_plane, operator, program_command

PASSWORD = "Correct-Horse-42"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def password_hash() -> bytes:
    return hash_password(PASSWORD)


async def add_user(cp: RunningControlPlane, password_hash: bytes, name: str, *scopes: str) -> None:
    assert cp.daemon._store is not None
    await cp.daemon._store.create_user(
        UserRecord(f"u-{name}", "default", name, password_hash, scopes, datetime.now(UTC))
    )


async def previous_step_code(totp: pyotp.TOTP) -> str:
    """The code of the time step before now, which the control plane accepts (one step
    either side) only while its clock is in the same step as ours: close to the end of
    a step, first wait for the next one to begin, so that the call has 20 s to arrive."""
    left = 30 - time.time() % 30
    if left < 10:
        await asyncio.sleep(left)
    return totp.at(time.time() - 30)


def credential(user: str, password: str = PASSWORD) -> auth_pb2.PasswordLogin:
    return auth_pb2.PasswordLogin(org="default", user=user, password=password)


async def call(cp: RunningControlPlane, method: str, request: Any) -> Any:
    """An Auth RPC; its answer, or the error it ended with."""
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        try:
            return await getattr(auth_pb2_grpc.AuthStub(channel), method)(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error


async def login(cp: RunningControlPlane, user: str, password: str = PASSWORD, **codes: str) -> Any:
    return await call(cp, "Login", auth_pb2.LoginRequest(password=credential(user, password), **codes))


async def enrolled(cp: RunningControlPlane, user: str) -> tuple[pyotp.TOTP, list[str]]:
    """``user`` with a confirmed factor (confirmed by the code of the step before now)."""
    enrollment = await call(cp, "EnrollMfa", auth_pb2.EnrollMfaRequest(password=credential(user)))
    assert isinstance(enrollment, auth_pb2.EnrollMfaResponse), enrollment
    totp = pyotp.TOTP(enrollment.secret)
    confirm = auth_pb2.ConfirmMfaRequest(password=credential(user), totp_code=await previous_step_code(totp))
    assert isinstance(await call(cp, "ConfirmMfa", confirm), auth_pb2.ConfirmMfaResponse)
    return totp, list(enrollment.recovery_codes)


def amr(access_token: str) -> list[str]:
    return list(jwt.decode(access_token, options={"verify_signature": False}).get("amr", []))


def refused(answer: Any, code: grpc.StatusCode, details: str) -> None:
    assert isinstance(answer, grpc.aio.AioRpcError), answer
    assert (answer.code(), answer.details()) == (code, details)


def cli_for(cp: RunningControlPlane, tmp_path: Path, user: str) -> tuple[Cli, tuple[str, ...]]:
    cli = Cli(tmp_path / user)
    cli.env["TESTHIDE_PASSWORD"] = PASSWORD
    cli.env.pop("TESTHIDE_TOTP_CODE", None)
    return cli, ("--server", cp.api_target, "--ca-file", str(cp.data_dir / "ca.pem"), "--user", user)


async def enroll_through_the_cli(cli: Cli, where: tuple[str, ...]) -> tuple[pyotp.TOTP, list[str], str]:
    """``testhide mfa enroll``, answering its question with a code from the secret it printed."""
    process = await cli.start("mfa", "enroll", *where, stdin=b"")
    assert process.stdout is not None
    assert process.stdin is not None
    lines: list[str] = []
    while len([line for line in lines if line.startswith("  ")]) < 10:
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line, f"the output ended early: {lines}"
        lines.append(line.rstrip("\n"))
    secret = next(line.removeprefix("secret: ") for line in lines if line.startswith("secret: "))
    totp = pyotp.TOTP(secret)
    process.stdin.write(f"{await previous_step_code(totp)}\n".encode())
    await process.stdin.drain()
    process.stdin.close()
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    codes = [line.strip() for line in lines if line.startswith("  ")]
    return totp, codes, "\n".join(lines) + err.decode()


async def test_an_admin_enrolls_through_the_cli_and_then_logs_in_with_a_code(
    cp: RunningControlPlane, tmp_path: Path, password_hash: bytes
) -> None:
    await add_user(cp, password_hash, "root", "jobs:read", "org:admin")
    cli, where = cli_for(cp, tmp_path, "root")

    before = await cli("login", *where)
    assert before.returncode == 125
    assert (
        "user root holds an admin scope and must enroll a second factor first: run 'testhide mfa"
        " enroll --server HOST:PORT --org default --user root'"
    ) in before.stderr.decode()

    totp, codes, output = await enroll_through_the_cli(cli, where)
    assert "otpauth://totp/testhide:root%40default?secret=" in output
    assert "store the recovery codes somewhere safe" in output
    assert "second factor of default/root confirmed" in output
    assert len(set(codes)) == 10

    without = await cli("login", *where)
    assert without.returncode == 125
    assert "a second factor is required: pass --totp-code (or --recovery-code)" in without.stderr.decode()
    code = totp.now()
    logged_in = await cli("login", *where, "--totp-code", code)
    assert logged_in.returncode == 0, logged_in.stderr
    stored = json.loads((tmp_path / "root" / "testhide" / "credentials.json").read_text())
    assert amr(stored["access_token"]) == ["pwd", "mfa", "otp"]
    assert (await cli("jobs", "list")).returncode == 0
    refreshed = await call(cp, "Refresh", auth_pb2.RefreshRequest(refresh_token=stored["refresh_token"]))
    assert amr(refreshed.access_token) == ["pwd", "mfa", "otp"]  # the session keeps how it was opened

    refused(await login(cp, "root", totp_code=code), UNAUTH, "invalid second-factor code")  # replayed
    with_recovery = await cli("login", *where, "--recovery-code", codes[0])
    assert with_recovery.returncode == 0, with_recovery.stderr
    stored = json.loads((tmp_path / "root" / "testhide" / "credentials.json").read_text())
    assert amr(stored["access_token"]) == ["pwd", "mfa", "kba"]
    again = await cli("login", *where, "--recovery-code", codes[0])
    assert again.returncode == 125
    assert "invalid second-factor code" in again.stderr.decode()


async def test_login_asks_for_the_code_at_a_terminal(
    cp: RunningControlPlane, tmp_path: Path, password_hash: bytes
) -> None:
    await add_user(cp, password_hash, "ada", "jobs:read")
    totp, _ = await enrolled(cp, "ada")
    cli, where = cli_for(cp, tmp_path, "ada")
    terminal, terminal_end = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *program_command("testhide.cli.main", None),
            "login",
            *where,
            env=cli.env,
            cwd=cli.cwd,
            stdin=terminal_end,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(terminal_end)
        assert process.stderr is not None
        asked = b""
        while b"second factor (a code" not in asked:
            chunk = await asyncio.wait_for(process.stderr.read(1024), 60)
            assert chunk, asked
            asked += chunk
        os.write(terminal, f"{totp.now()}\n".encode())
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        os.close(terminal)
    assert process.returncode == 0, asked + err
    stored = json.loads((tmp_path / "ada" / "testhide" / "credentials.json").read_text())
    assert amr(stored["access_token"]) == ["pwd", "mfa", "otp"]


async def test_users_without_a_factor_log_in_as_before_and_wrong_passwords_say_nothing_more(
    cp: RunningControlPlane, password_hash: bytes
) -> None:
    await add_user(cp, password_hash, "bob", "jobs:read")
    await add_user(cp, password_hash, "root", "agents:admin")
    pair = await login(cp, "bob")
    assert amr(pair.access_token) == ["pwd"]
    api_key_pair = await call(cp, "Login", auth_pb2.LoginRequest(api_key=cp.admin_key))
    assert amr(api_key_pair.access_token) == []

    refused(await login(cp, "root", "Wrong-Horse-42"), UNAUTH, "invalid credentials")
    await enrolled(cp, "bob")
    refused(await login(cp, "bob", "Wrong-Horse-42"), UNAUTH, "invalid credentials")
    refused(
        await login(cp, "bob"), UNAUTH, "a second factor is required: pass --totp-code (or --recovery-code)"
    )


async def test_replacing_a_factor_needs_a_current_code(cp: RunningControlPlane, password_hash: bytes) -> None:
    await add_user(cp, password_hash, "ada", "jobs:read")
    totp, _ = await enrolled(cp, "ada")
    refused(
        await call(cp, "EnrollMfa", auth_pb2.EnrollMfaRequest(password=credential("ada"))),
        UNAUTH,
        "user ada has a second factor: replacing it takes a current code",
    )
    replaced = await call(
        cp, "EnrollMfa", auth_pb2.EnrollMfaRequest(password=credential("ada"), totp_code=totp.now())
    )
    assert isinstance(replaced, auth_pb2.EnrollMfaResponse)
    refused(
        await call(
            cp, "ConfirmMfa", auth_pb2.ConfirmMfaRequest(password=credential("ada"), totp_code="000000")
        ),
        UNAUTH,
        "invalid second-factor code",
    )
    refused(
        await call(cp, "ConfirmMfa", auth_pb2.ConfirmMfaRequest(password=credential("ada", "nope"))),
        UNAUTH,
        "invalid credentials",
    )


async def test_wrong_codes_alone_lock_the_account_and_raise_the_alert(
    tmp_path: Path, password_hash: bytes
) -> None:
    policy = LockoutPolicy(failures=3, first_delay=timedelta(minutes=1))
    async with control_plane(tmp_path, lockout=policy, failure_spike_threshold=3) as cp:
        await add_user(cp, password_hash, "ada", "jobs:read")
        totp, _ = await enrolled(cp, "ada")
        wrong = f"{(int(totp.now()) + 500_000) % 1_000_000:06d}"
        with capture_logs() as events:
            for _ in range(3):
                refused(await login(cp, "ada", totp_code=wrong), UNAUTH, "invalid second-factor code")
        locked = await login(cp, "ada", totp_code=totp.now())
        assert isinstance(locked, grpc.aio.AioRpcError)
        assert locked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert any(e["event"] == "auth_failure_spike" and e["kind"] == "account" for e in events)


async def test_the_operator_resets_a_lost_factor(cp: RunningControlPlane, password_hash: bytes) -> None:
    await add_user(cp, password_hash, "root", "org:admin")
    totp, _ = await enrolled(cp, "root")
    assert isinstance(await login(cp, "root", totp_code=totp.now()), auth_pb2.TokenPair)

    code, _, err = await operator("users", "reset-mfa", "--data-dir", str(cp.data_dir), "root")
    assert code == 0, err
    assert "second factor of default/root removed" in err
    answer = await login(cp, "root", totp_code=totp.at(time.time() + 30))
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() == grpc.StatusCode.FAILED_PRECONDITION
    code, _, err = await operator("users", "reset-mfa", "--data-dir", str(cp.data_dir), "nobody")
    assert code == 1
    assert "no user default/nobody" in err

    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    actions = [e.event.action for e in entries]
    assert {"mfa_enrolled", "mfa_confirmed", "mfa_reset"} <= set(actions)


async def test_the_secret_and_the_recovery_codes_are_not_stored_in_clear(
    cp: RunningControlPlane, password_hash: bytes
) -> None:
    await add_user(cp, password_hash, "ada", "jobs:read")
    totp, codes = await enrolled(cp, "ada")
    assert isinstance(await login(cp, "ada", recovery_code=codes[1]), auth_pb2.TokenPair)

    stored = b"".join(p.read_bytes() for p in cp.data_dir.glob("testhide.db*"))
    assert b"mfa_factors" in stored  # what is searched is the database
    assert totp.secret.encode() not in stored
    assert pyotp.TOTP(totp.secret).byte_secret() not in stored
    for recovery in codes:
        assert recovery.encode() not in stored
        assert recovery.replace("-", "").encode() not in stored
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    assert totp.secret not in json.dumps([e.as_json() for e in entries])
