"""Sessions as an engineer holds them: `whoami` asks the control plane who the
session is (any valid access token may, whatever its scopes), `logout` ends
the session on the control plane too, and profiles keep one session per
control plane, each in its own 0600 file. Real control planes, the CLI as a
subprocess."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest

from testhide import __version__
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc
from tests.harness import Cli, RunningControlPlane, control_plane, free_port
from tests.integration.test_auth import scoped_key


def stored(config_home: Path, profile: str = "default") -> dict[str, object]:
    name = "credentials.json" if profile == "default" else f"profiles/{profile}.json"
    data: dict[str, object] = json.loads((config_home / "testhide" / name).read_text())
    return data


async def who_am_i(cp: RunningControlPlane, api_key: str) -> auth_pb2.WhoAmIResponse:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        return await auth_pb2_grpc.SessionStub(channel).WhoAmI(
            auth_pb2.WhoAmIRequest(), metadata=await cp.bearer(api_key), timeout=30
        )


async def test_whoami_shows_the_session_as_the_control_plane_sees_it(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    result = await cli("whoami", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["server"] == cp.api_target
    assert shown["servers"] == [cp.api_target]
    assert shown["profile"] == "default"
    assert shown["org"] == "default"
    assert shown["principal_kind"] == "api_key"
    assert cp.admin_key.startswith(f"thk_{shown['principal_id']}")
    assert "jobs:write" in shown["scopes"]
    assert shown["scopes"] == sorted(shown["scopes"])
    assert shown["server_version"] == __version__
    assert shown["amr"] == []
    assert shown["access_expires_at"].endswith("Z")
    # The session ends when its refresh token expires: stored at login.
    assert shown["session_expires_at"] > shown["access_expires_at"]
    human = await cli("whoami")
    assert human.returncode == 0
    assert f"server:             {cp.api_target}" in human.stdout.decode()


async def test_whoami_is_open_to_any_token_whatever_its_scopes(cp: RunningControlPlane) -> None:
    key = await scoped_key(cp, "default", "secrets:write")
    answer = await who_am_i(cp, key)
    assert list(answer.scopes) == ["secrets:write"]
    assert answer.principal_kind == "api_key"
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_pb2_grpc.SessionStub(channel).WhoAmI(auth_pb2.WhoAmIRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_logout_ends_the_session_on_the_control_plane_and_here(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    refresh_token = str(stored(tmp_path / "config")["refresh_token"])
    result = await cli("logout")
    assert result.returncode == 0, result.stderr
    assert b"logged out of profile default" in result.stderr
    assert not (tmp_path / "config" / "testhide" / "credentials.json").exists()
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await auth_pb2_grpc.AuthStub(channel).Refresh(
                auth_pb2.RefreshRequest(refresh_token=refresh_token), timeout=30
            )
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = await cli("whoami")
    assert again.returncode == 125
    assert again.stderr.decode().strip().splitlines() == [
        "Error: not logged in: run 'testhide login --server HOST:PORT --api-key-stdin (or --user NAME)'"
    ]


async def test_profiles_keep_one_session_per_control_plane(
    cp: RunningControlPlane, cli: Cli, tmp_path: Path
) -> None:
    config_home = tmp_path / "config"
    async with control_plane(tmp_path / "second") as other:
        ca_file = str(other.data_dir / "ca.pem")
        login = await cli(
            "--profile", "staging", "login", "--server", other.api_target, "--api-key-stdin",
            "--ca-file", ca_file, stdin=other.admin_key.encode() + b"\n",
        )  # fmt: skip
        assert login.returncode == 0, login.stderr
        path = config_home / "testhide" / "profiles" / "staging.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stored(config_home, "staging")["servers"] == [other.api_target]
        cli.env["TESTHIDE_PROFILE"] = "staging"
        staging = json.loads((await cli("whoami", "--json")).stdout)
        assert (staging["profile"], staging["server"]) == ("staging", other.api_target)
        default = json.loads((await cli("--profile", "default", "whoami", "--json")).stdout)
        assert (default["profile"], default["server"]) == ("default", cp.api_target)
        listed = json.loads((await cli("profiles", "--json")).stdout)
        assert [(p["name"], p["active"], p["servers"]) for p in listed] == [
            ("default", False, [cp.api_target]),
            ("staging", True, [other.api_target]),
        ]
        assert (await cli("logout")).returncode == 0
        assert not path.exists()
        assert stored(config_home)["servers"] == [cp.api_target]  # the other profile is untouched


async def test_a_profile_name_cannot_leave_the_config_dir(cli: Cli) -> None:
    result = await cli("--profile", "../../etc/x", "whoami")
    assert result.returncode == 125
    assert b"is not a profile name" in result.stderr


async def test_the_api_key_environment_variable_is_documented(cli: Cli) -> None:
    result = await cli("login", "--help")
    assert b"TESTHIDE_API_KEY" in result.stdout
    assert b"--api-key-stdin" in result.stdout
    assert b"--password-stdin" in result.stdout


async def test_a_logout_the_control_plane_did_not_hear_keeps_the_session(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "config")
    path = tmp_path / "config" / "testhide" / "credentials.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"servers": [f"127.0.0.1:{free_port()}"], "ca_pem": None, "refresh_token": "x"})
    )
    result = await cli("logout")
    assert result.returncode == 125
    line = result.stderr.decode().strip()
    assert line.startswith("Error: cannot reach the control plane at")
    assert line.endswith("the session is kept, so that 'testhide logout' can try again "
                         "('testhide logout --local' forgets it here only)")  # fmt: skip
    assert path.exists()
    assert (await cli("logout", "--local")).returncode == 0
    assert not path.exists()
