"""The seccomp profile every job container runs under.

``seccomp.json`` is Docker 20.10.24's default profile (Debian's
``golang-github-docker-docker-dev``, ``profiles/seccomp/default.json``) with one
restriction added: ``mknod``/``mknodat`` may create regular files, FIFOs and
sockets only. Creating a character or block device gets EPERM, also under
gVisor, where a job without capabilities could otherwise make device nodes.
``tests/unit/test_seccomp_profile.py`` checks it stays Docker's default minus
that, and nothing more permissive.

gVisor (``runsc --oci-seccomp``) applies the profile inside its sandbox but
ignores ``errnoRet``: every refused call gets EPERM. Docker's profile answers
``clone3`` with ENOSYS so that glibc falls back to ``clone``, whose flags the
profile can inspect; EPERM instead makes every ``pthread_create`` fail (no
thread starts in a Python job). gVisor does not implement ``clone3`` at all and
answers ENOSYS itself, so its variant lets the call through to it."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

PROFILE_FILE = "seccomp.json"
ENOSYS_X86 = 38


@functools.cache
def _profile_text() -> str:
    return resources.files(__package__).joinpath(PROFILE_FILE).read_text(encoding="utf-8")


def profile() -> dict[str, Any]:
    """Our profile, parsed afresh from the package data."""
    parsed: dict[str, Any] = json.loads(_profile_text())
    return parsed


def gvisor_profile() -> dict[str, Any]:
    """The profile for gVisor: ``clone3`` goes through to gVisor's own ENOSYS."""
    adapted = profile()
    for rule in adapted["syscalls"]:
        if rule["names"] == ["clone3"] and rule.get("errnoRet") == ENOSYS_X86:
            rule["action"] = "SCMP_ACT_ALLOW"
            del rule["errnoRet"]
            rule["comment"] = "testhide: gVisor answers ENOSYS itself (runsc ignores errnoRet)"
    return adapted


@functools.cache
def security_opt(gvisor: bool) -> str:
    """The ``--security-opt`` value that applies the profile (Docker takes the JSON text)."""
    chosen = gvisor_profile() if gvisor else profile()
    return "seccomp=" + json.dumps(chosen, separators=(",", ":"))
