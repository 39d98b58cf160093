"""The parts of services.py that need no engine: which ports listen, which a
service declares, names and paths refused before anything starts, the output
cap, and gVisor refused up front."""

from __future__ import annotations

from typing import Any, cast

import docker
import pytest

from testhide.agent.errors import JobSetupError
from testhide.agent.model import ServiceSpec
from testhide.agent.runtime import services
from testhide.agent.runtime.services import (
    GVISOR_REFUSAL,
    TRUNCATED,
    ServiceGroup,
    ServiceOutput,
    check_specs,
    exposed_tcp_ports,
    listening_ports,
    shared_loopback_runtime,
)

# /proc/net/tcp and tcp6 as read in a holder: a listener on 9000 (tcp6, 0A)
# and a closed connection from port 52762 to it (06, TIME_WAIT).
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:CE1A 0100007F:2328 06 00000000:00000000 03:0000176F 00000000     0        0 0 3 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 5 1 0
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000
"""


def test_listening_ports_are_the_listeners_only() -> None:
    assert listening_ports(PROC_NET_TCP) == {0x1F90, 0x2328}
    assert listening_ports("") == set()
    assert listening_ports("garbage\n 0: x:zz y 0A\n") == set()


def test_exposed_tcp_ports_skip_udp() -> None:
    config: dict[str, Any] = {"ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "5432/tcp": {}}}
    assert exposed_tcp_ports(config) == [5432, 8080]
    assert exposed_tcp_ports({"ExposedPorts": None}) == []
    assert exposed_tcp_ports({}) == []


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([ServiceSpec("Db", "x")], "service name 'Db' is not valid: use [a-z][a-z0-9-]{0,30}"),
        ([ServiceSpec("9db", "x")], "service name '9db' is not valid"),
        ([ServiceSpec("d" * 32, "x")], "is not valid"),
        ([ServiceSpec("db", "x"), ServiceSpec("db", "y")], "service name 'db' is used twice"),
        ([ServiceSpec("db", "x", tmpfs=("data",))], "service 'db': tmpfs path 'data' must be absolute"),
        (
            [ServiceSpec("db", "x", tmpfs=("/d,exec",))],
            "service 'db': tmpfs path '/d,exec' must be absolute, without ',' or ':'",
        ),
    ],
)
def test_bad_specs_are_refused(specs: list[ServiceSpec], message: str) -> None:
    with pytest.raises(JobSetupError) as refused:
        check_specs(specs)
    assert message in str(refused.value)


def test_good_specs_pass() -> None:
    check_specs(
        [ServiceSpec("db", "postgres:16", tmpfs=("/var/lib/postgresql/data",)), ServiceSpec("d" * 31, "x")]
    )


def test_output_is_capped_with_one_marker() -> None:
    output = ServiceOutput(limit=10)
    output.feed(b"12345")
    output.feed(b"678901234")
    output.feed(b"more")
    assert output.value() == b"1234567890" + TRUNCATED


def test_tail_is_one_line() -> None:
    output = ServiceOutput()
    output.feed(b"starting\n\nFATAL: no config\n")
    assert output.tail() == "starting / FATAL: no config"


class Engine:
    """docker info's runtimes, as a registered engine answers; nothing else."""

    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes

    def info(self) -> dict[str, Any]:
        return {"Runtimes": self.runtimes, "DefaultRuntime": "runc", "SecurityOptions": ["name=seccomp"]}


RUNC = {"path": "runc"}
RUNSC = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--oci-seccomp"]}
SHARED = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host", "--oci-seccomp"]}


async def test_gvisor_without_a_shared_loopback_registration_is_refused_before_anything_starts() -> None:
    engine = cast(docker.DockerClient, Engine({"runc": RUNC, "runsc": RUNSC}))
    with pytest.raises(JobSetupError) as refused:
        await ServiceGroup.start(
            engine,
            "job",
            "agent",
            [ServiceSpec("db", "x")],
            runtime="runsc",
            is_gvisor=True,
            user="65534:65534",
            pids=64,
            memory_bytes=1 << 26,
            cpus=1.0,
        )
    assert str(refused.value) == GVISOR_REFUSAL


def test_the_shared_loopback_registration_is_used_only_if_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = cast(docker.DockerClient, Engine({"runc": RUNC, "runsc": RUNSC, "runsc-sharedlo": SHARED}))
    offered = ["runc", "runsc", "runsc-sharedlo"]
    monkeypatch.setattr(services, "offered_runtimes", lambda *_: offered)
    assert shared_loopback_runtime(engine, "probe") == ("runsc-sharedlo", "runc")
    offered = ["runc", "runsc"]  # its seccomp probe failed
    with pytest.raises(JobSetupError, match="run this job under runc"):
        shared_loopback_runtime(engine, "probe")
