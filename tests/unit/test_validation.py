"""controlplane/jobs/validation.py: what users may submit."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.model import JobSpec, Resources
from testhide.controlplane.jobs.validation import (
    MAX_ARGS,
    MAX_COMMAND_BYTES,
    MAX_ENV,
    MAX_ENV_VALUE,
    validate_name,
    validate_spec,
)

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
GOOD = JobSpec(image="alpine:3.20", command=("sh", "-c", "echo hi"))
MiB, GiB = 1024**2, 1024**3


def spec(**changes: Any) -> JobSpec:
    return dataclasses.replace(GOOD, **changes)


def test_good_spec_is_returned_unchanged() -> None:
    full = JobSpec(
        image="ghcr.io/acme/build-tools:v1.2.3",
        command=("make", "test"),
        env={"CI": "1", "_PRIVATE": "x", "PATH_2": ""},
        pool="linux-amd64",
        timeout=timedelta(minutes=30),
        resources=Resources(cpus=0.5, memory_bytes=512 * MiB, pids=128),
        workdir="/workspace/src",
        labels={"team": "infra", "example.com/owner": "alice"},
    )
    assert validate_spec(full) is full
    assert validate_spec(GOOD) is GOOD


@pytest.mark.parametrize(
    "image",
    [
        "alpine",
        "alpine:3.20",
        "library/alpine:latest",
        "docker.io/library/alpine:3",
        "ghcr.io/owner/repo/sub:v1.2-rc.1",
        "localhost:5000/foo/bar",
        "Registry.Example.COM/foo",
        "registry.example.com:443/a_b/c-d/e__f:TAG_1",
        "a.b.c/x---y",
        "alpine@sha256:" + "a" * 64,
        "alpine:3@sha256:" + "0123456789abcdef" * 4,
        "alpine:" + "t" * 128,
        "a" * 255,
    ],
)
def test_accepts_image_references(image: str) -> None:
    assert validate_spec(spec(image=image)).image == image


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Alpine",
        "alpine/Sub",
        "alpine:",
        ":latest",
        "/alpine",
        "alpine/",
        "a//b",
        "alpine::3",
        "alpine:-3",
        "alpine:.3",
        "alpine:" + "t" * 129,
        "alpine:3 ",
        " alpine",
        "al pine",
        "alpine\x00",
        "alpine@sha256:abc",
        "alpine@sha256:" + "A" * 64,
        "alpine@md5:" + "a" * 32,
        "-alpine",
        "alpine-",
        "alpine..x",
        "alpine;rm -rf /",
        "$(id)",
        "a" * 256,
    ],
)
def test_rejects_malformed_image_references(image: str) -> None:
    with pytest.raises(InvalidArgument, match="image"):
        validate_spec(spec(image=image))


def test_image_tag_is_ascii_only() -> None:
    # The regex claims to be the grammar of distribution/reference, where the
    # tag is [\w][\w.-]{0,127} with Go's ASCII-only \w. Python's \w on str is
    # Unicode, so a tag such as "é" is accepted here and only fails later, on
    # the agent.
    with pytest.raises(InvalidArgument, match="image"):
        validate_spec(spec(image="alpine:é"))


@pytest.mark.parametrize(
    "changes",
    [
        {"image": "alpine\n"},
        {"pool": "default\n"},
        {"env": {"FOO\n": "1"}},
        {"labels": {"team\n": "x"}},
    ],
    ids=["image", "pool", "env-name", "label-key"],
)
def test_trailing_newline_rejected(changes: dict[str, Any]) -> None:
    # Every pattern is anchored with ``$``, which also matches before a final
    # "\n" (``\Z`` or fullmatch would not), so these pass validation.
    with pytest.raises(InvalidArgument):
        validate_spec(spec(**changes))


@pytest.mark.parametrize("command", [(), ("",), ("", "x")])
def test_rejects_empty_command(command: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="command must not be empty"):
        validate_spec(spec(command=command))


def test_empty_later_argument_is_fine() -> None:
    assert validate_spec(spec(command=("echo", ""))).command == ("echo", "")


@pytest.mark.parametrize("command", [("a\x00b",), ("echo", "x\x00"), ("\x00",)])
def test_rejects_nul_in_command(command: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        validate_spec(spec(command=command))


def test_argument_count_limit() -> None:
    assert validate_spec(spec(command=("x",) * MAX_ARGS))
    with pytest.raises(InvalidArgument, match="too long"):
        validate_spec(spec(command=("x",) * (MAX_ARGS + 1)))


def test_command_size_limit() -> None:
    assert validate_spec(spec(command=("x" * MAX_COMMAND_BYTES,)))
    with pytest.raises(InvalidArgument, match="too long"):
        validate_spec(spec(command=("x" * (MAX_COMMAND_BYTES - 1), "yz")))


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A.B", "A B", "=", "A=B", "É", "A" * 129])
def test_rejects_bad_env_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="environment variable name"):
        validate_spec(spec(env={name: "v"}))


def test_env_limits() -> None:
    assert validate_spec(spec(env={"A" * 128: "x" * MAX_ENV_VALUE}))
    assert validate_spec(spec(env={f"V{i}": "" for i in range(MAX_ENV)}))
    with pytest.raises(InvalidArgument, match=f"at most {MAX_ENV}"):
        validate_spec(spec(env={f"V{i}": "" for i in range(MAX_ENV + 1)}))
    with pytest.raises(InvalidArgument, match="too long or contains NUL"):
        validate_spec(spec(env={"A": "x" * (MAX_ENV_VALUE + 1)}))
    with pytest.raises(InvalidArgument, match="too long or contains NUL"):
        validate_spec(spec(env={"A": "a\x00b"}))


@pytest.mark.parametrize("pool", ["", "Default", "-x", "x-", "a_b", "a.b", "a b", "a" * 64, "pööl"])
def test_rejects_bad_pool_names(pool: str) -> None:
    with pytest.raises(InvalidArgument, match="pool"):
        validate_spec(spec(pool=pool))


@pytest.mark.parametrize("pool", ["a", "0", "linux-amd64", "a" * 63, "a--b"])
def test_accepts_pool_names(pool: str) -> None:
    assert validate_spec(spec(pool=pool)).pool == pool
    assert validate_name("pool", pool) == pool


@pytest.mark.parametrize(
    "timeout",
    [
        timedelta(0),
        timedelta(milliseconds=999),
        timedelta(seconds=-5),
        timedelta(hours=24, microseconds=1),
        timedelta(days=2),
    ],
)
def test_rejects_timeouts_out_of_range(timeout: timedelta) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        validate_spec(spec(timeout=timeout))


@pytest.mark.parametrize("timeout", [timedelta(seconds=1), timedelta(minutes=5), timedelta(hours=24)])
def test_accepts_timeouts_in_range(timeout: timedelta) -> None:
    assert validate_spec(spec(timeout=timeout)).timeout == timeout


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        (Resources(cpus=0), "cpus"),
        (Resources(cpus=-1), "cpus"),
        (Resources(cpus=64.01), "cpus"),
        (Resources(cpus=float("nan")), "cpus"),
        (Resources(cpus=float("inf")), "cpus"),
        (Resources(memory_bytes=6 * MiB - 1), "memory"),
        (Resources(memory_bytes=0), "memory"),
        (Resources(memory_bytes=256 * GiB + 1), "memory"),
        (Resources(pids=7), "pids"),
        (Resources(pids=0), "pids"),
        (Resources(pids=65537), "pids"),
    ],
)
def test_rejects_resources_out_of_range(resources: Resources, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        validate_spec(spec(resources=resources))


@pytest.mark.parametrize(
    "resources",
    [
        Resources(cpus=0.01),
        Resources(cpus=64),
        Resources(memory_bytes=6 * MiB),
        Resources(memory_bytes=256 * GiB),
        Resources(pids=8),
        Resources(pids=65536),
    ],
)
def test_accepts_resource_bounds(resources: Resources) -> None:
    assert validate_spec(spec(resources=resources)).resources == resources


@pytest.mark.parametrize(
    "workdir",
    ["", "workspace", "./workspace", "..", "/..", "/workspace/..", "/a/../b", "/a/b/..", "/" + "a" * 1024],
)
def test_rejects_bad_workdir(workdir: str) -> None:
    with pytest.raises(InvalidArgument, match="workdir"):
        validate_spec(spec(workdir=workdir))


@pytest.mark.parametrize("workdir", ["/", "/workspace", "/a/..b/c", "/a/b../", "/a/./b", "/" + "a" * 1023])
def test_accepts_workdir(workdir: str) -> None:
    assert validate_spec(spec(workdir=workdir)).workdir == workdir


@pytest.mark.parametrize("labels", [{"": "x"}, {"-a": "x"}, {"a b": "x"}, {"a" * 64: "x"}, {"a": "x" * 257}])
def test_rejects_bad_labels(labels: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match="label"):
        validate_spec(spec(labels=labels))


# ---------------------------------------------------------------- properties

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_WORD = _ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"


@st.composite
def components(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.text(_ALNUM, min_size=1, max_size=8), min_size=1, max_size=3))
    out = parts[0]
    for part in parts[1:]:
        out += draw(st.sampled_from([".", "_", "__", "-", "--"])) + part
    return out


@st.composite
def image_references(draw: st.DrawFn) -> str:
    path = "/".join(draw(st.lists(components(), min_size=1, max_size=4)))
    tag = draw(st.none() | st.builds(str.__add__, st.sampled_from(_WORD), st.text(_WORD + ".-", max_size=30)))
    return path if tag is None else f"{path}:{tag}"


@PROPS
@given(image_references())
def test_generated_valid_references_are_accepted(image: str) -> None:
    assert validate_spec(spec(image=image)).image == image


@PROPS
@given(image_references(), st.data())
def test_whitespace_anywhere_but_the_end_is_rejected(image: str, data: st.DataObject) -> None:
    # The end position is left to test_trailing_newline_rejected.
    position = data.draw(st.integers(0, len(image) - 1))
    space = data.draw(st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003"]))
    with pytest.raises(InvalidArgument, match="image"):
        validate_spec(spec(image=image[:position] + space + image[position:]))


@PROPS
@given(image_references(), st.data())
def test_uppercase_in_repository_path_is_rejected(image: str, data: st.DataObject) -> None:
    # The last path component can never be read as a registry host, which
    # (alone) may contain capitals.
    path, _, tag = image.partition(":")
    head, _, last = path.rpartition("/")
    index = data.draw(st.integers(0, len(last) - 1))
    letter = data.draw(st.sampled_from("ABCXYZ"))
    last = last[:index] + letter + last[index + 1 :]
    bad = (f"{head}/" if head else "") + last + (f":{tag}" if tag else "")
    with pytest.raises(InvalidArgument, match="image"):
        validate_spec(spec(image=bad))


@PROPS
@given(st.text(max_size=300), st.lists(st.text(max_size=20), max_size=5))
def test_arbitrary_image_and_command_only_raise_invalid_argument(image: str, command: list[str]) -> None:
    try:
        result = validate_spec(spec(image=image, command=tuple(command)))
    except InvalidArgument:
        return
    assert result.image == image
    assert command
    assert command[0]
    assert len(image) <= 255
