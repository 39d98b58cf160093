"""What the agent reads back from a container (agent/runtime/isolation.py), from
docker's inspect documents as Docker 20.10 writes them, and how the control
plane keeps an agent's words about it (bounded, printable)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.model import Isolation
from testhide.agent.rpc.convert import isolation_to_pb
from testhide.agent.runtime import seccomp
from testhide.agent.runtime.isolation import interfaces_of, isolation_from_inspect, seccomp_name
from testhide.controlplane.rpc.convert import isolation_from_pb
from testhide.protos.v1 import jobs_pb2


def inspected(**host: Any) -> dict[str, Any]:
    return {
        "Image": "sha256:c3d7",
        "Config": {"User": "65534:65534", "Image": "testhide/busybox:1"},
        "HostConfig": {
            "Runtime": "runc",
            "NetworkMode": "none",
            "CapAdd": None,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true", seccomp.security_opt(False)],
            "ReadonlyRootfs": True,
            "PidsLimit": 100,
            "Memory": 268435456,
            "NanoCpus": 1500000000,
            "Tmpfs": {"/tmp": "rw,size=64m"},
            **host,
        },
        "Mounts": [{"Type": "volume", "Destination": "/workspace", "RW": True}],
    }


def test_the_facts_come_from_the_inspect_documents() -> None:
    image = {"RepoDigests": ["registry.example/busybox@sha256:feed"]}
    facts = isolation_from_inspect(inspected(), image, ("lo",))
    assert facts == Isolation(
        runtime="runc",
        network_mode="none",
        interfaces=("lo",),
        user="65534:65534",
        cap_add=(),
        cap_drop=("ALL",),
        no_new_privileges=True,
        seccomp="testhide",
        read_only_root=True,
        pids_limit=100,
        memory_bytes=256 * 1024 * 1024,
        cpus=1.5,
        image_id="sha256:c3d7",
        image_digest="sha256:feed",
        mounts=("/tmp (tmpfs)", "/workspace (rw)"),
    )


def test_what_was_not_applied_shows() -> None:
    loose = inspected(
        NetworkMode="bridge", CapDrop=None, CapAdd=["NET_ADMIN"], SecurityOpt=[], ReadonlyRootfs=False
    )
    facts = isolation_from_inspect(loose, {}, ("eth0", "lo"))
    assert (facts.network_mode, facts.interfaces) == ("bridge", ("eth0", "lo"))
    assert (facts.cap_add, facts.cap_drop) == (("NET_ADMIN",), ())
    assert (facts.no_new_privileges, facts.seccomp, facts.read_only_root) == (False, "default", False)
    assert facts.image_digest == ""  # a local image has no registry digest


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ([], "default"),
        (["seccomp=unconfined"], "unconfined"),
        (["seccomp:unconfined"], "unconfined"),
        ([seccomp.security_opt(False)], "testhide"),
        ([seccomp.security_opt(True)], "testhide-gvisor"),
        (['seccomp={"defaultAction":"SCMP_ACT_ALLOW"}'], "custom:sha256:"),
    ],
)
def test_the_seccomp_profile_is_named(options: list[str], name: str) -> None:
    assert seccomp_name(["no-new-privileges:true", *options]).startswith(name)


def test_interfaces_are_read_from_the_process_network_namespace(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(
        "Inter-|   Receive    |  Transmit\n"
        " face |bytes    packets|bytes    packets\n"
        "    lo:       0       0        0       0\n"
        "  eth0:     100       1      200       2\n"
    )
    assert interfaces_of(42, tmp_path) == ("eth0", "lo")
    assert interfaces_of(43, tmp_path) == ()  # gone: not observed
    assert interfaces_of(0, tmp_path) == ()  # Docker's pid of a container that is not running


def test_the_control_plane_keeps_an_agents_facts_bounded_and_printable() -> None:
    said = isolation_to_pb(isolation_from_inspect(inspected(), {}, ("lo",)))
    said.user = "root\x1b[2J" + "x" * 1000
    said.mounts.extend(f"/m{i} (rw)" for i in range(1000))
    said.cpus = math.nan
    said.pids_limit = -1
    kept = isolation_from_pb(said)
    assert kept.user.startswith("root[2J")
    assert len(kept.user) <= 128
    assert len(kept.mounts) == 64
    assert (kept.cpus, kept.pids_limit) == (0.0, 0)
    assert kept.cap_drop == ("ALL",)
    assert isolation_from_pb(jobs_pb2.Isolation()).network_mode == ""
