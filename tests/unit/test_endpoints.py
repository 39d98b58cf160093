"""Which replica an agent tries next, how long it waits, where each replica's
agent port is, and credentials and CLI sessions written before replicas."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import pytest

from testhide.agent.credentials import Credentials
from testhide.agent.endpoints import Endpoints, Rotation, agent_endpoints, join_target
from testhide.agent.errors import ConfigError
from testhide.cli.config import Login
from testhide.cli.errors import NotLoggedIn

A, B, C = "a.test:7444", "b.test:7444", "c.test:7444"


class Highest(random.Random):
    """Jitter at its top: each wait is its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_rotation_goes_round_the_list_from_where_it_starts() -> None:
    rotation = Rotation([A, B, C], start=1)
    seen = []
    for _ in range(5):
        seen.append(rotation.target)
        rotation.failed()
    assert seen == [B, C, A, B, C]


def test_no_wait_within_a_round_then_a_growing_capped_wait_between_rounds() -> None:
    rotation = Rotation([A, B])
    waits = []
    for _ in range(14):
        rotation.failed()
        waits.append(rotation.wait_s(3.0, Highest()))
    # Within a round the next replica is tried at once; after each full round the
    # ceiling doubles from 0.5 s up to the cap.
    assert waits == [0, 0.5, 0, 1, 0, 2, 0, 3, 0, 3, 0, 3, 0, 3]
    assert rotation.rounds_failed == 7


def test_one_replica_keeps_the_schedule_of_an_agent_without_replicas() -> None:
    rotation = Rotation([A])
    ceilings = []
    for _ in range(8):
        rotation.failed()
        ceilings.append(rotation.wait_s(30.0, Highest()))
    # tenacity's wait_random_exponential(multiplier=0.5, max=30), attempt by attempt.
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert all(0 <= rotation.wait_s(30.0, random.Random(seed)) <= 30 for seed in range(20))


def test_the_first_attempt_never_waits() -> None:
    assert Rotation([A]).wait_s(30.0, Highest()) == 0


def test_a_series_starts_where_the_agent_last_got_through() -> None:
    endpoints = Endpoints([A, B, C])
    assert endpoints.attempts().target == A
    endpoints.reached(C)
    assert endpoints.preferred == C
    assert endpoints.attempts().target == C
    endpoints.reached("elsewhere:1")  # not one of ours: changes nothing
    assert endpoints.preferred == C


def test_a_lost_replica_sends_the_next_series_to_the_next_one() -> None:
    endpoints = Endpoints([A, B])
    endpoints.left(A)
    assert endpoints.attempts().target == B
    endpoints.left(A)  # already moved on (e.g. a transfer saw it too): stays
    assert endpoints.preferred == B
    endpoints.left(B)
    assert endpoints.preferred == A


def test_one_endpoint_is_always_the_one() -> None:
    endpoints = Endpoints([A])
    endpoints.left(A)
    rotation = endpoints.attempts()
    rotation.failed()
    assert rotation.target == A
    with pytest.raises(ValueError, match="no control plane endpoints"):
        Endpoints([])


def test_agent_ports_keep_the_answering_replicas_distance_from_the_api_port() -> None:
    found, underivable = agent_endpoints(["a.test:7443", "b.test:8443"], "b.test:8443", ":8444")
    assert found == ("a.test:7444", "b.test:8444")
    assert underivable == ()


def test_a_full_agent_endpoint_in_the_answer_is_kept_for_the_replica_that_gave_it() -> None:
    found, _ = agent_endpoints(["a.test:7443", "b.test:7443"], "a.test:7443", "agents.test:9443")
    assert found == ("agents.test:9443", "b.test:9443")


def test_ipv6_literals_keep_their_brackets() -> None:
    found, _ = agent_endpoints(["[::1]:7443", "[fd00::2]:7443"], "[::1]:7443", ":7444")
    assert found == ("[::1]:7444", "[fd00::2]:7444")
    assert join_target("::1", 1) == "[::1]:1"


