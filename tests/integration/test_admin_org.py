"""The Admin service's org:admin half against a real control plane: API keys, users and the
secrets listing over the API, only with the scope, only in the caller's organisation, each in
the audit log with the caller as actor; the scope-escalation refusal; the organisation's limit
on the lifetime of admin keys; and a secret's last use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane.store.base import MfaFactorRecord
from testhide.protos.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    control_plane,
    eventually,
    operator,
    running_agent,
)
from tests.json_schema import assert_matches_example
from tests.pg import fresh_database

DENIED, NOT_FOUND, INVALID = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
)
PASSWORD = "Correct-Horse-42"


@pytest.fixture(params=["sqlite", "postgres"])
async def any_cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """On SQLite, and on PostgreSQL (a fresh database of the test cluster)."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(fresh_database()) if request.param == "postgres" else None
        yield await stack.enter_async_context(control_plane(tmp_path, database_url=url))


class Api:
    """The Admin, Auth and Secrets stubs on one channel, as one credential."""

    def __init__(self, cp: RunningControlPlane, channel: grpc.aio.Channel, metadata: Any) -> None:
        self.cp, self.metadata = cp, metadata
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.auth = auth_pb2_grpc.AuthStub(channel)
        self.secrets = jobs_pb2_grpc.SecretsStub(channel)
        self.jobs = jobs_pb2_grpc.JobsStub(channel)

    async def create_key(self, name: str, *scopes: str, expires_in: timedelta | None = None) -> str:
        request = admin_pb2.CreateApiKeyRequest(name=name, scopes=list(scopes))
        if expires_in is not None:
            request.expires_in.FromTimedelta(expires_in)
        return (await self.admin.CreateApiKey(request, metadata=self.metadata)).api_key


