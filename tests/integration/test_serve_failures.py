"""`serve` refuses what it cannot do with one line that names the problem and what to
do, and a non-zero exit: no traceback, no line of gRPC's own.

- A second `serve` on the ports of one that runs is refused (gRPC's SO_REUSEPORT is
  off: by default it would start and silently share the connections), and the
  first serves on.
- A port another program holds: the API port, or the agent port (the API port + 1
  when --agent-listen is not given).
- An address that is not this host's (192.0.2.1, TEST-NET-1): binding fails locally
  with EADDRNOTAVAIL; nothing is sent anywhere.
- A data dir under /proc, for `init` and for `serve`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from testhide.common.tls import secure_channel
from testhide.controlplane.datadir import initialise
from testhide.controlplane.errors import ConfigError
from testhide.controlplane.rpc import server
from testhide.controlplane.rpc.server import unbindable
from tests.harness import ControlPlaneProcess, RunningControlPlane, free_port, operator

NOT_THIS_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): on no interface of a test machine


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "controlplane"
    await initialise(path, ["localhost", "127.0.0.1"])
    return path


async def serve(data_dir: Path, *args: str) -> str:
    """`serve` with ``args``, which must refuse to start: its one line."""
    code, _, stderr = await operator("serve", "--data-dir", str(data_dir), *args)
    return refusal(code, stderr)


def refusal(code: int, stderr: str) -> str:
    """The line a refused command printed; it exited non-zero and printed nothing else
    (but click's usage hint)."""
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("Usage:", "Try "))]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


@contextmanager
def held_port(port: int = 0) -> Iterator[int]:
    """A port of 127.0.0.1 that another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield int(holder.getsockname()[1])


@contextmanager
def held_port_after_a_free_one() -> Iterator[int]:
    """A free port P whose neighbour P + 1 another program listens on; yields P."""
    for _ in range(100):
        with held_port() as neighbour:
            try:
                with held_port(neighbour - 1):
                    pass
            except OSError:
                continue  # taken, or below 1024: try another pair
            yield neighbour - 1
            return
    pytest.fail("found no free port next to a held one")


async def serves(api_port: int, ca_pem: bytes) -> bool:
    async with secure_channel(f"127.0.0.1:{api_port}", ca_pem) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = await check(health_pb2.HealthCheckRequest(), timeout=30)
    return response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("shared", ["both ports", "the API port"])
async def test_a_second_serve_on_the_ports_of_a_running_one_is_refused(data_dir: Path, shared: str) -> None:
    first = ControlPlaneProcess(data_dir, free_port(), free_port())
    await first.start()
    try:
        agent_listen = f"127.0.0.1:{first.agent_port}" if shared == "both ports" else "127.0.0.1:0"
        line = await serve(
            data_dir, "--listen", f"127.0.0.1:{first.api_port}", "--agent-listen", agent_listen
        )
        assert first.process is not None
        assert first.process.returncode is None, "the first serve stopped"
        assert await serves(first.api_port, (data_dir / "ca.pem").read_bytes())
    finally:
        await first.stop()
    assert "is in use (another serve?); stop it or choose another with" in line, line
    if shared == "the API port":
        assert f"cannot listen on 127.0.0.1:{first.api_port} (the API port)" in line, line


async def test_an_api_port_another_program_holds_is_refused(data_dir: Path) -> None:
    with held_port() as port:
        line = await serve(data_dir, "--listen", f"127.0.0.1:{port}", "--agent-listen", "127.0.0.1:0")
    assert line == (
        f"Error: cannot listen on 127.0.0.1:{port} (the API port): port {port} on 127.0.0.1 is in use"
        " (another serve?); stop it or choose another with --listen"
    )


async def test_an_agent_port_another_program_holds_is_refused(data_dir: Path) -> None:
    with held_port_after_a_free_one() as api_port:
        line = await serve(data_dir, "--listen", f"127.0.0.1:{api_port}")  # the agent port: API port + 1
    agent_port = api_port + 1
    assert f"cannot listen on 127.0.0.1:{agent_port} (the agent port): port {agent_port} on 127.0.0.1" in line
    assert "is in use (another serve?); stop it or choose another with --agent-listen" in line, line


@pytest.mark.parametrize(
    ("flags", "address", "port"),
    [
        # The agent port is derived from --listen (port + 1) and bound first, yet --listen is named.
        (("--listen", f"{NOT_THIS_HOST}:7443"), f"{NOT_THIS_HOST}:7443", "the API port"),
        (
            ("--listen", f"{NOT_THIS_HOST}:7443", "--agent-listen", "127.0.0.1:0"),
            f"{NOT_THIS_HOST}:7443",
            "the API port",
        ),
        (
            ("--listen", "127.0.0.1:0", "--agent-listen", f"{NOT_THIS_HOST}:7444"),
            f"{NOT_THIS_HOST}:7444",
            "the agent port",
        ),
    ],
)
async def test_an_address_that_is_not_this_hosts_is_refused(
    data_dir: Path, flags: tuple[str, ...], address: str, port: str
) -> None:
    line = await serve(data_dir, *flags)
    assert f"cannot listen on {address} ({port}): {NOT_THIS_HOST} is not an address of this host" in line
    assert ("--agent-listen" in line) == (port == "the agent port"), line


@pytest.mark.parametrize("command", ["init", "serve"])
async def test_a_data_dir_under_proc_is_refused(command: str) -> None:
    code, _, stderr = await operator(command, "--data-dir", "/proc/self/testhide")
    line = refusal(code, stderr)
    assert "is under /proc, a kernel pseudo-filesystem that cannot hold a private directory" in line, line


async def test_a_data_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    code, _, stderr = await operator("init", "--data-dir", str(tmp_path / "a-file" / "controlplane"))
    line = refusal(code, stderr)
    assert f"cannot create the data dir {tmp_path}/a-file/controlplane ({tmp_path}/a-file:" in line, line


async def test_the_listeners_share_their_ports_with_no_one(cp: RunningControlPlane) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: another socket with the option
    would then bind the same port and take a share of the connections."""
    for port in (cp.daemon.api_port, cp.daemon.agent_port):
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="Address already in use"):
                other.bind(("127.0.0.1", port))


async def test_a_port_taken_between_the_check_and_grpcs_bind_is_the_same_clear_error(
    cp: RunningControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's own refusal ("Failed to bind to address ...") is replaced with the reason."""
    checks: list[str] = []

    def free_at_first(address: str, port: server.Port) -> str | None:
        checks.append(address)
        return None if len(checks) == 1 else unbindable(address, port)

    monkeypatch.setattr(server, "unbindable", free_at_first)
    listener = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    with pytest.raises(ConfigError) as refused:
        server.bind(listener, cp.api_target, grpc.local_server_credentials(), server.API_PORT)
    assert len(checks) == 2, "gRPC was not asked"
    assert str(refused.value) == (
        f"cannot listen on {cp.api_target} (the API port): port {cp.daemon.api_port} on 127.0.0.1 is in use"
        " (another serve?); stop it or choose another with --listen"
    )
