"""Real components for integration tests and benchmarks: a control plane on
127.0.0.1:0 with a fresh data dir, enrolled agents on real Docker, and the
CLI as a subprocess, exactly as users run them."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from docker import DockerClient
from docker.models.containers import Container

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.base import ContainerRuntime
from testhide.agent.runtime.docker import LABEL
from testhide.controlplane.ca.enrollment import create_token
from testhide.controlplane.config import ControlPlaneConfig
from testhide.controlplane.daemon import ControlPlane
from testhide.controlplane.datadir import DataDir, initialise
from testhide.controlplane.jobs.model import Job, JobStatus, PoolPolicy, PullPolicy

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> NoReturn:
    """A real component a test needs is missing: skip on a laptop, fail in CI (CI=true)."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


JOB_IMAGE = "testhide/busybox:1"


@dataclass
class RunningControlPlane:
    daemon: ControlPlane
    data_dir: Path
    admin_key: str

    @property
    def api_target(self) -> str:
        return f"127.0.0.1:{self.daemon.api_port}"

    @property
    def agent_target(self) -> str:
        return f"127.0.0.1:{self.daemon.agent_port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.data_dir / "ca.pem").read_bytes()

    async def access_token(self, api_key: str | None = None) -> str:
        """Log in with an API key (the admin's by default), as the CLI does."""
        from testhide.protos.v1 import auth_pb2, auth_pb2_grpc

        async with grpc.aio.secure_channel(
            self.api_target, grpc.ssl_channel_credentials(self.ca_pem)
        ) as channel:
            pair = await auth_pb2_grpc.AuthStub(channel).Login(
                auth_pb2.LoginRequest(api_key=api_key or self.admin_key), timeout=30
            )
        return pair.access_token

    async def bearer(self, api_key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {await self.access_token(api_key)}"),)

    async def enrollment_token(
        self, org: str = "default", pool: str = "default", ttl: timedelta = timedelta(minutes=10)
    ) -> str:
        assert self.daemon._store is not None
        return await create_token(self.daemon._store, self.ca_pem, org, pool, ttl)

    async def api_key(self, org: str, *scopes: str) -> tuple[str, str]:
        """A new API key of ``org`` with ``scopes``, straight into the store: (the key, its id)."""
        from testhide.controlplane.auth.secrets import hash_secret, new_api_key
        from testhide.controlplane.store.base import ApiKeyRecord

        assert self.daemon._store is not None
        key, parsed = new_api_key()
        record = ApiKeyRecord(
            parsed.key_id, org, f"k-{parsed.key_id}", hash_secret(parsed.secret), scopes, datetime.now(UTC)
        )
        await self.daemon._store.create_api_key(record)
        return key, parsed.key_id


@asynccontextmanager
async def control_plane(
    tmp: Path, *, database_url: str | None = None, **config: object
) -> AsyncIterator[RunningControlPlane]:
    """A control plane on a new data dir: SQLite, or PostgreSQL at ``database_url``."""
    data_dir = tmp / "controlplane"
    admin_key = await initialise(data_dir, ["localhost", "127.0.0.1"], database_url=database_url)
    # Nothing here may reach a registry: the test pools never pull.
    store = await DataDir(data_dir).open_store()
    try:
        await store.set_pool_policy("default", "default", PoolPolicy(pull_policy=PullPolicy.NEVER))
    finally:
        await store.close()
    async with serving(data_dir, admin_key, **config) as running:
        yield running


@asynccontextmanager
async def serving(data_dir: Path, admin_key: str, **config: object) -> AsyncIterator[RunningControlPlane]:
    """A control plane on an existing data dir (ports 0 unless ``config`` says)."""
    settings: dict[str, object] = {"listen": "127.0.0.1:0", "agent_listen": "127.0.0.1:0", **config}
    daemon = ControlPlane(ControlPlaneConfig(data_dir=data_dir, **settings))  # type: ignore[arg-type]
    await daemon.start()
    try:
        yield RunningControlPlane(daemon, data_dir, admin_key)
    finally:
        await daemon.shutdown()


async def enrolled(
    cp: RunningControlPlane,
    tmp: Path,
    name: str = "agent",
    org: str = "default",
    pool: str = "default",
    agent_port: int | None = None,
) -> Path:
    """An enrolled agent's data dir; ``agent_port`` sends its stream elsewhere (a proxy)."""
    data_dir = tmp / f"agent-{name}"
    await enroll(cp.api_target, await cp.enrollment_token(org, pool), data_dir, name)
    if agent_port is not None:
        credentials = Credentials.load(data_dir)
        replace(credentials, agent_endpoints=(f"127.0.0.1:{agent_port}",)).save(data_dir)
    return data_dir


@asynccontextmanager
async def running_agent(
    cp: RunningControlPlane,
    tmp: Path,
    runtime: ContainerRuntime,
    name: str = "agent",
    org: str = "default",
    pool: str = "default",
    agent_port: int | None = None,
    **config: object,
) -> AsyncIterator[Agent]:
    data_dir = await enrolled(cp, tmp, name, org, pool, agent_port)
    async with agent_running(data_dir, runtime, **config) as agent:
        assert cp.daemon.scheduler is not None
        await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent.agent_id), 30)
        yield agent


