"""The seam between the executor and a container engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from agent.model import LogStream

# Output chunks as the container writes them; None once both streams closed.
OutputQueue = asyncio.Queue[tuple[LogStream, bytes] | None]


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


@dataclass(frozen=True)
class ContainerExit:
    exit_code: int
    oom_killed: bool = False


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


class ContainerRuntime(Protocol):
    async def ensure_image(self, image: str, pull_policy: str) -> None:
        """Make the image present on this host as the policy allows (pulled on
        the host, never from inside a job); JobSetupError if it cannot be."""
        ...

    def runtimes(self) -> list[str]:
        """Container runtimes this host offers (runc, runsc, ...)."""
        ...

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> RunningContainer:
        """Create and start a hardened container whose output goes to ``output``."""
        ...
