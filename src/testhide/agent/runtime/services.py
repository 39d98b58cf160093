"""Services beside a job (a database, a cache): containers that share one
network namespace with the job and with nothing else.

A holder container (``sleep``, network "none", hardened, tiny limits) owns a
namespace with only ``lo``; every service and then the job container join it
(``network_mode="container:<holder>"``), so the job reaches each service at
127.0.0.1:PORT and nothing outside the group reaches any of them, nor do they
reach out. The holder, not a service, owns the namespace so that any service
may exit or be restarted without taking the namespace with it.

Services are hardened exactly like the job (``hardening.py``: no
capabilities, no new privileges, our seccomp profile, a read-only root, the
job's pid/memory/CPU limits, the job's runtime) and run as the job's user,
whatever ``USER`` the image names: an image whose entrypoint needs root (to
chown its data, or to switch users) or files only its own user may read does
not work here; one that runs as any user with its data on a tmpfs does.
Writable paths are tmpfs mounts the service asks for, plus its
own /tmp. What Docker applied to each service is read back right after its
start (``isolation.py``) and sent with the job's start, for the control plane
to check and show. Docker keeps no log (log driver "none"): output is read from the
attach socket, attached before start, into a buffer per service capped at
``OUTPUT_LIMIT``.

Readiness: a service whose image declares TCP ports (``EXPOSE``) is waited
for until something listens on each of them, read from the namespace's
``/proc/net/tcp`` by ``exec`` in the holder (connecting to the port would
disturb a service that serves one connection), for ``READY_TIMEOUT_S``.

gVisor gives every sandbox its own network stack, loopback included, so a
shared namespace shares nothing under the usual registration (``runsc
--network=none``). A second registration of runsc with ``--network=host``
makes its sandboxes use the kernel's network stack of the namespace they are
in: joined to the holder's, that is its ``lo`` and nothing else (measured: the
job sees only ``lo`` and reaches the services). Under gVisor the services and
the job then run under that registration (``job_runtime``) and the holder,
which runs nothing of the job's, under runc; the sandbox still mediates every
socket call, but the stack behind it is the host kernel's, not gVisor's (so
the holder, under runc, sees the services' listening sockets too). With
no such registration offered (it must enforce seccomp like any other), a job
with services under gVisor is refused."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import structlog
from docker.models.containers import Container
from docker.types import LogConfig

from testhide.agent.errors import JobSetupError, RuntimeUnavailable
from testhide.agent.model import ServiceIsolation, ServiceSpec
from testhide.agent.runtime.attach import read_attached
from testhide.agent.runtime.docker import LABEL, OWNER_LABEL, engine
from testhide.agent.runtime.hardening import container_options
from testhide.agent.runtime.isolation import read_isolation
from testhide.agent.runtime.oci import command_refusal
from testhide.agent.runtime.offer import PROBE_IMAGE, offered_runtimes, registrations

log = structlog.get_logger("testhide.agent.services")

SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
OUTPUT_LIMIT = 16 * 1024 * 1024
TRUNCATED = b"\n[testhide: service output truncated at 16 MiB]\n"
TMPFS_SIZE = "64m"
HOLDER_COMMAND = ("sleep", "2147483647")
HOLDER_PIDS = 8
HOLDER_MEMORY = 16 * 1024 * 1024
HOLDER_CPUS = 0.1
STOP_GRACE_S = 1
READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.2
# After a service exited, how long its last output may take to arrive.
OUTPUT_SETTLE_S = 5.0
TAIL_CHARS = 300
GVISOR_REFUSAL = (
    "services need a shared network namespace, which gVisor's sandboxed network "
    "does not share between containers: run this job under runc"
)
SHARED_LOOPBACK_ARG = "--network=host"
_LISTEN = "0A"


@dataclass(frozen=True)
class Limits:
    """The job's runtime, user and limits, which its services get too."""

    runtime: str
    is_gvisor: bool
    holder_runtime: str
    user: str
    pids: int
    memory_bytes: int
    cpus: float