@asynccontextmanager
async def agent_running(data_dir: Path, runtime: ContainerRuntime, **config: object) -> AsyncIterator[Agent]:
    """An agent on an enrolled data dir, whatever control plane it reaches (or none)."""
    agent = Agent(AgentConfig(data_dir=data_dir, **config), runtime)  # type: ignore[arg-type]
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.shutdown()
        await asyncio.wait_for(task, 60)


async def wait_until(condition: asyncio.Condition, predicate: Callable[[], bool], within: float) -> None:
    """Await a condition variable until ``predicate`` holds, for at most
    ``within`` seconds: no polling."""
    async with condition:
        await asyncio.wait_for(condition.wait_for(predicate), within)


def program_command(module: str, program: Path | None) -> list[str]:
    """How a subprocess runs one of the three programs: this checkout's ``module``,
    or ``program``, the executable another release installed (the upgrade test)."""
    return [sys.executable, "-m", module] if program is None else [str(program)]


async def operator(
    *args: str, within: float = 60, stdin: bytes | None = None, program: Path | None = None
) -> tuple[int, str, str]:
    """``testhide-controlplane`` (or ``program``) in a subprocess, as an operator
    runs it, with ``stdin`` as its input; it must finish ``within`` seconds."""
    process = await asyncio.create_subprocess_exec(
        *program_command("testhide.controlplane.cli", program),
        *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), within)
    return process.returncode or 0, out.decode(), err.decode()


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class Cli:
    """The ``testhide`` command (or ``program``) in a subprocess, with its own config
    dir, run from ``cwd`` (an empty directory unless a test gives it a workspace).
    Each command runs in its own process unless ``warm``: then, as for a user, a
    warm process (cli/warm.py) runs the commands it may, with its socket in the
    config dir; `stop_warm` ends it (it would live for ten idle minutes)."""

    def __init__(
        self, config_home: Path, cwd: Path | None = None, program: Path | None = None, warm: bool = False
    ) -> None:
        self.program = program
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
        self.env.pop("XDG_RUNTIME_DIR", None)
        if not warm:
            self.env["TESTHIDE_CLI_WARM"] = "off"
        if program is None:
            self.env["PYTHONPATH"] = str(REPO)
        self.cwd = cwd or config_home.parent / "empty-workspace"
        self.cwd.mkdir(parents=True, exist_ok=True)

    async def start(
        self,
        *args: str,
        stdin: bytes | None = None,
        cwd: Path | None = None,
        process_group: int | None = None,
        start_new_session: bool = False,
    ) -> asyncio.subprocess.Process:
        """The command, started; ``process_group=0`` puts it in a process group of its own, as
        a shell with job control does (``start_new_session``: a session of its own)."""
        return await asyncio.create_subprocess_exec(
            *program_command("testhide.cli.main", self.program),
            *args,
            env=self.env,
            cwd=cwd or self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            process_group=process_group,
            start_new_session=start_new_session,
        )

    async def __call__(
        self, *args: str, within: float = 90, stdin: bytes | None = None, cwd: Path | None = None
    ) -> CliResult:
        """Run the command to its end, which must come ``within`` seconds."""
        process = await self.start(*args, stdin=stdin, cwd=cwd)
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), within)
        assert process.returncode is not None
        return CliResult(process.returncode, stdout, stderr)

    @property
    def warm_socket(self) -> Path:
        """Where this CLI's warm process listens."""
        from testhide.cli.main import socket_path

        return Path(socket_path(self.env))

    def warm_pid(self) -> int | None:
        """The warm process serving `warm_socket`, if one runs."""
        try:
            pid = int(self.warm_socket.with_name(self.warm_socket.name + ".lock").read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"testhide.cli.warm" in command else None

    def warm_answers(self) -> bool:
        """Whether a warm process listens at `warm_socket` (it does once it has imported all)."""
        from testhide.cli.main import at_socket

        with socket.socket(socket.AF_UNIX) as probe:
            try:
                return at_socket(str(self.warm_socket), probe.connect)
            except OSError:
                return False

    async def stop_warm(self) -> None:
        pid = self.warm_pid()
        if pid is not None:
            with ended_process(pid) as ended:
                os.kill(pid, signal.SIGTERM)
                await asyncio.wait_for(ended, 30)

    async def login(self, cp: RunningControlPlane, api_key: str | None = None) -> CliResult:
        ca_file = cp.data_dir / "ca.pem"
        return await self(
            "login",
            "--server",
            cp.api_target,
            "--api-key",
            api_key or cp.admin_key,
            "--ca-file",
            str(ca_file),
        )


@contextmanager
def ended_process(pid: int) -> Iterator[asyncio.Future[None]]:
    """A future done when process ``pid`` (any, not only a child) has ended: its pidfd
    becomes readable then. Done at once if it is gone already."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        ended.set_result(None)
        yield ended
        return

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        yield ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    """Until ``check`` (plain or a coroutine function) returns something true,
    for at most ``within`` seconds. For state with no event to await (a
    container, another process), looked at every 100 ms."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def job(cp: RunningControlPlane, job_id: str) -> Job:
    assert cp.daemon.jobs is not None
    return await cp.daemon.jobs.get("default", job_id)


async def stored_log(cp: RunningControlPlane, job_id: str) -> bytes:
    assert cp.daemon.jobs is not None
    return b"".join(
        [
            item.data
            async for item in cp.daemon.jobs.follow("default", job_id, 0, False)
            if not isinstance(item, Job)
        ]
    )


def containers_of(docker_client: DockerClient, job_id: str) -> list[Container]:
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL}={job_id}"})


