"""The agent's caches on the real engine: a miss is filled by the job user and
kept, the next acquire restores it; the volume's root is the job user's, 0700;
another org never sees it; the least recently used go past the max, a pinned
one never; one too big is not kept; two misses of one key leave one cache; a
job canceled meanwhile leaves no volume; the index comes back from the labels;
the agent's leftover sweep keeps caches; and ``testhide-agent caches
list|clear`` show and remove them, never one in use or being filled."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker.errors
import pytest
from docker import DockerClient
from docker.types import Mount

from testhide.agent.cache_volumes import volume_name
from testhide.agent.caches import CacheLease, Caches
from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.runtime.docker import OWNER_LABEL
from testhide.common.files import file_lock
from tests.harness import JOB_IMAGE, REPO, RunningControlPlane, enrolled, program_command
from tests.json_schema import assert_matches_example

pytestmark = pytest.mark.docker

USER = "65534:65534"
KiB = 1024
MiB = 1024 * KiB
RFC3339 = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")

MakeCaches = Callable[..., Caches]


class Clock:
    """The caches' clock, moved by the test: last use decides what the LRU removes."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self) -> None:
        self.now += timedelta(minutes=1)


def remove_everything_of(client: DockerClient, owner: str) -> None:
    selector: dict[str, str | list[str] | bool] = {"label": f"{OWNER_LABEL}={owner}"}
    for container in client.containers.list(all=True, filters=selector):
        container.remove(force=True)
    for volume in client.volumes.list(filters=selector):
        volume.remove(force=True)


@pytest.fixture
def owner(docker_client: DockerClient) -> Iterator[str]:
    """This test's agent name on every volume and container it makes; all removed afterwards."""
    name = f"test-caches-{uuid.uuid4().hex[:12]}"
    yield name
    remove_everything_of(docker_client, name)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_caches(docker_client: DockerClient, owner: str, tmp_path: Path, clock: Clock) -> MakeCaches:
    def make(max_bytes: int = 10 * MiB, who: str = owner) -> Caches:
        return Caches(docker_client, tmp_path / "caches.json", max_bytes, who, USER, clock=clock)

    return make


async def in_cache(
    client: DockerClient, owner: str, volume: str, script: str, read_only: bool = False
) -> str:
    """``script`` in busybox as the job user, ``volume`` at /cache as the executor mounts it."""
    output = await asyncio.to_thread(
        client.containers.run,
        JOB_IMAGE,
        ["sh", "-c", script],
        user=USER,
        network_mode="none",
        mounts=[Mount("/cache", volume, type="volume", read_only=read_only, no_copy=True)],
        labels={OWNER_LABEL: owner},
        remove=True,
    )
    return bytes(output).decode()


async def fill(client: DockerClient, owner: str, lease: CacheLease, kib: int, marker: str = "") -> None:
    assert not lease.hit
    marker_line = f" && echo {marker} > /cache/marker" if marker else ""
    await in_cache(
        client, owner, lease.volume, f"dd if=/dev/zero of=/cache/blob bs=1024 count={kib}{marker_line}"
    )


async def kept(
    caches: Caches, client: DockerClient, owner: str, key: str, kib: int, org: str = "acme"
) -> str:
    """A miss of ``key`` filled with ``kib`` KiB, kept and released; the volume."""
    lease = await caches.acquire(org, "linux", key)
    await fill(client, owner, lease, kib)
    assert await caches.keep(lease) == ""
    await caches.release(lease, kept=True)
    return lease.volume


def volume_exists(client: DockerClient, name: str) -> bool:
    try:
        client.volumes.get(name)
    except docker.errors.NotFound:
        return False
    return True


