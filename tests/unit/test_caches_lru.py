"""The caches' pure parts: which caches the LRU evicts, what a key may be,
the volume names and labels, the index entries, the --cache-max option."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from testhide.agent.cache_volumes import (
    CacheEntry,
    cache_init_tar,
    check_key,
    identity_of,
    volume_name,
)
from testhide.agent.caches import choose_evictions
from testhide.agent.config import AgentConfig
from testhide.agent.errors import ConfigError

KiB = 1024
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def entry(key: str, size_kib: int, used_min: int, org: str = "acme") -> CacheEntry:
    return CacheEntry(
        org, "linux", key, f"testhide-cache-{key}", size_kib * KiB, T0, T0 + timedelta(minutes=used_min)
    )


def keys(chosen: list[CacheEntry]) -> list[str]:
    return [e.key for e in chosen]


def test_nothing_is_evicted_within_the_max() -> None:
    caches = [entry("a", 40, 1), entry("b", 60, 2)]
    assert choose_evictions(caches, 100 * KiB, set()) == []


def test_the_least_recently_used_go_first_until_the_rest_fit() -> None:
    caches = [entry("new", 40, 9), entry("old", 40, 1), entry("mid", 40, 5), entry("older", 10, 0)]
    assert keys(choose_evictions(caches, 100 * KiB, set())) == ["older", "old"]
    assert keys(choose_evictions(caches, 40 * KiB, set())) == ["older", "old", "mid"]


def test_a_pinned_cache_is_never_evicted_even_when_it_is_the_oldest() -> None:
    caches = [entry("pinned", 40, 0), entry("b", 40, 1), entry("c", 40, 2)]
    chosen = choose_evictions(caches, 100 * KiB, {"testhide-cache-pinned"})
    assert keys(chosen) == ["b"]


def test_when_only_pinned_caches_are_left_the_total_may_stay_above() -> None:
    caches = [entry("a", 80, 0), entry("b", 80, 1)]
    assert choose_evictions(caches, 100 * KiB, {"testhide-cache-a", "testhide-cache-b"}) == []
    assert keys(choose_evictions(caches, 100 * KiB, {"testhide-cache-b"})) == ["a"]


def test_equal_last_use_is_broken_by_age_then_name() -> None:
    first = CacheEntry("o", "p", "x", "testhide-cache-x", KiB, T0, T0)
    second = CacheEntry("o", "p", "y", "testhide-cache-y", KiB, T0 + timedelta(seconds=1), T0)
    assert keys(choose_evictions([second, first], KiB, set())) == ["x"]


@pytest.mark.parametrize("key", ["a", "deps-v1", "Go_1.22.mod", "x" * 128, "..", "-", "0"])
def test_keys_of_letters_digits_dot_dash_underscore_are_taken(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "x" * 129, "a/b", "a b", "a:b", "ключ", "a\0b", "a\n", "$(id)", "a=b", "*"]
)
def test_other_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid cache key"):
        check_key(key)


def test_a_volume_name_hashes_org_pool_and_key_and_is_new_each_time() -> None:
    first, again = volume_name("acme", "linux", "deps"), volume_name("acme", "linux", "deps")
    assert first != again
    assert first[:-9] == again[:-9]
    assert first.startswith("testhide-cache-")
    assert len(first) == len("testhide-cache-") + 24 + 1 + 8
    others = {
        volume_name(*identity)[:-9] for identity in [("other", "linux", "deps"), ("acme", "win", "deps")]
    }
    assert first[:-9] not in others
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert volume_name("ab", "c", "k")[:-9] != volume_name("a", "bc", "k")[:-9]


def test_only_complete_cache_labels_name_a_cache() -> None:
    labels = {
        "dev.testhide.cache": "1",
        "dev.testhide.cache.org": "acme",
        "dev.testhide.cache.pool": "linux",
        "dev.testhide.cache.key": "deps",
    }
    assert identity_of(labels) == ("acme", "linux", "deps")
    for missing in labels:
        assert identity_of({k: v for k, v in labels.items() if k != missing}) is None
    assert identity_of({**labels, "dev.testhide.cache.key": "a/b"}) is None


def test_an_index_entry_survives_its_json_and_a_damaged_one_is_refused() -> None:
    kept = entry("deps", 40, 3)
    assert CacheEntry.from_json(kept.to_json()) == kept
    damages: list[tuple[dict[str, object], str]] = [
        ({"volume": "someone-elses-volume"}, "not a cache"),
        ({"size_bytes": -1}, "negative size"),
        ({"key": "../x"}, "invalid cache key"),
        ({"org": ""}, "not a cache"),
        ({"created_at": "yesterday"}, "isoformat"),
    ]
    for damage, why in damages:
        with pytest.raises(ValueError, match=why):
            CacheEntry.from_json({**kept.to_json(), **damage})
    with pytest.raises(KeyError):
        CacheEntry.from_json({k: v for k, v in kept.to_json().items() if k != "pool"})


def test_the_init_image_holds_only_a_0700_cache_dir_of_the_job_user() -> None:
    with tarfile.open(fileobj=io.BytesIO(cache_init_tar("1000:2000"))) as archive:
        members = archive.getmembers()
    assert [(m.name, m.isdir(), m.mode, m.uid, m.gid) for m in members] == [
        ("cache", True, 0o700, 1000, 2000)
    ]


def test_the_cache_max_defaults_to_10_gib_and_must_be_positive(tmp_path: Path) -> None:
    config = AgentConfig(data_dir=tmp_path)
    assert config.cache_max_bytes == 10 * 1024**3
    assert config.caches_index == tmp_path / "caches.json"
    with pytest.raises(ConfigError, match="cache_max_bytes"):
        AgentConfig(data_dir=tmp_path, cache_max_bytes=0)


def test_the_agent_takes_cache_max_as_a_size_from_a_flag_or_its_variable(tmp_path: Path) -> None:
    from testhide.agent.cli import main

    args = ["run", "--data-dir", str(tmp_path), "--print-config"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert 'cache-max = "10GiB"  # default' in result.output
    result = CliRunner().invoke(main, [*args, "--cache-max", "512MiB"])
    assert 'cache-max = "512MiB"  # flag' in result.output
    result = CliRunner().invoke(main, args, env={"TESTHIDE_AGENT_CACHE_MAX": "2GiB"})
    assert result.exit_code == 0, result.output
    assert 'cache-max = "2GiB"' in result.output
    result = CliRunner().invoke(main, [*args, "--cache-max", "10GB"])
    assert result.exit_code == 2
    assert "ambiguous" in result.output