def check_specs(services: Sequence[ServiceSpec]) -> None:
    """JobSetupError for a name or path the rest would trip over."""
    seen: set[str] = set()
    for spec in services:
        if not SERVICE_NAME.fullmatch(spec.name):
            raise JobSetupError(f"service name {spec.name!r} is not valid: use [a-z][a-z0-9-]{{0,30}}")
        if spec.name in seen:
            raise JobSetupError(f"service name {spec.name!r} is used twice")
        seen.add(spec.name)
        for path in spec.tmpfs:
            if not path.startswith("/") or ":" in path or "," in path:
                raise JobSetupError(
                    f"service {spec.name!r}: tmpfs path {path!r} must be absolute, without ',' or ':'"
                )


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Ports with a listening socket in ``/proc/net/tcp`` or ``tcp6`` text."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN or ":" not in fields[1]:
            continue
        with contextlib.suppress(ValueError):
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def exposed_tcp_ports(config: dict[str, Any]) -> list[int]:
    """The TCP ports a container's configuration (its image's EXPOSE) declares."""
    ports = []
    for key in config.get("ExposedPorts") or {}:
        number, _, protocol = str(key).partition("/")
        if protocol in ("", "tcp") and number.isdigit():
            ports.append(int(number))
    return sorted(ports)


def shared_loopback_runtime(client: docker.DockerClient, probe_image: str) -> tuple[str, str]:
    """Under gVisor: the registration whose sandboxes use the kernel's network
    stack in their namespace (``--network=host``) and enforce seccomp, and the
    runtime for the holder (runc). JobSetupError when there is none. Blocks
    (the first call probes each runtime): call it in a thread."""
    info = client.info()
    found = registrations(info)
    shared = [name for name, r in sorted(found.items()) if r.is_gvisor and SHARED_LOOPBACK_ARG in r.args]
    offered = offered_runtimes(client, info, found, probe_image) if shared else []
    holder = "runc" if "runc" in found else str(info.get("DefaultRuntime") or "runc")
    usable = [name for name in shared if name in offered]
    if not usable or holder not in found or found[holder].is_gvisor:
        raise JobSetupError(GVISOR_REFUSAL)
    return usable[0], holder