async def api(cp: RunningControlPlane, stack: AsyncExitStack, api_key: str | None = None) -> Api:
    channel = await stack.enter_async_context(
        grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem))
    )
    return Api(cp, channel, await cp.bearer(api_key))


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def audit(cp: RunningControlPlane) -> list[dict[str, Any]]:
    code, out, err = await operator("audit", "export", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def key_id(api_key: str) -> str:
    return api_key.split("_")[1]


async def operator_key(cp: RunningControlPlane, org: str, *scopes: str, expires_in: str = "") -> str:
    args = ["api-keys", "create", "--data-dir", str(cp.data_dir), "--org", org, "--name", f"k-{org}"]
    args += [a for s in scopes for a in ("--scope", s)] + (["--expires-in", expires_in] if expires_in else [])
    code, out, err = await operator(*args)
    assert code == 0, err
    return out.strip()


def every_call(a: Api) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of each org:admin RPC, harmless whoever makes it."""
    m = a.metadata
    return {
        "CreateApiKey": lambda: a.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(name="made", scopes=["jobs:read"]), metadata=m
        ),
        "ListApiKeys": lambda: a.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=m),
        "RevokeApiKey": lambda: a.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id="0123456789abcdef"), metadata=m
        ),
        "CreateUser": lambda: a.admin.CreateUser(
            admin_pb2.CreateUserRequest(name="made", scopes=["jobs:read"], password=PASSWORD), metadata=m
        ),
        "ListUsers": lambda: a.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=m),
        "RevokeUser": lambda: a.admin.RevokeUser(admin_pb2.RevokeUserRequest(name="nobody"), metadata=m),
        "ListSecrets": lambda: a.admin.ListSecrets(jobs_pb2.ListSecretsRequest(), metadata=m),
    }


async def test_each_org_admin_rpc_needs_the_scope_and_is_audited(cp: RunningControlPlane) -> None:
    async with AsyncExitStack() as stack:
        no_admin = await operator_key(
            cp, "default", "jobs:read", "jobs:write", "secrets:write", "agents:admin", expires_in="1d"
        )
        lacking = await api(cp, stack, no_admin)
        for name, call in every_call(lacking).items():
            error = await refused(call())
            assert error.code() == DENIED, name
            assert "org:admin" in (error.details() or ""), name
        admin = await api(cp, stack)
        outcomes = {}
        for name, call in every_call(admin).items():
            try:
                await call()
                outcomes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                outcomes[name] = error.code()
    assert outcomes == {
        "CreateApiKey": grpc.StatusCode.OK,
        "ListApiKeys": grpc.StatusCode.OK,
        "RevokeApiKey": NOT_FOUND,  # no such key: the call went through
        "CreateUser": grpc.StatusCode.OK,
        "ListUsers": grpc.StatusCode.OK,
        "RevokeUser": NOT_FOUND,
        "ListSecrets": grpc.StatusCode.OK,
    }
    actor = f"api_key:{key_id(cp.admin_key)}"
    mine = [(e["action"], e["target"], e["org"]) for e in await audit(cp) if e["actor"] == actor]
    assert [a for a, _, _ in mine if a != "login"] == [
        "api_key_created",
        "api_keys_listed",
        "user_created",
        "users_listed",
        "secrets_listed",
    ]
    assert all(org == "default" for _, _, org in mine)


async def test_a_key_created_over_the_api_logs_in_until_revoked(any_cp: RunningControlPlane) -> None:
    cp = any_cp
    async with AsyncExitStack() as stack:
        admin = await api(cp, stack)
        created = await admin.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(name="ci-bot", scopes=["jobs:read", "jobs:write"]),
            metadata=admin.metadata,
        )
        assert created.api_key.startswith(f"thk_{created.info.id}_")
        assert (created.info.name, list(created.info.scopes), created.info.state) == (
            "ci-bot",
            ["jobs:read", "jobs:write"],
            "active",
        )
        assert not created.info.HasField("expires_at")  # no admin scope: no limit
        bot = await api(cp, stack, created.api_key)
        await bot.jobs.List(jobs_pb2.ListJobsRequest(), metadata=bot.metadata)
        listed = (await admin.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=admin.metadata)).keys
        assert [k.name for k in listed] == ["admin", "ci-bot"]
        assert created.api_key not in str(listed)  # never the secret
        revoked = await admin.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=f"thk_{created.info.id}"), metadata=admin.metadata
        )
        assert revoked.state == "revoked"
        assert revoked.HasField("revoked_at")
        error = await refused(admin.auth.Login(auth_pb2.LoginRequest(api_key=created.api_key)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED

        async def session_over() -> bool:
            try:
                await bot.jobs.List(jobs_pb2.ListJobsRequest(), metadata=bot.metadata)
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        await eventually(session_over, 5, "the revoked key's session to end")
    entries = {e["action"]: e for e in await audit(cp)}
    assert entries["api_key_created"]["actor"] == f"api_key:{key_id(cp.admin_key)}"
    assert entries["api_key_created"]["target"] == created.info.id
    assert entries["api_key_revoked"]["target"] == created.info.id
    assert entries["api_key_revoked"]["source_ip"].startswith("ipv4:127.0.0.1")


async def test_users_over_the_api(any_cp: RunningControlPlane) -> None:
    cp = any_cp
    async with AsyncExitStack() as stack:
        admin = await api(cp, stack)
        create = admin.admin.CreateUser
        for weak in ("", "short", "alllowercaseletters", f"x-{'ada'}-Pass-1234"):
            error = await refused(
                create(admin_pb2.CreateUserRequest(name="ada", password=weak), metadata=admin.metadata)
            )
            assert error.code() == INVALID, weak
            assert not weak or weak not in (error.details() or "")  # the password is never echoed
        user = await create(
            admin_pb2.CreateUserRequest(name="ada", scopes=["jobs:read"], password=PASSWORD),
            metadata=admin.metadata,
        )
        assert (user.name, list(user.scopes), user.state) == ("ada", ["jobs:read"], "active")
        again = await refused(
            create(admin_pb2.CreateUserRequest(name="ada", password=PASSWORD), metadata=admin.metadata)
        )
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        password = auth_pb2.LoginRequest(
            password=auth_pb2.PasswordLogin(org="default", user="ada", password=PASSWORD)
        )
        await admin.auth.Login(password)  # before it has a second factor
        users = (await admin.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=admin.metadata)).users
        assert [(u.name, u.state, u.mfa) for u in users] == [("ada", "active", False)]
        revoked = await admin.admin.RevokeUser(
            admin_pb2.RevokeUserRequest(name="ada"), metadata=admin.metadata
        )
        assert revoked.state == "revoked"
        assert (await refused(admin.auth.Login(password))).code() == grpc.StatusCode.UNAUTHENTICATED
        store = cp.daemon._store
        assert store is not None
        ada = await store.find_user("default", "ada")
        assert ada is not None
        factor = MfaFactorRecord("f1", "default", ada.id, b"k", b"s", datetime.now(UTC))
        await store.create_mfa_factor(factor, [])
        assert await store.confirm_mfa_factor("f1", 1, datetime.now(UTC))
        users = (await admin.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=admin.metadata)).users
        assert [(u.name, u.state, u.mfa) for u in users] == [("ada", "revoked", True)]
    created = [e for e in await audit(cp) if e["action"] == "user_created"]
    assert [(e["actor"], e["target"], e["details"]["scopes"]) for e in created] == [
        (f"api_key:{key_id(cp.admin_key)}", "ada", ["jobs:read"])
    ]
    assert PASSWORD not in json.dumps(await audit(cp))


async def test_another_organisations_keys_and_users_are_not_found(cp: RunningControlPlane) -> None:
    code, _, err = await operator("orgs", "create", "--data-dir", str(cp.data_dir), "beta")
    assert code == 0, err
    async with AsyncExitStack() as stack:
        alpha = await api(cp, stack)
        alpha_key = await alpha.create_key("alpha-bot", "jobs:read")
        await alpha.admin.CreateUser(
            admin_pb2.CreateUserRequest(name="ada", scopes=["jobs:read"], password=PASSWORD),
            metadata=alpha.metadata,
        )
        await alpha.secrets.Set(
            jobs_pb2.SetSecretRequest(name="ALPHA_ONLY", value=b"v"), metadata=alpha.metadata
        )
        beta = await api(cp, stack, await operator_key(cp, "beta", "org:admin", "jobs:read", expires_in="1d"))
        for call in (
            beta.admin.RevokeApiKey(
                admin_pb2.RevokeApiKeyRequest(key_id=key_id(alpha_key)), metadata=beta.metadata
            ),
            beta.admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=alpha_key), metadata=beta.metadata),
            beta.admin.RevokeUser(admin_pb2.RevokeUserRequest(name="ada"), metadata=beta.metadata),
        ):
            error = await refused(call)
            assert error.code() == NOT_FOUND
            assert "alpha-bot" not in (error.details() or "")
        keys = (await beta.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=beta.metadata)).keys
        assert [k.name for k in keys] == ["k-beta"]
        assert (
            list((await beta.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=beta.metadata)).users)
            == []
        )
        secrets = await beta.admin.ListSecrets(jobs_pb2.ListSecretsRequest(), metadata=beta.metadata)
        assert list(secrets.secrets) == []
        await alpha.jobs.List(jobs_pb2.ListJobsRequest(), metadata=await cp.bearer(alpha_key))  # still valid
        assert "ada" in str(
            await alpha.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=alpha.metadata)
        )
    code, _, err = await operator("orgs", "revoke", "--data-dir", str(cp.data_dir), "beta")
    assert code == 0, err
    code, out, err = await operator("orgs", "list", "--json", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    states = {o["name"]: (o["state"], o["revoked_at"] is not None) for o in json.loads(out)}
    assert states == {"beta": ("revoked", True), "default": ("active", False)}


async def test_an_admin_cannot_grant_a_scope_it_does_not_hold(cp: RunningControlPlane) -> None:
    async with AsyncExitStack() as stack:
        org_admin = await api(
            cp, stack, await operator_key(cp, "default", "org:admin", "jobs:read", expires_in="1d")
        )
        for call in (
            org_admin.create_key("escalate", "agents:admin", expires_in=timedelta(days=1)),
            org_admin.create_key("escalate", "jobs:write"),
            org_admin.admin.CreateUser(
                admin_pb2.CreateUserRequest(name="eve", scopes=["secrets:write"], password=PASSWORD),
                metadata=org_admin.metadata,
            ),
        ):
            error = await refused(call)
            assert error.code() == DENIED
            assert (error.details() or "").startswith("cannot grant a scope you do not hold: ")
        assert await org_admin.create_key("reader", "jobs:read")  # what it holds, it may grant
        unknown = await refused(org_admin.create_key("odd", "root"))
        assert unknown.code() == INVALID
    # The operator is not limited by any credential's scopes.
    assert (await operator_key(cp, "default", "agents:admin", expires_in="1d")).startswith("thk_")


async def test_admin_keys_must_expire_within_the_organisations_limit(any_cp: RunningControlPlane) -> None:
    cp = any_cp
    async with AsyncExitStack() as stack:
        admin = await api(cp, stack)
        keys = (await admin.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=admin.metadata)).keys
        bootstrap = keys[0].expires_at.ToDatetime(tzinfo=UTC) - keys[0].created_at.ToDatetime(tzinfo=UTC)
        assert bootstrap == timedelta(days=90)  # init's key holds the default from the first minute
        for expires_in in (None, timedelta(days=91)):
            error = await refused(admin.create_key("ops", "org:admin", expires_in=expires_in))
            assert error.code() == INVALID
            assert error.details() == (
                "organisation default allows API keys with org:admin to live at most 90d:"
                " give this one an expiry (--expires-in 90d or less)"
            )
        assert await admin.create_key("ops", "org:admin", expires_in=timedelta(days=30))
        assert await admin.create_key("reader", "jobs:read")  # no admin scope: no limit
        code, _, err = await operator(
            "api-keys", "create", "--data-dir", str(cp.data_dir), "--name", "x", "--scope", "agents:admin"
        )
        assert code == 1
        assert "at most 90d" in err
        assert "--expires-in" in err
        assert "Traceback" not in err

        set_limit = ("orgs", "set", "default", "--data-dir", str(cp.data_dir), "--admin-key-max-lifetime")
        code, _, err = await operator(*set_limit, "7d")
        assert code == 0, err
        error = await refused(admin.create_key("ops", "org:admin", expires_in=timedelta(days=30)))
        assert "at most 7d" in (error.details() or "")
        code, _, err = await operator(*set_limit, "none")
        assert code == 0, err
        assert await admin.create_key("forever", "org:admin")
        code, _, err = await operator(*set_limit, "soon")
        assert code == 2
        assert "none" in err
    code, out, err = await operator("orgs", "list", "--json", "--data-dir", str(cp.data_dir))
    assert code == 0, err
    assert_matches_example("testhide-controlplane orgs list", json.loads(out))
    assert [(o["name"], o["state"], o["admin_key_max_lifetime_s"]) for o in json.loads(out)] == [
        ("default", "active", None)
    ]
    policies = [e for e in await audit(cp) if e["action"] == "org_policy_set"]
    assert [e["details"]["admin_key_max_lifetime_s"] for e in policies] == [7 * 86400, None]
    assert all(e["actor"].startswith("operator:") for e in policies)


async def test_a_secrets_last_use_is_the_job_it_was_handed_to(
    any_cp: RunningControlPlane, tmp_path: Path
) -> None:
    cp = any_cp
    async with AsyncExitStack() as stack:
        admin = await api(cp, stack)
        for name in ("DEPLOY_TOKEN", "UNUSED"):
            await admin.secrets.Set(
                jobs_pb2.SetSecretRequest(name=name, value=b"s3cret"), metadata=admin.metadata
            )
        before = datetime.now(UTC)
        runtime = FakeRuntime()
        async with running_agent(cp, tmp_path, runtime):
            job = (
                await admin.jobs.Submit(
                    jobs_pb2.SubmitJobRequest(
                        spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], secrets=["DEPLOY_TOKEN"])
                    ),
                    metadata=admin.metadata,
                )
            ).job
            await eventually(lambda: job.id in runtime.started, 30, "the job to start")
        for listing in (
            await admin.admin.ListSecrets(jobs_pb2.ListSecretsRequest(), metadata=admin.metadata),
            await admin.secrets.List(jobs_pb2.ListSecretsRequest(), metadata=admin.metadata),
        ):
            used, unused = listing.secrets
            assert (used.name, used.last_used_by_job) == ("DEPLOY_TOKEN", job.id)
            assert before <= used.last_used_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
            assert (unused.name, unused.last_used_by_job, unused.HasField("last_used_at")) == (
                "UNUSED",
                "",
                False,
            )
            assert "s3cret" not in str(listing)


def test_durations_in_requests_are_bounded() -> None:
    from testhide.controlplane.errors import InvalidArgument
    from testhide.controlplane.rpc.admin_org import expires_in_from_pb

    for seconds, nanos in ((0, 0), (-1, 0), (2**62, 0), (60, -1)):
        request = admin_pb2.CreateApiKeyRequest(expires_in=Duration(seconds=seconds, nanos=nanos))
        with pytest.raises(InvalidArgument):
            expires_in_from_pb(request)
    assert expires_in_from_pb(admin_pb2.CreateApiKeyRequest()) is None


async def test_the_admin_commands(cp: RunningControlPlane, cli: Cli) -> None:
    made = await cli("admin", "api-keys", "create", "ops", "--scope", "org:admin", "--expires-in", "30d")
    assert made.returncode == 0, made.stderr
    key = made.stdout.decode().strip()
    assert key.startswith("thk_")
    assert "shown once" in made.stderr.decode()
    refused_key = await cli("admin", "api-keys", "create", "ops", "--scope", "org:admin")
    assert refused_key.returncode == 125
    assert refused_key.stdout == b""
    assert b"--expires-in 90d or less" in refused_key.stderr
    assert len(refused_key.stderr.decode().strip().splitlines()) == 1
    keys = json.loads((await cli("admin", "api-keys", "list", "--json")).stdout)
    ops = next(k for k in keys if k["name"] == "ops")
    assert (ops["id"], ops["scopes"], ops["state"]) == (key_id(key), ["org:admin"], "active")
    assert ops["expires_at"].endswith("Z")
    assert_matches_example("testhide admin api-keys list", keys)
    assert (await cli("admin", "api-keys", "revoke", f"thk_{ops['id']}")).returncode == 0
    assert "revoked" in (await cli("admin", "api-keys", "list")).stdout.decode()

    no_terminal = await cli("admin", "users", "create", "ada")
    assert no_terminal.returncode == 125
    assert no_terminal.stderr.decode().strip() == (
        "Error: no terminal to ask for the password: set TESTHIDE_PASSWORD or use --password-stdin"
    )
    created = await cli(
        "admin",
        "users",
        "create",
        "ada",
        "--scope",
        "jobs:read",
        "--password-stdin",
        stdin=f"{PASSWORD}\n".encode(),
    )
    assert created.returncode == 0, created.stderr
    users = json.loads((await cli("admin", "users", "list", "--json")).stdout)
    assert_matches_example("testhide admin users list", users)
    assert users == [
        {
            "name": "ada",
            "scopes": ["jobs:read"],
            "state": "active",
            "mfa": False,
            "created_at": users[0]["created_at"],
            "revoked_at": None,
        }
    ]
    assert (await cli("admin", "users", "revoke", "ada")).returncode == 0
    missing = await cli("admin", "users", "revoke", "nobody")
    assert missing.returncode == 125
    assert b"no user 'nobody'" in missing.stderr

    assert (await cli("secrets", "set", "DEPLOY_TOKEN", stdin=b"v")).returncode == 0
    listed = json.loads((await cli("admin", "secrets", "list", "--json")).stdout)
    assert_matches_example("testhide admin secrets list", listed)
    for command in ("users", "api-keys"):
        code, out, err = await operator(command, "list", "--json", "--data-dir", str(cp.data_dir))
        assert code == 0, err
        assert_matches_example(f"testhide-controlplane {command} list", json.loads(out))
    assert [(s["name"], s["last_used_at"], s["last_used_by_job"]) for s in listed] == [
        ("DEPLOY_TOKEN", None, None)
    ]