def test_a_port_out_of_range_is_left_out_not_made_up() -> None:
    found, underivable = agent_endpoints(["a.test:1000", "b.test:65535"], "a.test:1000", ":1010")
    assert found == ("a.test:1010",)
    assert underivable == ("b.test:65535",)


@pytest.mark.parametrize("advertised", [":", ":http", "nohost", ":99999"])
def test_a_malformed_answer_is_refused(advertised: str) -> None:
    with pytest.raises(ValueError, match=r"invalid|out of range|HOST:PORT"):
        agent_endpoints(["a.test:7443"], "a.test:7443", advertised)


def _write_agent_dir(directory: Path, meta: Mapping[str, object]) -> None:
    directory.mkdir()
    (directory / "agent.json").write_text(json.dumps(meta))
    (directory / "agent.key").write_bytes(b"key")
    (directory / "agent.key").chmod(0o600)
    (directory / "agent.pem").write_bytes(b"cert")
    (directory / "ca.pem").write_bytes(b"ca")


def test_credentials_from_before_replicas_still_load(tmp_path: Path) -> None:
    old = {
        "agent_id": "a1",
        "api_endpoint": "cp.test:7443",
        "agent_endpoint": "cp.test:7444",
        "certificate_received_at": "2030-01-02T03:04:05+00:00",
    }
    _write_agent_dir(tmp_path / "old", old)
    credentials = Credentials.load(tmp_path / "old")
    assert credentials.api_endpoints == ("cp.test:7443",)
    assert credentials.agent_endpoints == ("cp.test:7444",)
    assert credentials.key_pem == b"key"


def test_credentials_record_every_endpoint_and_an_older_agent_finds_the_first(tmp_path: Path) -> None:
    _write_agent_dir(tmp_path / "old", {"agent_id": "a1", "api_endpoint": "x:1", "agent_endpoint": "x:2"})
    loaded = Credentials.load(tmp_path / "old")
    both = Credentials(
        "a1", ("a.test:7443", "b.test:7443"), ("a.test:7444", "b.test:7444"), b"key", b"c", b"ca"
    )
    both.save(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "agent.json").read_text())
    assert meta["api_endpoints"] == ["a.test:7443", "b.test:7443"]
    assert meta["agent_endpoints"] == ["a.test:7444", "b.test:7444"]
    assert (meta["api_endpoint"], meta["agent_endpoint"]) == ("a.test:7443", "a.test:7444")
    again = Credentials.load(tmp_path / "new")
    assert (again.api_endpoints, again.agent_endpoints) == (both.api_endpoints, both.agent_endpoints)
    assert loaded.agent_id == again.agent_id


@pytest.mark.parametrize("endpoints", [[], "cp.test:7444", [""], [7444]])
def test_damaged_endpoint_lists_are_refused(tmp_path: Path, endpoints: object) -> None:
    meta = {"agent_id": "a1", "api_endpoints": ["cp.test:7443"], "agent_endpoints": endpoints}
    _write_agent_dir(tmp_path / "agent", meta)
    with pytest.raises(ConfigError, match="damaged"):
        Credentials.load(tmp_path / "agent")


def test_a_cli_session_from_before_replicas_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "testhide").mkdir()
    stored = {"server": "cp.test:7443", "ca_pem": None, "access_token": "t", "refresh_token": "r"}
    (tmp_path / "testhide" / "credentials.json").write_text(json.dumps(stored))
    login = Login.load()
    assert login.servers == ("cp.test:7443",)
    assert (login.access_token, login.refresh_token) == ("t", "r")
    login.save()
    assert json.loads((tmp_path / "testhide" / "credentials.json").read_text())["servers"] == ["cp.test:7443"]
    assert Login.load() == login


@pytest.mark.parametrize("servers", [[], "cp.test:7443", [""], None])
def test_a_cli_session_without_servers_is_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: object
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "testhide").mkdir()
    (tmp_path / "testhide" / "credentials.json").write_text(json.dumps({"servers": servers, "ca_pem": None}))
    with pytest.raises(NotLoggedIn, match="damaged"):
        Login.load()
