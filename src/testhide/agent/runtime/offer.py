"""Which of the engine's registered runtimes the agent offers to jobs.

A runtime is offered only if our seccomp profile is in force inside its
containers. runc applies it whenever the engine supports seccomp, so the
engine's default runtime is taken on the engine's word (``docker info``). Any
other runtime may silently not: gVisor registered without ``--oci-seccomp``
filters nothing (a job sees ``Seccomp: 0``, and ``unshare -U`` succeeds where
runc refuses it). So each of the others is probed once per agent process,
whatever its name, with a tiny container hardened exactly like a job: it must
show seccomp mode 2 and be refused ``unshare(CLONE_NEWUSER)``. A runtime that
fails, or cannot be probed, is not offered, and the agent says how to fix its
registration. Results are kept per registration (path and arguments), so a
runtime registered again differently is probed again."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions
import structlog
from docker.types import LogConfig

from testhide.agent.runtime import gvisor
from testhide.agent.runtime.hardening import container_options

log = structlog.get_logger("testhide.agent.runtimes")

PROBE_IMAGE = "testhide/busybox:1"
PROBE_LABEL = "dev.testhide.runtime-probe"
PROBE_TIMEOUT_S = 60
PROBE_SCRIPT = (
    "grep '^Seccomp:' /proc/self/status || echo 'Seccomp: unknown'; "
    "if ! command -v unshare >/dev/null; then echo 'unshare: missing'; "
    "elif unshare -U true 2>/dev/null; then echo 'unshare: allowed'; "
    "else echo 'unshare: refused'; fi"
)
ENFORCED = ("Seccomp: 2", "unshare: refused")


@dataclass(frozen=True)
class Registration:
    """A runtime as the engine has it registered (``docker info``)."""

    name: str
    path: str
    args: tuple[str, ...] = ()

    @property
    def is_gvisor(self) -> bool:
        return gvisor.is_gvisor(self.path)


@dataclass(frozen=True)
class ProbeResult:
    enforced: bool
    seen: str
    """What the probe printed, or why it could not run."""
    seconds: float


def registrations(info: dict[str, Any]) -> dict[str, Registration]:
    found = info.get("Runtimes") or {"runc": {"path": "runc"}}
    return {
        name: Registration(name, str(spec.get("path", name)), tuple(spec.get("runtimeArgs") or ()))
        for name, spec in found.items()
    }


_results: dict[tuple[str, Registration, str], ProbeResult] = {}
_results_lock = threading.Lock()


def offered_runtimes(
    client: docker.DockerClient, info: dict[str, Any], found: dict[str, Registration], image: str
) -> list[str]:
    """The runtimes to offer, sorted; blocks while probing (call it in a thread)."""
    if not any("seccomp" in option for option in info.get("SecurityOptions") or []):
        log.error("runtimes_not_offered", reason="the container engine does not support seccomp")
        return []
    default = str(info.get("DefaultRuntime") or "runc")
    others = [r for name, r in sorted(found.items()) if name != default]
    engine_id = str(info.get("ID", ""))
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="runtime-probe") as pool:
        results = list(pool.map(lambda r: _probe_once(client, engine_id, r, image), others))
    offered = [default] if default in found else []
    for registration, result in zip(others, results, strict=True):
        if result.enforced:
            offered.append(registration.name)
        else:
            log.warning(
                "runtime_not_offered",
                runtime=registration.name,
                reason=f"seccomp is not enforced in its containers ({result.seen})",
                fix=_fix(registration),
            )
        if registration.is_gvisor and gvisor.PANIC_LOG_ARG not in registration.args:
            log.warning(
                "gvisor_sandbox_failures_unreported",
                runtime=registration.name,
                note="a failed sandbox will look like the job exiting 2",
                fix=_fix(registration),
            )
    return sorted(offered)


def _fix(registration: Registration) -> str:
    if not registration.is_gvisor:
        return f"register {registration.name!r} so that it applies the container's seccomp profile"
    wanted = ["--network=none", "--oci-seccomp", gvisor.PANIC_LOG_ARG, "--traceback=single"]
    args = list(registration.args) + [a for a in wanted if a not in registration.args]
    quoted = ", ".join(f'"{a}"' for a in args)
    return (
        f'in /etc/docker/daemon.json: "runtimes": {{"{registration.name}": {{"path": "{registration.path}", '
        f'"runtimeArgs": [{quoted}]}}}}, then: kill -HUP $(pidof dockerd)'
    )


def _probe_once(
    client: docker.DockerClient, engine_id: str, registration: Registration, image: str
) -> ProbeResult:
    key = (engine_id, registration, image)
    with _results_lock:
        known = _results.get(key)
    if known is None:
        known = probe(client, registration, image)
        log.info(
            "runtime_probed",
            runtime=registration.name,
            seccomp_enforced=known.enforced,
            seen=known.seen,
            seconds=round(known.seconds, 2),
        )
        if not known.seen.startswith("cannot probe"):
            with _results_lock:
                _results[key] = known
    return known


def probe(client: docker.DockerClient, registration: Registration, image: str) -> ProbeResult:
    """Run the probe container under ``registration`` and judge what it saw."""
    started = time.monotonic()
    options = container_options(
        registration.name,
        registration.is_gvisor,
        pids=64,
        memory_bytes=64 * 1024**2,
        cpus=1.0,
        user="65534:65534",
    )
    container = None
    try:
        container = client.containers.create(
            image,
            ["sh", "-c", PROBE_SCRIPT],
            labels={PROBE_LABEL: registration.name},
            log_config=LogConfig(type=LogConfig.types.JSON),
            **options,
        )
        container.start()
        container.wait(timeout=PROBE_TIMEOUT_S)
        output = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        reason = getattr(exc, "explanation", None) or exc
        return ProbeResult(False, f"cannot probe with image {image!r}: {reason}", time.monotonic() - started)
    finally:
        if container is not None:
            with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                container.remove(force=True)
    seen = "; ".join(" ".join(line.split()) for line in output.splitlines() if line.strip())
    lines = {" ".join(line.split()) for line in output.splitlines()}
    return ProbeResult(all(fact in lines for fact in ENFORCED), seen, time.monotonic() - started)
