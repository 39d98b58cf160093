"""A scripted runtime for unit tests of the executor: no Docker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from testhide.agent.errors import JobSetupError
from testhide.agent.model import Isolation, LogStream, ServiceIsolation, ServiceSpec
from testhide.agent.runtime.base import ContainerExit, ContainerSpec, OutputQueue, RunningServices


@dataclass
class Script:
    """What a fake container writes, then how it exits. ``hold`` keeps it
    running until stopped."""

    output: list[tuple[LogStream, bytes]] = field(default_factory=list)
    exit_code: int = 0
    hold: bool = False
    oom_killed: bool = False
    runtime_failure: str = ""
    setup_error: str | None = None
    workspace_archive: bytes = b""
    isolation: Isolation | None = None


class FakeContainer:
    def __init__(self, script: Script, output: OutputQueue) -> None:
        self._script = script
        self._output = output
        self._exited: asyncio.Future[ContainerExit] = asyncio.get_running_loop().create_future()
        self.stopped_with_grace: float | None = None
        self.removed = False
        for chunk in script.output:
            output.put_nowait(chunk)
        if not script.hold:
            self._exit(ContainerExit(script.exit_code, script.oom_killed, script.runtime_failure))

    def _exit(self, result: ContainerExit) -> None:
        if not self._exited.done():
            self._output.put_nowait(None)
            self._exited.set_result(result)

    async def wait(self) -> ContainerExit:
        return await self._exited

    async def stop(self, grace: float) -> None:
        self.stopped_with_grace = grace
        self._exit(ContainerExit(143))

    async def remove(self) -> None:
        self.removed = True

    async def workspace_archive(self, dest: BinaryIO) -> None:
        dest.write(self._script.workspace_archive)

    async def isolation(self) -> Isolation | None:
        return self._script.isolation


class FakeServices:
    """Services that run until ``exit`` says one of them ended."""

    def __init__(self, output: dict[str, bytes] | None = None) -> None:
        self.network_mode = "container:holder"
        self.job_runtime = "runc"
        self.names: tuple[str, ...] = ()
        self.isolation: tuple[ServiceIsolation, ...] = ()
        self._output = output or {}
        self._exited: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self.removed = False

    def exit(self, name: str, code: int) -> None:
        self._exited.set_result((name, code))

    async def exited(self) -> tuple[str, int]:
        return await asyncio.shield(self._exited)

    def output(self, name: str) -> bytes:
        return self._output.get(name, b"")

    async def remove(self) -> None:
        self.removed = True


class FakeRuntime:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.started: dict[str, FakeContainer] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.missing_images: set[str] = set()
        self.services: FakeServices | None = None
        """Set to run services: what ``start_services`` hands out."""
        self.removed_workspaces: list[str] = []

    async def ensure_image(self, image: str, pull_policy: str) -> None:
        if image in self.missing_images and pull_policy == "never":
            raise JobSetupError(f"image {image!r} is not present on this agent's host (pull policy: never)")

    def runtimes(self) -> list[str]:
        return ["runc"]

    async def remove_leftovers(self, owner: str, keep: frozenset[str] = frozenset()) -> int:
        return 0

    async def ping(self) -> bool:
        return True

    async def make_workspace(self, spec: ContainerSpec) -> str:
        return f"testhide-ws-{spec.job_id}"

    async def remove_workspace(self, name: str) -> None:
        self.removed_workspaces.append(name)

    async def networked_runtime(self, runtime: str) -> str:
        return runtime

    async def start_services(self, spec: ContainerSpec, services: Sequence[ServiceSpec]) -> RunningServices:
        if self.services is None:
            raise JobSetupError("this container runtime runs no services")
        self.services.names = tuple(service.name for service in services)
        return self.services

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> FakeContainer:
        """Scripts and containers by the container's name if it has one (a fetch step), else by job id."""
        key = spec.name or spec.job_id
        script = self.scripts.get(key, Script())
        if script.setup_error:
            raise JobSetupError(script.setup_error)
        self.specs[key] = spec
        container = self.started[key] = FakeContainer(script, output)
        return container