async def test_a_kept_miss_is_restored_by_the_next_acquire(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, tmp_path: Path
) -> None:
    caches = make_caches()
    miss = await caches.acquire("acme", "linux", "deps-v1")
    assert not miss.hit
    root = await in_cache(docker_client, owner, miss.volume, "stat -c '%a %u %g' /cache; ls -A /cache")
    assert root == "700 65534 65534\n"  # the job user's, 0700, and empty
    await fill(docker_client, owner, miss, 8, marker="filled-by-the-fetch-step")
    assert await caches.keep(miss) == ""
    await caches.release(miss, kept=True)

    hit = await caches.acquire("acme", "linux", "deps-v1")
    assert hit == CacheLease("acme", "linux", "deps-v1", miss.volume, hit=True)
    shown = await in_cache(docker_client, owner, hit.volume, "cat /cache/marker", read_only=True)
    assert shown == "filled-by-the-fetch-step\n"
    await caches.release(hit, kept=True)
    assert volume_exists(docker_client, hit.volume)

    [entry] = await caches.entries()
    assert (entry.org, entry.pool, entry.key, entry.volume) == ("acme", "linux", "deps-v1", miss.volume)
    assert 8 * KiB <= entry.size_bytes < 9 * KiB
    index = tmp_path / "caches.json"
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert json.loads(index.read_text())["caches"][0]["volume"] == miss.volume
    labels = docker_client.volumes.get(miss.volume).attrs["Labels"]
    assert labels == {
        "dev.testhide.cache": "1",
        "dev.testhide.cache.org": "acme",
        "dev.testhide.cache.pool": "linux",
        "dev.testhide.cache.key": "deps-v1",
        OWNER_LABEL: owner,
    }


async def test_another_org_or_pool_never_gets_the_cache(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches
) -> None:
    caches = make_caches()
    volume = await kept(caches, docker_client, owner, "deps", 4)
    for org, pool in [("other-org", "linux"), ("acme", "windows")]:
        lease = await caches.acquire(org, pool, "deps")
        assert not lease.hit
        assert lease.volume != volume
        assert await in_cache(docker_client, owner, lease.volume, "ls -A /cache") == ""
        await caches.release(lease, kept=False)
        assert not volume_exists(docker_client, lease.volume)  # a miss not kept goes
    assert [e.org for e in await caches.entries()] == ["acme"]


async def test_a_miss_that_is_not_kept_is_removed_and_a_bad_key_refused(
    docker_client: DockerClient, make_caches: MakeCaches
) -> None:
    caches = make_caches()
    lease = await caches.acquire("acme", "linux", "deps")
    await caches.release(lease, kept=False)
    assert not volume_exists(docker_client, lease.volume)
    assert await caches.entries() == []
    with pytest.raises(ValueError, match="invalid cache key"):
        await caches.acquire("acme", "linux", "../etc")


async def test_the_least_recently_used_go_and_a_pinned_one_stays(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, clock: Clock
) -> None:
    caches = make_caches(max_bytes=100 * KiB)
    first = await kept(caches, docker_client, owner, "first", 40)
    clock.tick()
    second = await kept(caches, docker_client, owner, "second", 40)
    clock.tick()
    hit = await caches.acquire("acme", "linux", "first")  # first is now the more recently used
    await caches.release(hit, kept=True)
    clock.tick()
    lease = await caches.acquire("acme", "linux", "third")
    await fill(docker_client, owner, lease, 40)
    note = await caches.keep(lease)
    await caches.release(lease, kept=True)
    assert (
        note
        == "evicted 1 least recently used cache (40 KiB) to stay within the agent's --cache-max (100 KiB)"
    )
    assert not volume_exists(docker_client, second)
    assert sorted(e.key for e in await caches.entries()) == ["first", "third"]

    clock.now -= timedelta(hours=1)
    pinned = await caches.acquire("acme", "linux", "first")  # the least recently used, and in use
    assert pinned.hit
    clock.now += timedelta(hours=2)
    fourth = await caches.acquire("acme", "linux", "fourth")
    await fill(docker_client, owner, fourth, 40)
    assert (await caches.keep(fourth)).startswith("evicted 1 least recently used cache")
    await caches.release(fourth, kept=True)
    assert volume_exists(docker_client, first)
    assert sorted(e.key for e in await caches.entries()) == ["first", "fourth"]
    await caches.release(pinned, kept=True)
    assert volume_exists(docker_client, first)  # still the cache of "first"