def numbered(first: int, last: int) -> bytes:
    return "".join(f"{i}\n" for i in range(first, last + 1)).encode()


async def log_reached(cp: RunningControlPlane, job_id: str, size: int) -> bool:
    return (await job(cp, job_id)).log_size >= size


async def in_status(cp: RunningControlPlane, job_id: str, status: JobStatus) -> Job | None:
    found = await job(cp, job_id)
    return found if found.status == status else None


def assert_same_bytes(got: bytes, expected: bytes, what: str = "log") -> None:
    """Equal, or a message saying where they part (a sha256 alone says nothing)."""
    if hashlib.sha256(got).digest() == hashlib.sha256(expected).digest():
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    raise AssertionError(
        f"{what} differs: {len(got)} bytes, expected {len(expected)}; first difference at byte {at}: "
        f"got {got[max(0, at - 30) : at + 30]!r}, expected {expected[max(0, at - 30) : at + 30]!r}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControlPlaneProcess:
    """``testhide-controlplane serve`` as its own process, on fixed ports so that
    it can be killed and started again where agents expect it."""

    def __init__(
        self,
        data_dir: Path,
        api_port: int,
        agent_port: int,
        name: str = "controlplane",
        program: Path | None = None,
    ) -> None:
        """``name``: of its log and port files beside the data dir (replicas of one data dir);
        ``program``: another release's ``testhide-controlplane`` instead of this checkout's."""
        self.data_dir, self.api_port, self.agent_port = data_dir, api_port, agent_port
        self.program = program
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = data_dir.parent / f"{name}.log"
        self._ports = data_dir.parent / ("ports.json" if name == "controlplane" else f"{name}.ports.json")

    async def start(self) -> None:
        ports = self._ports
        ports.unlink(missing_ok=True)
        # Appended to across restarts; the child keeps its own copy of the descriptor.
        with await asyncio.to_thread(self.log_path.open, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *program_command("testhide.controlplane.cli", self.program),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.api_port}",
                "--agent-listen",
                f"127.0.0.1:{self.agent_port}",
                "--port-file",
                str(ports),
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
        while not ports.exists():  # written once both ports listen
            assert self.process.returncode is None, "the control plane exited"
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self) -> int:
        """SIGTERM, as an operator stops it; its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            await self.terminate()
