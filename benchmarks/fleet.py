"""Many agents for the benchmarks: identities issued straight by the control
plane's CA (what enrollment does, without a token per agent), a real agent
daemon in a process of its own, and a lean client that holds the agent's
Connect stream over mutual TLS, one certificate and one connection per agent."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from benchmarks.figures import SPAWN
from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.common.tls import fingerprint, secure_channel
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.store.base import AgentRecord
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import RunningControlPlane

SESSION_ACCEPTED = "testhide-session"
# The benchmarks submit as one API key from one address, far faster than the
# API's per-credential limit (50 requests/s by default) allows a person to.
UNLIMITED: dict[str, Any] = {"rate_per_address": 1e6, "rate_per_principal": 1e6}
# An agent's Connect stream as a client holds it.
AgentStream = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControlMessage]


@dataclass(frozen=True)
class AgentKeys:
    agent_id: str
    key_pem: bytes
    certificate_pem: bytes


async def issue_agents(cp: RunningControlPlane, count: int, pool: str = "default") -> list[AgentKeys]:
    """``count`` agents of the default organisation, each with its own key and certificate."""
    directory = DataDir(cp.data_dir)
    ca = directory.load_ca(directory.master_key())
    store = cp.daemon._store
    assert store is not None
    issuer = fingerprint(ca.certificate_pem)
    agents = []
    for _ in range(count):
        key_pem, csr = new_key_and_csr()
        identity = AgentIdentity(ca.trust_domain, "default", pool, f"a{secrets.token_hex(8)}")
        issued = ca.issue_agent(csr, identity, timedelta(hours=1))
        await store.create_agent(
            AgentRecord(
                identity.agent_id,
                "default",
                pool,
                f"bench-{identity.agent_id}",
                format(issued.serial, "x"),
                issued.not_after,
                datetime.now(UTC),
                cert_issuer=issuer,
            )
        )
        agents.append(AgentKeys(identity.agent_id, key_pem, issued.certificate_pem))
    return agents


def save_credentials(cp: RunningControlPlane, keys: AgentKeys, data_dir: Path) -> Path:
    return write_credentials(keys, cp.api_target, cp.agent_target, cp.ca_pem, data_dir)


def write_credentials(
    keys: AgentKeys, api_target: str, agent_target: str, ca_pem: bytes, data_dir: Path
) -> Path:
    """An agent data dir for ``keys`` that talks to the replica at these addresses."""
    Credentials(
        keys.agent_id, (api_target,), (agent_target,), keys.key_pem, keys.certificate_pem, ca_pem
    ).save(data_dir)
    return data_dir


async def open_stream(
    target: str, ca_pem: bytes, keys: AgentKeys, max_jobs: int = 1
) -> tuple[grpc.aio.Channel, AgentStream]:
    """The agent's Connect stream, established: hello sent, identity accepted."""
    channel = secure_channel(
        target, ca_pem, client_key_pem=keys.key_pem, client_cert_pem=keys.certificate_pem
    )
    call = agent_pb2_grpc.AgentControlStub(channel).Connect()
    await call.write(
        agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=max_jobs, version="bench", runtimes=["runc"]))
    )
    metadata = await call.initial_metadata()
    if metadata is None or not any(key == SESSION_ACCEPTED for key, _ in metadata):
        await channel.close()
        raise RuntimeError(f"stream refused: {await call.code()} {await call.details()}")
    return channel, call


def finished_messages(job_id: str, epoch: int) -> list[agent_pb2.AgentMessage]:
    """What an agent sends for a job that exits 0 at once without output."""
    return [
        agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=job_id, epoch=epoch)),
        agent_pb2.AgentMessage(
            result=agent_pb2.JobResult(
                job_id=job_id, epoch=epoch, last_seq=0, outcome=agent_pb2.JOB_OUTCOME_EXITED, exit_code=0
            )
        ),
    ]


def _run_agent(data_dir: Path, config: dict[str, Any], stop: Any) -> None:
    from testhide.agent.config import AgentConfig
    from testhide.agent.daemon import Agent
    from testhide.agent.runtime.docker import DockerRuntime
    from testhide.common.logging import configure

    configure("warning")

    async def main() -> None:
        agent = Agent(AgentConfig(data_dir=data_dir, **config), DockerRuntime())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, agent.shutdown)
        watcher = asyncio.ensure_future(asyncio.to_thread(stop.wait))
        watcher.add_done_callback(lambda _: agent.shutdown())
        await agent.run()

    asyncio.run(main())


@asynccontextmanager
async def agent_process(cp: RunningControlPlane, data_dir: Path, **config: Any) -> AsyncIterator[int]:
    """A real agent on Docker in its own process (as on a separate host), for
    figures where sharing the control plane's event loop would bend the result."""
    keys = (await issue_agents(cp, 1))[0]
    save_credentials(cp, keys, data_dir)
    stop = SPAWN.Event()
    process = SPAWN.Process(target=_run_agent, args=(data_dir, config, stop), name="bench-agent")
    process.start()
    try:
        assert cp.daemon.scheduler is not None
        attached = asyncio.ensure_future(cp.daemon.scheduler.wait_for_agent(keys.agent_id))
        died = asyncio.ensure_future(asyncio.to_thread(process.join, 60))
        await asyncio.wait({attached, died}, return_when=asyncio.FIRST_COMPLETED)
        if not attached.done():
            attached.cancel()
            raise RuntimeError(f"the agent process did not connect (exit code {process.exitcode})")
        assert process.pid is not None
        yield process.pid
    finally:
        stop.set()
        await asyncio.to_thread(process.join, 60)
        if process.is_alive():
            process.kill()
