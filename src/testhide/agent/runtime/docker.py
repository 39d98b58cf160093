"""Job containers on Docker, locked down (``hardening.py``: no network, no
capabilities, no new privileges, our seccomp profile, read-only root, a
non-root user, pid/memory/CPU limits), never with the Docker socket, and only
under runtimes that enforce seccomp (``offer.py``). Docker keeps no log of
its own (log driver "none"): the agent reads the output from the attach
socket, attached before the container starts, and the daemon's copy would
only cost a JSON line per output line and leave unmasked output on disk.

docker-py blocks, so every call runs in a worker thread. Output is read from
the attach socket by a thread of its own (``attach.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tarfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

import docker
import docker.errors
import requests.exceptions
import structlog
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from testhide.agent.errors import CommandNotRunnable, ConfigError, JobSetupError, RuntimeUnavailable
from testhide.agent.model import Isolation, LogStream, ServiceSpec
from testhide.agent.runtime.attach import read_attached
from testhide.agent.runtime.base import ContainerExit, ContainerSpec, OutputQueue, RunningServices
from testhide.agent.runtime.gvisor import GO_PANIC_EXIT, SandboxPanicWatch, failure_reason
from testhide.agent.runtime.hardening import container_options
from testhide.agent.runtime.isolation import read_isolation
from testhide.agent.runtime.oci import command_refusal
from testhide.agent.runtime.offer import PROBE_IMAGE, Registration, offered_runtimes, registrations

log = structlog.get_logger("testhide.agent.docker")
T = TypeVar("T")


async def engine(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking docker-py call in a thread; the daemon not answering
    (stopped, restarting) becomes RuntimeUnavailable, whatever the call."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        ConnectionError,
    ) as exc:
        raise RuntimeUnavailable(f"the Docker daemon is not answering: {exc}") from exc


LABEL = "dev.testhide.job"
OWNER_LABEL = "dev.testhide.agent"
# After a gVisor sandbox exited as a panic would, how long its last output may take to arrive.
OUTPUT_SETTLE_S = 10.0


def workspace_init_image(user: str) -> str:
    return f"testhide/workspace-init:{user.replace(':', '-')}"


def owned_directory_tar(name: str, user: str, mode: int) -> bytes:
    """An image's filesystem holding only the directory ``name``, the job user's,
    with ``mode``. A container created from it over a fresh volume mounted at
    /NAME makes Docker copy that owner and mode onto the volume."""
    uid, _, gid = user.partition(":")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, int(uid), int(gid or uid)
        archive.addfile(info)
    return buffer.getvalue()


def import_if_missing(client: docker.DockerClient, image: str, filesystem: Callable[[], bytes]) -> None:
    """``image`` (REPOSITORY:TAG) made from the tar ``filesystem`` gives, unless present."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        repository, tag = image.split(":")
        client.api.import_image_from_data(filesystem(), repository=repository, tag=tag)


def _workspace_init_tar(user: str) -> bytes:
    """/workspace owned by the job user, who can then write to the workspace volume."""
    return owned_directory_tar("workspace", user, 0o755)


class DockerContainer:
    def __init__(
        self,
        client: docker.DockerClient,
        container: Container,
        volume: str | None,
        panic_watch: SandboxPanicWatch | None = None,
    ) -> None:
        self._client = client
        self._container = container
        self._volume = volume
        self._removed = False
        self.panic_watch = panic_watch
        """Set for a gVisor job: spots the sandbox's own failure in its stderr."""
        self.output_done = asyncio.Event()

    async def wait(self) -> ContainerExit:
        result = await engine(self._container.wait)
        state = (await engine(self._client.api.inspect_container, self._container.id))["State"]
        exit_code = int(result.get("StatusCode", -1))
        return ContainerExit(exit_code, bool(state.get("OOMKilled")), await self._sandbox_failure(exit_code))

    async def _sandbox_failure(self, exit_code: int) -> str:
        """Why the gVisor sandbox itself died, or "": its panic is in the job's
        stderr, which may still be on its way when the container is gone."""
        if self.panic_watch is None or exit_code != GO_PANIC_EXIT:
            return ""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.output_done.wait(), OUTPUT_SETTLE_S)
        failure = self.panic_watch.failure
        return failure_reason(failure) if failure else ""

    async def stop(self, grace: float) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await engine(self._container.stop, timeout=max(0, round(grace)))

    async def workspace_archive(self, dest: BinaryIO) -> None:
        def copy() -> None:
            stream, _ = self._container.get_archive("/workspace")
            for chunk in stream:
                dest.write(chunk)

        try:
            await engine(copy)
        except docker.errors.DockerException as exc:
            raise JobSetupError(f"could not read the job's workspace: {exc}") from exc

    async def isolation(self) -> Isolation | None:
        try:
            return await engine(read_isolation, self._client.api, self._container.id)
        except (RuntimeUnavailable, docker.errors.DockerException, ValueError, TypeError) as exc:
            log.warning("container_isolation_unread", container=self._container.short_id, error=str(exc))
            return None

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        with contextlib.suppress(docker.errors.NotFound):
            await engine(self._container.remove, force=True)
        if self._volume is not None:
            with contextlib.suppress(docker.errors.NotFound):
                await engine(self._client.api.remove_volume, self._volume, True)


DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def unreachable_engine(exc: BaseException) -> str:
    """One line naming what was tried (``DOCKER_HOST``, or docker-py's default
    socket) and why it failed, deepest cause first."""
    given = os.environ.get("DOCKER_HOST", "")
    return (
        f"cannot reach the Docker engine at {given or DEFAULT_DOCKER_HOST} ({_root_cause(exc)}): "
        f"is dockerd running? DOCKER_HOST={given or '(not set)'}"
    )


def _root_cause(exc: BaseException) -> str:
    """The OSError underneath requests' and urllib3's wrappers (they keep it in
    ``args`` as well as in the chain), else the exception's own words."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        item = pending.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        pending += [*item.args, item.__cause__, item.__context__]
    return str(exc)


class DockerRuntime:
    def __init__(self, client: docker.DockerClient | None = None, probe_image: str = PROBE_IMAGE) -> None:
        """``probe_image`` (sh, grep and unshare, present on the host) runs the
        seccomp check of each runtime but the engine's default."""
        try:
            self._client = client or docker.from_env()
        except docker.errors.DockerException as exc:
            raise ConfigError(unreachable_engine(exc)) from exc
        self._ready_init_images: set[str] = set()
        self._probe_image = probe_image
        self._runtimes: list[str] | None = None
        self._registrations: dict[str, Registration] = {}

    def _ensure_init_image(self, user: str) -> str:
        image = workspace_init_image(user)
        if image in self._ready_init_images:
            return image
        import_if_missing(self._client, image, lambda: _workspace_init_tar(user))
        self._ready_init_images.add(image)
        return image

    def runtimes(self) -> list[str]:
        """Asked once, probing each runtime (blocks: call it in a thread); runc
        if the daemon does not answer yet."""
        if self._runtimes is None:
            try:
                info = self._client.info()
            except (requests.exceptions.ConnectionError, ConnectionError):
                return ["runc"]
            self._registrations = registrations(info)
            self._runtimes = offered_runtimes(self._client, info, self._registrations, self._probe_image)
        return self._runtimes

    def _registration(self, name: str) -> Registration:
        """A runtime this agent offers, as registered; JobSetupError for any other."""
        offered = self.runtimes()
        if not self._registrations:
            raise RuntimeUnavailable("the Docker daemon did not say which runtimes it has")
        if name not in offered:
            raise JobSetupError(
                f"container runtime {name!r} is not offered by this agent (offered: {', '.join(offered)}); "
                "a runtime that does not enforce seccomp is never offered"
            )
        return self._registrations[name]

    async def ping(self) -> bool:
        try:
            return bool(await engine(self._client.ping))
        except (RuntimeUnavailable, docker.errors.DockerException):
            return False

    async def ensure_image(self, image: str, pull_policy: str) -> None:
        await engine(self._ensure_image, image, pull_policy)

    def _ensure_image(self, image: str, pull_policy: str) -> None:
        present = True
        try:
            self._client.images.get(image)
        except docker.errors.ImageNotFound:
            present = False
        except docker.errors.DockerException as exc:
            raise JobSetupError(f"could not look up image {image!r}: {exc}") from exc
        if pull_policy == "never" or (present and pull_policy == "if-not-present"):
            if not present:
                raise JobSetupError(
                    f"image {image!r} is not present on this agent's host (pull policy: never)"
                )
            return
        try:
            log.info("image_pull", image=image, policy=pull_policy)
            self._client.images.pull(image)
        except docker.errors.DockerException as exc:
            raise JobSetupError(
                f"could not pull image {image!r} (pull policy: {pull_policy}): "
                f"{getattr(exc, 'explanation', None) or exc}"
            ) from exc

    def _create(self, spec: ContainerSpec) -> tuple[Container, str | None, bool]:
        """The container, its workspace volume, and whether it runs under gVisor."""
        try:
            container, volume = self._create_unchecked(spec)
            return container, volume, self._registrations[spec.runtime].is_gvisor
        except docker.errors.DockerException as exc:
            explanation = getattr(exc, "explanation", None) or exc
            raise JobSetupError(f"Docker refused to set up the job: {explanation}") from exc

    def _workspace_volume(self, spec: ContainerSpec, labels: dict[str, str]) -> str:
        """A fresh volume owned by the job user, holding ``spec.workspace_tar``: the
        container that only ever exists to make it takes the tar (a container created,
        never started, takes ``put_archive``), so every mount of it may be read-only."""
        volume = self._client.volumes.create(name=f"testhide-ws-{spec.job_id}", labels=labels).name
        mount = Mount("/workspace", volume, type="volume")
        helper = self._client.containers.create(
            self._ensure_init_image(spec.user), ["/none"], network_mode="none", mounts=[mount], labels=labels
        )
        try:
            if spec.workspace_tar:
                helper.put_archive("/workspace", spec.workspace_tar)
        except docker.errors.DockerException:
            with contextlib.suppress(docker.errors.DockerException):
                self._client.api.remove_volume(volume, force=True)
            raise
        finally:
            helper.remove(force=True)
        return volume

    async def remove_workspace(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await engine(self._client.api.remove_volume, name, True)

    async def networked_runtime(self, runtime: str) -> str:
        # Here, not at the top: services.py builds on this module's engine() and Demuxer.
        from testhide.agent.runtime.services import shared_loopback_runtime

        if not (await engine(self._registration, runtime)).is_gvisor:
            return runtime
        try:
            networked, _ = await engine(shared_loopback_runtime, self._client, self._probe_image)
        except JobSetupError as exc:
            raise JobSetupError(
                "the fetch step needs a network, which gVisor registered with --network=none never gives:"
                " register runsc once more with --network=host (see the README's 'Dependencies and"
                " services'), or run this job under runc"
            ) from exc
        return networked

    async def start_services(self, spec: ContainerSpec, services: Sequence[ServiceSpec]) -> RunningServices:
        # Here, not at the top: services.py builds on this module's engine() and Demuxer.
        from testhide.agent.runtime.services import ServiceGroup

        registration = await engine(self._registration, spec.runtime)
        return await ServiceGroup.start(
            self._client,
            spec.job_id,
            spec.owner,
            services,
            runtime=spec.runtime,
            is_gvisor=registration.is_gvisor,
            user=spec.user,
            pids=spec.pids,
            memory_bytes=spec.memory_bytes,
            cpus=spec.cpus,
            holder_image=self._probe_image,
        )

    @property
    def client(self) -> docker.DockerClient:
        """For what jobs use beside containers (the egress proxy, caches)."""
        return self._client

    async def make_workspace(self, spec: ContainerSpec) -> str:
        labels = {LABEL: spec.job_id, OWNER_LABEL: spec.owner}
        try:
            return await engine(self._workspace_volume, spec, labels)
        except docker.errors.DockerException as exc:
            explanation = getattr(exc, "explanation", None) or exc
            raise JobSetupError(f"Docker refused to set up the job's workspace: {explanation}") from exc

    def _create_unchecked(self, spec: ContainerSpec) -> tuple[Container, str | None]:
        registration = self._registration(spec.runtime)
        labels = {LABEL: spec.job_id, OWNER_LABEL: spec.owner}
        # The job container's own /tmp, a tmpfs inside it: no file on this host.
        tmpfs = {"/tmp": "rw,nosuid,nodev,size=64m"}  # noqa: S108
        volume: str | None = None
        # no_copy: the job image must not copy its own /workspace (or /cache)
        # ownership over a volume prepared for the job user.
        mounts = [
            Mount(v.target, v.volume, type="volume", read_only=v.read_only, no_copy=True)
            for v in spec.volumes
        ]
        if spec.workspace_name is not None:
            mounts.append(
                Mount(
                    "/workspace",
                    spec.workspace_name,
                    type="volume",
                    read_only=spec.workspace_read_only,
                    no_copy=True,
                )
            )
            volume = None if spec.workspace_read_only else spec.workspace_name
        elif spec.workspace_volume:
            volume = self._workspace_volume(spec, labels)
            mounts.append(Mount("/workspace", volume, type="volume", no_copy=True))
        else:
            # Nothing goes in or comes out: a tmpfs owned by the job user, bounded
            # by the job's memory limit, saves the volume and its helper container.
            uid, _, gid = spec.user.partition(":")
            tmpfs["/workspace"] = (
                f"rw,exec,nosuid,nodev,size={spec.memory_bytes},uid={uid},gid={gid or uid},mode=0700"
            )
        options = container_options(
            spec.runtime, registration.is_gvisor, spec.pids, spec.memory_bytes, spec.cpus, spec.user
        )
        options["network_mode"] = spec.network
        container: Container | None = None
        try:
            container = self._client.containers.create(
                spec.image,
                list(spec.command),
                name=spec.name or f"testhide-{spec.job_id}",
                labels=labels,
                environment=spec.env,
                working_dir=spec.workdir,
                tmpfs=tmpfs,
                mounts=mounts,
                log_config=LogConfig(type=LogConfig.types.NONE),
                **options,
            )
        except docker.errors.DockerException:
            with contextlib.suppress(docker.errors.DockerException):
                if container is not None:
                    container.remove(force=True)
                if volume is not None:
                    self._client.api.remove_volume(volume, force=True)
            raise
        return container, volume

    async def remove_leftovers(self, owner: str, keep: frozenset[str] = frozenset()) -> int:
        def run() -> int:
            selector: dict[str, str | list[str] | bool] = {"label": f"{OWNER_LABEL}={owner}"}
            containers = [
                c
                for c in self._client.containers.list(all=True, filters=selector)
                if c.labels.get(LABEL) not in keep
            ]
            for container in containers:
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
            # Only what belongs to a job: the agent's caches (no job label) stay.
            for volume in self._client.volumes.list(filters={"label": [f"{OWNER_LABEL}={owner}", LABEL]}):
                if (volume.attrs.get("Labels") or {}).get(LABEL) not in keep:
                    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                        volume.remove(force=True)
            # The fetch steps' networks, free once their proxies (containers above) are gone.
            for network in self._client.networks.list(filters={"label": [f"{OWNER_LABEL}={owner}", LABEL]}):
                if (network.attrs.get("Labels") or {}).get(LABEL) not in keep:
                    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                        network.remove()
            return len(containers)

        if not owner:
            return 0
        return await engine(run)

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> DockerContainer:
        container, volume, is_gvisor = await engine(self._create, spec)
        running = DockerContainer(self._client, container, volume, SandboxPanicWatch() if is_gvisor else None)
        loop = asyncio.get_running_loop()
        try:
            sock = await engine(
                self._client.api.attach_socket,
                container.id,
                {"stdout": 1, "stderr": 1, "stream": 1},
            )
            threading.Thread(
                target=self._pump,
                args=(
                    sock,
                    output,
                    running.panic_watch,
                    lambda: loop.call_soon_threadsafe(running.output_done.set),
                ),
                name=f"output-{spec.job_id}",
                daemon=True,
            ).start()
            await engine(container.start)
        except docker.errors.DockerException as exc:
            await running.remove()
            explanation = str(getattr(exc, "explanation", None) or exc)
            refusal = command_refusal(explanation, spec.command, spec.image)
            if refusal is not None:
                log.warning("job_command_refused", job_id=spec.job_id, error=explanation)
                raise CommandNotRunnable(refusal) from exc
            raise JobSetupError(f"Docker could not start the job container: {explanation}") from exc
        log.info("container_started", job_id=spec.job_id, container=container.short_id, image=spec.image)
        return running

    @staticmethod
    def _pump(
        sock: Any, output: OutputQueue, panic_watch: SandboxPanicWatch | None, done: Callable[[], None]
    ) -> None:
        def chunk_read(chunk: tuple[LogStream, bytes]) -> None:
            if panic_watch is not None and chunk[0] == LogStream.STDERR:
                panic_watch.feed(chunk[1])
            output.put_from_thread(chunk)

        try:
            if not read_attached(sock, chunk_read):
                log.warning("container_output_interrupted")
        finally:
            output.put_from_thread(None)
            with contextlib.suppress(RuntimeError):  # the event loop is gone (agent stopping)
                done()
