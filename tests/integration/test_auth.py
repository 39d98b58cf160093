"""Tokens, sessions, scopes, tenancy, abuse limits and the audit trail, against
a real control plane."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane.auth.limits import LockoutPolicy
from testhide.controlplane.auth.tokens import AUDIENCE, SigningKeys, issuer_for
from testhide.controlplane.datadir import DataDir
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    control_plane,
    eventually,
    operator,
    running_agent,
)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def channel(cp: RunningControlPlane) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem))


async def list_jobs_code(cp: RunningControlPlane, token: str) -> grpc.StatusCode:
    async with channel(cp) as ch:
        try:
            await jobs_pb2_grpc.JobsStub(ch).List(
                jobs_pb2.ListJobsRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def login(cp: RunningControlPlane, api_key: str | None = None) -> auth_pb2.TokenPair:
    async with channel(cp) as ch:
        return await auth_pb2_grpc.AuthStub(ch).Login(auth_pb2.LoginRequest(api_key=api_key or cp.admin_key))


async def refresh(cp: RunningControlPlane, token: str) -> auth_pb2.TokenPair:
    async with channel(cp) as ch:
        return await auth_pb2_grpc.AuthStub(ch).Refresh(auth_pb2.RefreshRequest(refresh_token=token))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Forged and broken tokens --------------------------------------------------------------------------------


def forge(cp: RunningControlPlane, **overrides: Any) -> str:
    directory = DataDir(cp.data_dir)
    keys = SigningKeys(directory, directory.master_key())
    kid, key = keys.signing_key()
    now = int(time.time())
    claims = {
        "iss": issuer_for("testhide.local"),
        "aud": AUDIENCE,
        "sub": "api_key:x",
        "org": "default",
        "scope": "jobs:read jobs:write",
        "sid": "fnope",
        "jti": "j",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides.pop("claims", {}))
    for name in overrides.pop("drop", []):
        del claims[name]
    headers = {"kid": kid, "typ": "at+jwt", **overrides.pop("headers", {})}
    return jwt.encode(
        claims, overrides.pop("key", key), algorithm=overrides.pop("alg", "RS256"), headers=headers
    )


async def test_a_well_formed_token_of_our_own_is_accepted(cp: RunningControlPlane) -> None:
    """The control for the matrix below: only the flaw makes those fail."""
    pair = await login(cp)
    assert await list_jobs_code(cp, pair.access_token) == grpc.StatusCode.OK


async def test_forged_and_broken_tokens_are_unauthenticated(cp: RunningControlPlane) -> None:
    directory = DataDir(cp.data_dir)
    keys = SigningKeys(directory, directory.master_key())
    kid, key = keys.signing_key()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    payload = b64(
        json.dumps(
            {
                "iss": issuer_for("testhide.local"),
                "aud": AUDIENCE,
                "sub": "api_key:x",
                "org": "default",
                "scope": "jobs:read",
                "sid": "f",
                "jti": "j",
                "iat": now,
                "exp": now + 600,
            }
        ).encode()
    )
    hs256 = f"{header}.{payload}." + b64(
        hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    )
    alg_none = f"{b64(json.dumps({'alg': 'none', 'typ': 'at+jwt', 'kid': kid}).encode())}.{payload}."
    pair = await login(cp)
    other_key = __import__(
        "cryptography.hazmat.primitives.asymmetric.rsa", fromlist=["x"]
    ).generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "alg none": alg_none,
        "HS256 with the RSA public key": hs256,
        "no exp": forge(cp, drop=["exp"]),
        "wrong aud": forge(cp, claims={"aud": "someone-else"}),
        "wrong iss": forge(cp, claims={"iss": "https://evil.example"}),
        "expired": forge(cp, claims={"iat": now - 3600, "exp": now - 1200}),
        "iat in the future": forge(cp, claims={"iat": now + 3600, "exp": now + 4000}),
        "no typ": forge(cp, headers={"typ": "JWT"}),
        "unknown kid": forge(cp, headers={"kid": "not-ours"}),
        "signed by a stranger": forge(cp, key=other_key),
        "refresh token as access token": pair.refresh_token,
        "garbage": "not.a.token",
    }
    for name, token in cases.items():
        assert await list_jobs_code(cp, token) == UNAUTH, name


async def rotate_signing_key(cp: RunningControlPlane) -> None:
    code, _, err = await operator("signing-keys", "rotate", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    kid = err.split()[2]  # "signing key KID active"
    signing_keys = cp.daemon.signing_keys
    assert signing_keys is not None
    signing_keys.reload()  # the watcher would within a second; do not wait for it
    assert signing_keys.active == kid


async def test_a_token_signed_by_a_rotated_out_key_is_refused(cp: RunningControlPlane) -> None:
    old = (await login(cp)).access_token
    await rotate_signing_key(cp)
    assert await list_jobs_code(cp, old) == grpc.StatusCode.OK  # overlap: the previous key still verifies
    await rotate_signing_key(cp)
    assert await list_jobs_code(cp, old) == UNAUTH
    assert await list_jobs_code(cp, (await login(cp)).access_token) == grpc.StatusCode.OK


async def test_jwks_verifies_our_tokens(cp: RunningControlPlane) -> None:
    async with channel(cp) as ch:
        jwks = json.loads(
            (await auth_pb2_grpc.AuthStub(ch).GetSigningKeys(auth_pb2.GetSigningKeysRequest())).jwks_json
        )
    token = (await login(cp)).access_token
    kid = jwt.get_unverified_header(token)["kid"]
    [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
    assert "d" not in jwk  # public parts only
    assert jwk["alg"] == "RS256"
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=AUDIENCE)
    assert claims["org"] == "default"
    assert claims["exp"] - claims["iat"] == 600


# Sessions --------------------------------------------------------------------------------------------------


async def test_refresh_rotates_and_a_reply_lost_in_transit_may_be_retried(cp: RunningControlPlane) -> None:
    first = await login(cp)
    second = await refresh(cp, first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    retried = await refresh(cp, first.refresh_token)  # within the grace window: a retry, not theft
    assert await list_jobs_code(cp, retried.access_token) == grpc.StatusCode.OK


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(tmp_path: Path) -> None:
    async with control_plane(tmp_path, refresh_reuse_grace=timedelta(0)) as cp:
        first = await login(cp)
        second = await refresh(cp, first.refresh_token)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await refresh(cp, first.refresh_token)  # the thief's copy
        assert error.value.code() == UNAUTH
        assert "revoked" in (error.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError):
            await refresh(cp, second.refresh_token)  # the legitimate holder is logged out too
        deadline = time.monotonic() + 5
        while await list_jobs_code(cp, second.access_token) == grpc.StatusCode.OK:  # revocation cache: 1 s
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await list_jobs_code(cp, second.access_token) == UNAUTH


async def test_revoking_an_api_key_ends_its_sessions(cp: RunningControlPlane) -> None:
    code, key, err = await operator("api-keys", "create", "--data-dir", str(cp.data_dir), "--name", "ci-bot")
    assert code == 0, err
    key = key.strip()
    pair = await login(cp, key)
    assert await list_jobs_code(cp, pair.access_token) == grpc.StatusCode.OK
    _, listed, _ = await operator("api-keys", "list", "--json", "--data-dir", str(cp.data_dir))
    entry = next(k for k in json.loads(listed) if k["name"] == "ci-bot")
    assert entry["prefix"] == key.rsplit("_", 1)[0]
    assert entry["last_used_at"]
    assert key not in listed
    code, _, err = await operator("api-keys", "revoke", "--data-dir", str(cp.data_dir), entry["prefix"])
    assert code == 0, err
    deadline = time.monotonic() + 5
    while await list_jobs_code(cp, pair.access_token) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await refresh(cp, pair.refresh_token)
    assert error.value.code() == UNAUTH
    with pytest.raises(grpc.aio.AioRpcError):
        await login(cp, key)
    db = sqlite3.connect(cp.data_dir / "testhide.db")
    assert key.encode() not in b"".join(bytes(r[0]) for r in db.execute("SELECT secret_hash FROM api_keys"))


async def test_users_log_in_with_a_password_through_the_cli(cp: RunningControlPlane, tmp_path: Path) -> None:
    create_ada = ("users", "create", "--data-dir", str(cp.data_dir), "ada")
    code, _, err = await operator(*create_ada, stdin=b"weak\n")
    assert code == 1
    assert "at least 12 characters" in err
    code, _, err = await operator(*create_ada, stdin=b"Correct-Horse-42\n")
    assert code == 0, err
    cli = Cli(tmp_path / "ada")
    cli.env["TESTHIDE_PASSWORD"] = "Correct-Horse-42"
    result = await cli(
        "login", "--server", cp.api_target, "--user", "ada", "--ca-file", str(cp.data_dir / "ca.pem")
    )
    assert result.returncode == 0, result.stderr
    stored = (tmp_path / "ada" / "testhide" / "credentials.json").read_text()
    assert "Correct-Horse-42" not in stored
    assert "refresh_token" in stored
    assert (await cli("jobs", "list")).returncode == 0


# Lockout, rate limits, alerts ------------------------------------------------------------------------------


async def password_login(cp: RunningControlPlane, user: str, password: str) -> grpc.aio.AioRpcError | None:
    async with channel(cp) as ch:
        try:
            await auth_pb2_grpc.AuthStub(ch).Login(
                auth_pb2.LoginRequest(
                    password=auth_pb2.PasswordLogin(org="default", user=user, password=password)
                )
            )
        except grpc.aio.AioRpcError as error:
            return error
    return None


async def test_lockout_engages_after_five_failures_and_recovers(tmp_path: Path) -> None:
    policy = LockoutPolicy(failures=5, first_delay=timedelta(seconds=2))
    async with control_plane(tmp_path, lockout=policy) as cp:
        from testhide.controlplane.auth.passwords import hash_password
        from testhide.controlplane.store.base import UserRecord

        assert cp.daemon._store is not None
        await cp.daemon._store.create_user(
            UserRecord(
                "u1", "default", "grace", hash_password("Str0ng-Passw0rd!"), ("jobs:read",), datetime.now(UTC)
            )
        )
        for user in ("grace", "nobody-by-this-name"):
            for _ in range(5):
                error = await password_login(cp, user, "wrong-guess")
                assert error is not None
                assert error.code() == UNAUTH
                assert error.details() == "invalid credentials"
            locked = await password_login(cp, user, "Str0ng-Passw0rd!")
            assert locked is not None
            assert locked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(locked.trailing_metadata() or ())["retry-after"] in ("1", "2")
        await asyncio.sleep(2.1)  # the backoff itself is what is under test
        assert await password_login(cp, "grace", "Str0ng-Passw0rd!") is None


async def test_rate_limits_engage_with_a_retry_hint_and_recover(tmp_path: Path) -> None:
    async with control_plane(tmp_path, rate_per_address=5.0) as cp, channel(cp) as ch:
        stub = auth_pb2_grpc.AuthStub(ch)
        codes = []
        for _ in range(15):
            try:
                await stub.GetSigningKeys(auth_pb2.GetSigningKeysRequest())
                codes.append("ok")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
                hint = dict(error.trailing_metadata() or ())["retry-after"]
        assert codes[:10] == ["ok"] * 10
        assert "RESOURCE_EXHAUSTED" in codes
        await asyncio.sleep(int(hint))
        await stub.GetSigningKeys(auth_pb2.GetSigningKeysRequest())


async def test_a_burst_of_failures_raises_an_alert(tmp_path: Path) -> None:
    async with control_plane(tmp_path, failure_spike_threshold=3) as cp:
        with capture_logs() as events:
            for _ in range(3):
                await password_login(cp, "mallory", "guess")
    spikes = [e for e in events if e["event"] == "auth_failure_spike"]
    assert spikes
    assert {e["kind"] for e in spikes} >= {"ip"}


# Scopes and tenancy -----------------------------------------------------------------------------------------


async def scoped_key(cp: RunningControlPlane, org: str, *scopes: str) -> str:
    args = ["api-keys", "create", "--data-dir", str(cp.data_dir), "--org", org, "--name", f"k-{org}"]
    for scope in scopes:
        args += ["--scope", scope]
    code, out, err = await operator(*args)
    assert code == 0, err
    return out.strip()


async def test_a_read_only_key_cannot_write(cp: RunningControlPlane) -> None:
    metadata = await cp.bearer(await scoped_key(cp, "default", "jobs:read"))
    admin = await cp.bearer()
    async with channel(cp) as ch:
        jobs, secrets = jobs_pb2_grpc.JobsStub(ch), jobs_pb2_grpc.SecretsStub(ch)
        job = (
            await jobs.Submit(
                jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"])),
                metadata=admin,
            )
        ).job
        await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=metadata)  # reading is allowed
        for call in (
            jobs.Submit(jobs_pb2.SubmitJobRequest(spec=job.spec), metadata=metadata),
            jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id), metadata=metadata),
            secrets.Set(jobs_pb2.SetSecretRequest(name="X_TOKEN", value=b"v"), metadata=metadata),
            secrets.Delete(jobs_pb2.DeleteSecretRequest(name="X_TOKEN"), metadata=metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=admin)
        ).status == jobs_pb2.JOB_STATUS_QUEUED


async def test_no_organisation_sees_another(cp: RunningControlPlane, tmp_path: Path) -> None:
    code, _, err = await operator("orgs", "create", "--data-dir", str(cp.data_dir), "beta")
    assert code == 0, err
    alpha = await cp.bearer()
    beta = await cp.bearer(await scoped_key(cp, "beta", "jobs:read", "jobs:write", "secrets:write"))
    async with channel(cp) as ch:
        jobs, secrets = jobs_pb2_grpc.JobsStub(ch), jobs_pb2_grpc.SecretsStub(ch)

        async def chunks() -> AsyncIterator[jobs_pb2.DataChunk]:
            yield jobs_pb2.DataChunk(data=b"")

        workspace = await jobs.UploadWorkspace(chunks(), metadata=alpha)
        job = (
            await jobs.Submit(
                jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"])),
                metadata=alpha,
            )
        ).job
        await secrets.Set(jobs_pb2.SetSecretRequest(name="ALPHA_ONLY", value=b"classified"), metadata=alpha)
        cross: dict[str, Awaitable[object]] = {
            "get job": jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=beta),
            "cancel job": jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id), metadata=beta),
            "artifacts": jobs.ListArtifacts(jobs_pb2.JobRef(job_id=job.id), metadata=beta),
            "test results": jobs.GetTestResults(jobs_pb2.JobRef(job_id=job.id), metadata=beta),
            "delete secret": secrets.Delete(jobs_pb2.DeleteSecretRequest(name="ALPHA_ONLY"), metadata=beta),
        }
        for name, call in cross.items():
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), name
            details = error.value.details() or ""
            assert "classified" not in details, name  # no data, only a refusal
            assert JOB_IMAGE not in details, name
        for stream in (
            jobs.FollowLogs(jobs_pb2.FollowLogsRequest(job_id=job.id), metadata=beta),
            jobs.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(job_id=job.id, path="x"), metadata=beta),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stream.read()
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await jobs.Submit(
                jobs_pb2.SubmitJobRequest(
                    spec=jobs_pb2.JobSpec(
                        image=JOB_IMAGE, command=["true"], workspace_id=workspace.workspace_id
                    )
                ),
                metadata=beta,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as error:  # another org's secret, by name
            await jobs.Submit(
                jobs_pb2.SubmitJobRequest(
                    spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], secrets=["ALPHA_ONLY"])
                ),
                metadata=beta,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list((await jobs.List(jobs_pb2.ListJobsRequest(), metadata=beta)).jobs) == []
        assert [
            s.name for s in (await secrets.List(jobs_pb2.ListSecretsRequest(), metadata=beta)).secrets
        ] == []

    # An agent of beta never receives alpha's job.
    runtime = FakeRuntime()
    async with running_agent(cp, tmp_path, runtime, name="beta-agent", org="beta"):
        scheduler = cp.daemon.scheduler
        assert scheduler is not None
        beta_job = None
        async with channel(cp) as ch:
            beta_job = (
                await jobs_pb2_grpc.JobsStub(ch).Submit(
                    jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"])),
                    metadata=beta,
                )
            ).job
            await eventually(lambda: beta_job.id in runtime.started, 30, "the dispatcher to run for beta")
            assert job.id not in runtime.started
            shown = await jobs_pb2_grpc.JobsStub(ch).Get(
                jobs_pb2.GetJobRequest(job_id=job.id), metadata=alpha
            )
            assert shown.status == jobs_pb2.JOB_STATUS_QUEUED


# Audit ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["edit", "delete-middle", "reorder", "truncate"])
async def test_tampering_with_the_audit_log_is_detected(cp: RunningControlPlane, tamper: str) -> None:
    for _ in range(3):
        await login(cp)
    code, _, err = await operator("audit", "verify", "--data-dir", str(cp.data_dir))
    assert code == 0
    assert "intact" in err
    db = sqlite3.connect(cp.data_dir / "testhide.db")
    with db:
        match tamper:
            case "edit":
                db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
            case "delete-middle":
                db.execute("DELETE FROM audit_log WHERE seq = 2")
            case "reorder":
                rows = db.execute("SELECT seq, hash, prev_hash FROM audit_log WHERE seq IN (2, 3)").fetchall()
                db.execute("UPDATE audit_log SET seq = -1 WHERE seq = 2")
                db.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
                db.execute("UPDATE audit_log SET seq = 3 WHERE seq = -1")
                assert rows
            case "truncate":
                db.execute("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)")
    db.close()
    code, _, err = await operator("audit", "verify", "--data-dir", str(cp.data_dir))
    assert code == 1, err
    assert "audit log damaged" in err, err


async def test_revoking_an_organisation_cuts_off_its_keys_and_sessions(cp: RunningControlPlane) -> None:
    code, _, err = await operator("orgs", "create", "--data-dir", str(cp.data_dir), "gamma")
    assert code == 0, err
    key = await scoped_key(cp, "gamma", "jobs:read")
    pair = await login(cp, key)
    code, _, err = await operator("orgs", "revoke", "--data-dir", str(cp.data_dir), "gamma")
    assert code == 0, err
    assert "1 api_keys" in err, err
    deadline = time.monotonic() + 5
    while await list_jobs_code(cp, pair.access_token) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError):
        await login(cp, key)
    assert await list_jobs_code(cp, (await login(cp)).access_token) == grpc.StatusCode.OK  # others unaffected
