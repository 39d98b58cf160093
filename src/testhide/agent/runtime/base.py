"""The seam between the executor and a container engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from testhide.agent.model import Isolation, LogStream, ServiceIsolation, ServiceSpec

OutputItem = tuple[LogStream, bytes] | None
"""An output chunk as the container wrote it; None once both streams closed."""

DEFAULT_OUTPUT_BUFFER = 16 * 1024 * 1024


class OutputQueue:
    """Container output on its way from a reader thread to the executor. A
    reader blocks while ``limit`` bytes wait here, so a job whose log cannot
    be shipped (its agent cut off, the spool full) is slowed, not dropped."""

    def __init__(self, limit: int = DEFAULT_OUTPUT_BUFFER) -> None:
        self._queue: asyncio.Queue[OutputItem] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._waiting = 0
        self._closed = False
        self._room = threading.Condition()

    def put_nowait(self, item: OutputItem) -> None:
        """From the event loop's thread; not bounded (scripted output)."""
        self._queue.put_nowait(item)

    def put_from_thread(self, item: OutputItem) -> None:
        """From a reader thread: blocks while the buffer is full."""
        if item is not None:
            with self._room:
                while self._waiting >= self._limit and not self._closed:
                    self._room.wait()
                if self._closed:
                    return
                self._waiting += len(item[1])
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> OutputItem:
        item = await self._queue.get()
        if item is not None:
            with self._room:
                self._waiting -= len(item[1])
                self._room.notify()
        return item

    def close(self) -> None:
        """The consumer is gone: readers stop blocking and drop what they read."""
        with self._room:
            self._closed = True
            self._room.notify_all()


@dataclass(frozen=True)
class VolumeMount:
    """A named volume of the engine's (a cache) mounted into a container."""

    volume: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    job_id: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/workspace"
    cpus: float = 2.0
    memory_bytes: int = 2 * 1024**3
    pids: int = 2048
    user: str = "65534:65534"
    runtime: str = "runc"
    workspace_tar: bytes | None = None
    """A validated tar to place in /workspace before the job starts."""
    owner: str = ""
    """The agent running the job; its leftovers are removed when it starts again."""
    workspace_volume: bool = True
    """False when nothing goes into /workspace and nothing is collected from it:
    a tmpfs then serves, bounded by the job's memory."""
    workspace_name: str | None = None
    """A workspace made before (``ContainerRuntime.make_workspace``) to mount
    instead of making one; ``workspace_tar`` is then already in it."""
    workspace_read_only: bool = False
    """Mount that workspace read-only (the fetch step). A read-write mount takes
    the workspace over: it is removed with that container."""
    network: str = "none"
    """"none"; "container:ID" to join another container's namespace (the job's
    services); or the name of a network (the fetch step's, with its proxy)."""
    volumes: tuple[VolumeMount, ...] = ()
    """Further volumes, such as the job's /cache."""
    name: str = ""
    """The container's name; ``testhide-JOB`` when empty (the job step's)."""


@dataclass(frozen=True)
class ContainerExit:
    exit_code: int
    oom_killed: bool = False
    runtime_failure: str = ""
    """Set when the runtime itself failed (a gVisor sandbox that died): the
    exit code is then not the job's."""


class RunningContainer(Protocol):
    async def wait(self) -> ContainerExit:
        """Until the process exits."""
        ...

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        ...

    async def remove(self) -> None:
        """Remove the container and its workspace; safe to call twice."""
        ...

    async def workspace_archive(self, dest: BinaryIO) -> None:
        """Write a tar of /workspace (after the job) to ``dest``."""
        ...

    async def isolation(self) -> Isolation | None:
        """What the engine applied to the started container, read back from it
        (``isolation.py``); None if it could not be read."""
        ...


class RunningServices(Protocol):
    """A job's services, running in the namespace its container joins."""

    network_mode: str
    """``container:ID`` for the job's container."""
    job_runtime: str
    """The runtime the job's container must run under to share their loopback:
    the job's own, or under gVisor the registration with the kernel's network."""
    names: tuple[str, ...]
    isolation: tuple[ServiceIsolation, ...]
    """What Docker applied to each service's container, read back right after its start
    (a service whose facts could not be read is missing)."""

    async def exited(self) -> tuple[str, int]:
        """Until the first service exits: its name and exit code."""
        ...

    def output(self, name: str) -> bytes:
        """What that service wrote so far (capped)."""
        ...

    async def remove(self) -> None:
        """Stop and remove every service; safe to call twice."""
        ...


class ContainerRuntime(Protocol):
    async def ensure_image(self, image: str, pull_policy: str) -> None:
        """Make the image present on this host as the policy allows (pulled on
        the host, never from inside a job); JobSetupError if it cannot be."""
        ...

    def runtimes(self) -> list[str]:
        """Container runtimes this host offers (runc, runsc, ...): only those that
        enforce seccomp. The first call may block for a second or so while each
        runtime is checked: make it in a thread."""
        ...

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> RunningContainer:
        """Create and start a hardened container whose output goes to ``output``."""
        ...

    async def make_workspace(self, spec: ContainerSpec) -> str:
        """Make the job's workspace (``spec.workspace_tar`` in it, owned by the job
        user) before any container of the job exists: two containers share it, the
        fetch step's read-only and then the job's read-write. Returns its name."""
        ...

    async def remove_workspace(self, name: str) -> None:
        """Remove a workspace no container took over (the job ended before its job step)."""
        ...

    async def networked_runtime(self, runtime: str) -> str:
        """The registration a container of ``runtime`` reaches a network under (the
        fetch step's proxy): ``runtime`` itself, but under gVisor, whose sandboxes
        have only their own loopback here, the registration that uses the kernel's
        network stack of its namespace; JobSetupError when there is none."""
        ...

    async def start_services(self, spec: ContainerSpec, services: Sequence[ServiceSpec]) -> RunningServices:
        """Start the job's services, hardened and limited like the job (``spec``),
        in a namespace with only ``lo`` that the job's container then joins."""
        ...

    async def remove_leftovers(self, owner: str, keep: frozenset[str] = frozenset()) -> int:
        """Remove containers and workspaces of agent ``owner`` left behind (an
        earlier run was killed, or the engine was down at cleanup), except
        those of the jobs in ``keep``; returns how many containers."""
        ...

    async def ping(self) -> bool:
        """Does the container engine answer?"""
        ...