async def test_a_job_canceled_while_its_cache_is_made_leaves_no_volume(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, tmp_path: Path
) -> None:
    caches = make_caches()
    key = owner[-12:]  # this test's own, for the engine's events
    since = datetime.now(UTC)
    with file_lock(tmp_path / "caches.json.lock"):  # the worker thread waits here ...
        acquiring = asyncio.create_task(caches.acquire("acme", "linux", key))
        await asyncio.sleep(0)  # acquire runs up to the worker thread, its lock taken
        assert caches._lock.locked()
        acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    prefix = volume_name("acme", "linux", key)[:-9]
    events = docker_client.events(
        since=since, until=datetime.now(UTC) + timedelta(seconds=1), decode=True, filters={"type": "volume"}
    )
    made = {
        e["Actor"]["ID"] for e in events if e["Action"] == "create" and e["Actor"]["ID"].startswith(prefix)
    }
    assert len(made) == 1  # the volume was made, then removed
    assert docker_client.volumes.list(filters={"label": f"{OWNER_LABEL}={owner}"}) == []
    lease = await caches.acquire("acme", "linux", key)  # and the lock was let go
    assert not lease.hit
    await caches.release(lease, kept=False)


async def test_clear_leaves_a_volume_being_filled_alone_for_a_while(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, tmp_path: Path
) -> None:
    """``caches clear`` runs in another process, which cannot see the agent's pins."""
    agent = make_caches()
    filling = await agent.acquire("acme", "linux", "deps")
    now = datetime.now(UTC)

    def other_process(at: datetime) -> Caches:
        return Caches(docker_client, tmp_path / "caches.json", 10 * MiB, owner, USER, clock=lambda: at)

    assert await other_process(now).clear() == (0, 0)
    assert volume_exists(docker_client, filling.volume)
    assert await other_process(now + timedelta(minutes=11)).clear() == (1, 0)  # a crash's leftover
    assert not volume_exists(docker_client, filling.volume)
    await agent.release(filling, kept=False)


async def test_a_cache_larger_than_the_max_is_not_kept(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches
) -> None:
    caches = make_caches(max_bytes=10 * KiB)
    lease = await caches.acquire("acme", "linux", "big")
    await fill(docker_client, owner, lease, 40)
    note = await caches.keep(lease)
    assert note == "cache big (40 KiB) is larger than the agent's --cache-max (10 KiB): not kept"
    await caches.release(lease, kept=True)
    assert not volume_exists(docker_client, lease.volume)
    assert await caches.entries() == []
    again = await caches.acquire("acme", "linux", "big")
    assert not again.hit
    await caches.release(again, kept=False)


async def test_two_misses_of_one_key_the_later_keep_wins(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, clock: Clock
) -> None:
    caches = make_caches()
    one, two = await asyncio.gather(*(caches.acquire("acme", "linux", "deps") for _ in range(2)))
    assert not one.hit
    assert not two.hit
    assert one.volume != two.volume
    await fill(docker_client, owner, one, 1, marker="one")
    await fill(docker_client, owner, two, 1, marker="two")
    assert await caches.keep(one) == ""
    clock.tick()
    assert await caches.keep(two) == ""
    assert volume_exists(docker_client, one.volume)  # still pinned by its job
    await caches.release(one, kept=True)
    assert not volume_exists(docker_client, one.volume)
    await caches.release(two, kept=True)
    hit = await caches.acquire("acme", "linux", "deps")
    assert hit.volume == two.volume
    assert await in_cache(docker_client, owner, hit.volume, "cat /cache/marker", read_only=True) == "two\n"
    await caches.release(hit, kept=True)


async def test_the_index_is_rebuilt_from_the_labels(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches, tmp_path: Path
) -> None:
    caches = make_caches()
    volumes = {key: await kept(caches, docker_client, owner, key, 12) for key in ("a", "b")}
    other_agent = f"{owner}-other"
    try:
        foreign = await kept(make_caches(who=other_agent), docker_client, other_agent, "c", 1)
        index = tmp_path / "caches.json"
        for damage in (index.unlink, lambda: index.write_text("{not json")):
            damage()
            found = await make_caches().entries()
            assert {e.key: e.volume for e in found} == volumes  # not the other agent's
            assert all(12 * KiB <= e.size_bytes < 13 * KiB for e in found)
            assert stat.S_IMODE(index.stat().st_mode) == 0o600
        hit = await make_caches().acquire("acme", "linux", "a")
        assert hit.hit
        assert hit.volume == volumes["a"]
        assert foreign not in {e.volume for e in await make_caches().entries()}
    finally:
        remove_everything_of(docker_client, other_agent)