class ServiceOutput:
    """What a service wrote, stdout and stderr interleaved, up to ``limit``
    bytes and then a marker; filled from a reader thread."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self._limit = limit
        self._data = bytearray()
        self._truncated = False
        self._lock = threading.Lock()
        self.done = threading.Event()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._truncated:
                return
            room = self._limit - len(self._data)
            if len(data) > room:
                self._data += data[:room] + TRUNCATED
                self._truncated = True
            else:
                self._data += data

    def value(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def tail(self) -> str:
        """The last words, on one line, for an error message."""
        text = self.value()[-TAIL_CHARS:].decode("utf-8", "replace")
        return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def _pump(sock: Any, output: ServiceOutput) -> None:
    """Reads until the container's streams close; past the cap it keeps
    reading (and dropping) so the service never blocks on its output."""
    try:
        if not read_attached(sock, lambda chunk: output.feed(chunk[1])):
            log.warning("service_output_interrupted")
    finally:
        output.done.set()


def _refusal(spec: ServiceSpec, exc: docker.errors.DockerException) -> JobSetupError:
    if isinstance(exc, docker.errors.ImageNotFound):
        return JobSetupError(
            f"service {spec.name!r}: image {spec.image!r} is not present on this agent's host"
        )
    explanation = str(getattr(exc, "explanation", None) or exc)
    refusal = command_refusal(explanation, spec.command, spec.image)
    reason = refusal or f"Docker refused it: {' '.join(explanation.split())}"
    return JobSetupError(f"service {spec.name!r}: {reason}")


class ServiceGroup:
    """A job's services and the holder of their namespace; see the module."""

    def __init__(self, client: docker.DockerClient, job_id: str, owner: str, limits: Limits) -> None:
        self._client = client
        self._job_id = job_id
        self._labels = {LABEL: job_id, OWNER_LABEL: owner}
        self._limits = limits
        self._holder: Container | None = None
        self._containers: dict[str, Container] = {}
        self._outputs: dict[str, ServiceOutput] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._first_exit: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._removed = False
        self.network_mode = ""
        """"container:<holder id>": the job container's network_mode."""
        self.job_runtime = limits.runtime
        """The runtime the job container must run under to share the services'
        loopback: the job's own, or under gVisor the shared-loopback registration."""
        self.names: tuple[str, ...] = ()
        self.isolation: tuple[ServiceIsolation, ...] = ()
        """Each service's container as Docker applied it, read back once it started."""

    @classmethod
    async def start(
        cls,
        client: docker.DockerClient,
        job_id: str,
        owner: str,
        services: Sequence[ServiceSpec],
        *,
        runtime: str,
        is_gvisor: bool,
        user: str,
        pids: int,
        memory_bytes: int,
        cpus: float,
        holder_image: str = PROBE_IMAGE,
    ) -> ServiceGroup:
        """The holder, then each service; returns once every service's
        declared ports listen. JobSetupError naming the service otherwise, with
        everything started removed again."""
        check_specs(services)
        holder_runtime = runtime
        if is_gvisor:
            runtime, holder_runtime = await engine(shared_loopback_runtime, client, holder_image)
        limits = Limits(runtime, is_gvisor, holder_runtime, user, pids, memory_bytes, cpus)
        group = cls(client, job_id, owner, limits)
        group.names = tuple(spec.name for spec in services)
        try:
            await group._start_holder(holder_image)
            for spec in services:
                await group._start_service(spec)
            await group._until_ready()
        except BaseException:
            await asyncio.shield(group.remove())
            raise
        log.info("services_started", job_id=job_id, services=list(group.names))
        return group

    async def _start_holder(self, image: str) -> None:
        def create() -> Container:
            holder = self._client.containers.create(
                image,
                list(HOLDER_COMMAND),
                name=f"testhide-holder-{self._job_id}",
                labels=self._labels,
                log_config=LogConfig(type=LogConfig.types.NONE),
                **container_options(
                    self._limits.holder_runtime,
                    False,
                    HOLDER_PIDS,
                    HOLDER_MEMORY,
                    HOLDER_CPUS,
                    self._limits.user,
                ),
            )
            self._holder = holder
            holder.start()
            return holder

        try:
            holder = await engine(create)
        except docker.errors.DockerException as exc:
            explanation = " ".join(str(getattr(exc, "explanation", None) or exc).split())
            raise JobSetupError(f"could not start the services' network holder: {explanation}") from exc
        self.network_mode = f"container:{holder.id}"

    def _tmpfs(self, spec: ServiceSpec) -> dict[str, str]:
        uid, _, gid = self._limits.user.partition(":")
        options = f"rw,noexec,nosuid,nodev,size={TMPFS_SIZE},uid={uid},gid={gid or uid},mode=0700"
        return {path: options for path in ("/tmp", *spec.tmpfs)}  # noqa: S108

    def _create_and_run(self, spec: ServiceSpec, output: ServiceOutput) -> Container:
        limits = self._limits
        container = self._client.containers.create(
            spec.image,
            list(spec.command) or None,
            name=f"testhide-svc-{self._job_id}-{spec.name}",
            labels=self._labels,
            environment=dict(spec.env),
            tmpfs=self._tmpfs(spec),
            log_config=LogConfig(type=LogConfig.types.NONE),
            **container_options(
                limits.runtime,
                limits.is_gvisor,
                limits.pids,
                limits.memory_bytes,
                limits.cpus,
                limits.user,
                network_mode=self.network_mode,
            ),
        )
        self._containers[spec.name] = container
        sock = self._client.api.attach_socket(str(container.id), {"stdout": 1, "stderr": 1, "stream": 1})
        threading.Thread(
            target=_pump, args=(sock, output), name=f"service-{self._job_id}-{spec.name}", daemon=True
        ).start()
        container.start()
        return container

    async def _start_service(self, spec: ServiceSpec) -> None:
        output = self._outputs[spec.name] = ServiceOutput()
        try:
            container = await engine(self._create_and_run, spec, output)
        except docker.errors.DockerException as exc:
            raise _refusal(spec, exc) from exc
        self._watches.append(asyncio.create_task(self._watch(spec.name, container)))
        await self._read_back(spec.name, container)

    async def _read_back(self, name: str, container: Container) -> None:
        """What Docker applied, read right after the start (its namespace exists only
        then), reported with the job's start; a failure to read leaves the job running
        without these facts, as for the job's own container."""
        try:
            facts = await engine(read_isolation, self._client.api, str(container.id))
        except (RuntimeUnavailable, docker.errors.DockerException, ValueError, TypeError) as exc:
            log.warning("container_isolation_unread", job_id=self._job_id, service=name, error=str(exc))
            return
        self.isolation = (*self.isolation, ServiceIsolation(name, facts))

    async def _watch(self, name: str, container: Container) -> None:
        try:
            result = await engine(container.wait)
            code = int(result.get("StatusCode", -1))
        except Exception as exc:  # any failure to wait: an exit we cannot read
            log.warning("service_wait_failed", job_id=self._job_id, service=name, error=str(exc))
            code = -1
        await asyncio.to_thread(self._outputs[name].done.wait, OUTPUT_SETTLE_S)
        if not self._first_exit.done():
            self._first_exit.set_result((name, code))

    async def _until_ready(self) -> None:
        """Until every declared port listens; JobSetupError when a service
        exits first or a port stays closed for ``READY_TIMEOUT_S``."""
        pending = [
            (name, port)
            for name, container in self._containers.items()
            for port in exposed_tcp_ports(container.attrs.get("Config") or {})
        ]
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while pending:
            if self._first_exit.done():
                name, code = self._first_exit.result()
                tail = self._outputs[name].tail()
                raise JobSetupError(
                    f"service {name!r} exited with code {code} before it was ready"
                    + (f"; its last output: {tail}" if tail else "")
                )
            listening = await engine(self._listening)
            pending = [(name, port) for name, port in pending if port not in listening]
            if pending and asyncio.get_running_loop().time() >= deadline:
                name, port = pending[0]
                raise JobSetupError(
                    f"service {name!r} did not listen on port {port} within {READY_TIMEOUT_S:g} s"
                )
            if pending:
                await asyncio.wait([self._first_exit], timeout=READY_POLL_S)

    def _listening(self) -> set[int]:
        assert self._holder is not None
        result = self._holder.exec_run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], demux=True)
        stdout = result.output[0] if isinstance(result.output, tuple) else None
        return listening_ports(stdout.decode("ascii", "replace") if isinstance(stdout, bytes) else "")

    async def exited(self) -> tuple[str, int]:
        """When the first service exits (its output then read to the end):
        its name and exit code."""
        return await asyncio.shield(self._first_exit)

    def output(self, name: str) -> bytes:
        """That service's output so far, stdout and stderr as written."""
        return self._outputs[name].value() if name in self._outputs else b""

    async def remove(self) -> None:
        """Stop (short grace) and remove the services, then the holder; safe to
        call twice."""
        if self._removed:
            return
        self._removed = True
        for watch in self._watches:
            watch.cancel()
        results = await asyncio.gather(
            *(self._remove(c, STOP_GRACE_S) for c in self._containers.values()), return_exceptions=True
        )
        if self._holder is not None:
            results += await asyncio.gather(self._remove(self._holder, None), return_exceptions=True)
        log.info("services_removed", job_id=self._job_id, services=list(self._containers))
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @staticmethod
    async def _remove(container: Container, grace: int | None) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            if grace is not None:
                await engine(container.stop, timeout=grace)
            await engine(container.remove, force=True)
