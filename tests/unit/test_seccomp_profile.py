"""Our seccomp profile against Docker's default: the same refusals, nothing
more allowed, and device nodes refused. ``data/docker-20.10.24-default-seccomp.json``
is Docker 20.10.24's ``profiles/seccomp/default.json`` as Debian 12 ships it
(``golang-github-docker-docker-dev`` 20.10.24+dfsg1-1+deb12u1; Apache-2.0)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.runtime import seccomp

DOCKER_DEFAULT = Path(__file__).parent / "data" / "docker-20.10.24-default-seccomp.json"
ALLOW = "SCMP_ACT_ALLOW"
MKNOD_MODE_ARG = {"mknod": 1, "mknodat": 2}


def docker_default() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(DOCKER_DEFAULT.read_text())
    return parsed


def unconditional(profile: dict[str, Any]) -> set[str]:
    """Names a job without capabilities may call with any arguments."""
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == ALLOW and not rule["args"] and not rule["includes"] and not rule["excludes"]
        for name in rule["names"]
    }


def allows(profile: dict[str, Any], name: str, args: dict[int, int]) -> bool:
    """Does the profile let ``name`` through with these arguments (for a job
    with no capabilities on x86_64)? A tiny evaluator of the rules we use."""
    for rule in profile["syscalls"]:
        if name not in rule["names"] or rule["includes"]:
            continue
        matched = all(
            (args[a["index"]] & a["value"]) == a["valueTwo"]
            if a["op"] == "SCMP_CMP_MASKED_EQ"
            else args[a["index"]] == a["value"]
            for a in rule["args"]
        )
        if matched:
            return bool(rule["action"] == ALLOW)
    return bool(profile["defaultAction"] == ALLOW)


def test_ours_is_dockers_default_with_only_mknod_narrowed() -> None:
    ours, default = seccomp.profile(), docker_default()
    assert ours["defaultAction"] == default["defaultAction"] == "SCMP_ACT_ERRNO"
    assert ours["archMap"] == default["archMap"]
    narrowed = [r for r in ours["syscalls"] if set(r["names"]) & set(MKNOD_MODE_ARG)]
    rest = [r for r in ours["syscalls"] if r not in narrowed]
    expected = docker_default()["syscalls"]
    expected[0]["names"] = [n for n in expected[0]["names"] if n not in MKNOD_MODE_ARG]
    assert rest == expected
    assert {n for r in narrowed for n in r["names"]} == set(MKNOD_MODE_ARG)


def test_nothing_is_allowed_that_docker_refuses() -> None:
    ours, default = seccomp.profile(), docker_default()
    docker_rules = default["syscalls"]
    for rule in ours["syscalls"]:
        if rule["action"] != ALLOW or rule in docker_rules:
            continue
        # Anything not verbatim may only allow, or narrow, what Docker allows outright.
        assert set(rule["names"]) <= unconditional(default), rule
        assert not rule["includes"], rule
    assert unconditional(ours) <= unconditional(default)
    refusals = [r for r in docker_rules if r["action"] != ALLOW]
    assert all(r in ours["syscalls"] for r in refusals)


@pytest.mark.parametrize("name", sorted(MKNOD_MODE_ARG))
@pytest.mark.parametrize("variant", ["runc", "gvisor"])
def test_device_nodes_are_refused_and_other_nodes_allowed(name: str, variant: str) -> None:
    profile = seccomp.gvisor_profile() if variant == "gvisor" else seccomp.profile()
    assert name not in unconditional(profile)
    index = MKNOD_MODE_ARG[name]

    def mknod(kind: int) -> bool:
        return allows(profile, name, {index: kind | 0o644})

    assert not mknod(stat.S_IFCHR)
    assert not mknod(stat.S_IFBLK)
    assert mknod(stat.S_IFIFO)
    assert mknod(stat.S_IFREG)
    assert mknod(stat.S_IFSOCK)
    assert mknod(0)  # no type bits: a regular file
    assert not mknod(stat.S_IFCHR | stat.S_IFIFO)  # = S_IFBLK's neighbour bits: no masking trick
    assert allows(docker_default(), name, {index: stat.S_IFCHR | 0o644})  # the control


def test_the_gvisor_variant_only_leaves_clone3_to_gvisor() -> None:
    ours, for_gvisor = seccomp.profile(), seccomp.gvisor_profile()
    changed = [(a, b) for a, b in zip(ours["syscalls"], for_gvisor["syscalls"], strict=True) if a != b]
    [(before, after)] = changed
    assert before["names"] == after["names"] == ["clone3"]
    assert (before["action"], before["errnoRet"]) == ("SCMP_ACT_ERRNO", 38)  # runc: ENOSYS
    assert after["action"] == ALLOW  # gVisor answers ENOSYS itself
    assert "errnoRet" not in after
    assert after["excludes"] == before["excludes"]  # still only for jobs without CAP_SYS_ADMIN


@pytest.mark.parametrize("gvisor", [False, True])
def test_the_security_option_carries_the_profile_text(gvisor: bool) -> None:
    option = seccomp.security_opt(gvisor)
    assert option.startswith("seccomp={")
    assert json.loads(option.removeprefix("seccomp=")) == (
        seccomp.gvisor_profile() if gvisor else seccomp.profile()
    )