async def test_the_agents_leftover_sweep_keeps_the_caches(
    docker_client: DockerClient, owner: str, make_caches: MakeCaches
) -> None:
    """At every start (and when the engine comes back) the agent removes what its
    jobs left; a cache belongs to no job and stays."""
    from testhide.agent.runtime.docker import DockerRuntime

    caches = make_caches()
    volume = await kept(caches, docker_client, owner, "deps", 1)
    await DockerRuntime(docker_client).remove_leftovers(owner)
    assert volume_exists(docker_client, volume)
    hit = await caches.acquire("acme", "linux", "deps")
    assert hit.hit
    await caches.release(hit, kept=True)


async def agent_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *program_command("testhide.agent.cli", None),
        *args,
        cwd=REPO,
        env={**os.environ, "TESTHIDE_AGENT_LOG_LEVEL": "warning", **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_caches_list_and_clear_commands(
    docker_client: DockerClient, cp: RunningControlPlane, tmp_path: Path
) -> None:
    data_dir = await enrolled(cp, tmp_path)
    owner = Credentials.load(data_dir).agent_id
    try:
        caches = Caches(docker_client, AgentConfig(data_dir=data_dir).caches_index, 10 * MiB, owner, USER)
        acme = await kept(caches, docker_client, owner, "deps", 40, org="acme")
        other = await kept(caches, docker_client, owner, "deps", 8, org="other")

        code, out, err = await agent_cli("caches", "list", "--data-dir", str(data_dir), "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert_matches_example("testhide-agent caches list", listed)
        assert [(c["org"], c["pool"], c["key"], c["volume"]) for c in listed] == [
            ("other", "linux", "deps", other),
            ("acme", "linux", "deps", acme),
        ]
        assert listed[1]["size_bytes"] == 40 * KiB
        assert list(listed[0]) == ["org", "pool", "key", "volume", "size_bytes", "last_used_at", "created_at"]
        assert all(RFC3339.match(c[t]) for c in listed for t in ("last_used_at", "created_at"))

        code, out, err = await agent_cli("caches", "list", "--data-dir", str(data_dir))
        assert code == 0, err
        assert out.splitlines()[0].split() == [
            "ORG",
            "POOL",
            "KEY",
            "SIZE",
            "LAST_USED_AT",
            "CREATED_AT",
            "VOLUME",
        ]
        assert "40 KiB" in out

        code, out, err = await agent_cli("caches", "clear", "--data-dir", str(data_dir), "--org", "acme")
        assert (code, out) == (0, "removed 1 cache, 40 KiB (40960 bytes)\n"), err
        assert not volume_exists(docker_client, acme)

        user = docker_client.containers.create(
            JOB_IMAGE, ["true"], mounts=[Mount("/cache", other, type="volume")], labels={OWNER_LABEL: owner}
        )
        code, out, err = await agent_cli("caches", "clear", "--data-dir", str(data_dir))
        assert (code, out) == (0, "removed 0 caches, 0 bytes; 1 in use, kept\n"), err
        assert f"skipped cache deps (org other, pool linux, volume {other}): in use" in err
        user.remove(force=True)
        code, out, err = await agent_cli("caches", "clear", "--data-dir", str(data_dir), "--json")
        assert code == 0, err
        cleared = json.loads(out)
        assert_matches_example("testhide-agent caches clear", cleared)
        assert (cleared["removed_count"], cleared["skipped"]) == (1, [])
        assert cleared["removed"][0]["volume"] == other
        assert json.loads((await agent_cli("caches", "list", "--data-dir", str(data_dir), "--json"))[1]) == []
    finally:
        remove_everything_of(docker_client, owner)


async def test_caches_commands_say_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    code, out, err = await agent_cli("caches", "list", "--data-dir", str(tmp_path / "nowhere"))
    assert (code, out) == (1, "")
    assert "holds no enrolled agent" in err
    assert "Traceback" not in err
    data_dir = tmp_path / "agent"
    Credentials("an-agent", ("127.0.0.1:1",), ("127.0.0.1:2",), b"key", b"cert", b"ca").save(data_dir)
    socket = tmp_path / "no-engine.sock"
    code, out, err = await agent_cli(
        "caches", "clear", "--data-dir", str(data_dir), env={"DOCKER_HOST": f"unix://{socket}"}
    )
    assert (code, out) == (1, "")
    assert (
        err == f"Error: cannot reach the Docker engine at unix://{socket} (No such file or directory): "
        f"is dockerd running? DOCKER_HOST=unix://{socket}\n"
    )
