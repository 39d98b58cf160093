"""What ``testhide-agent doctor`` checks of Docker: the engine (reachable, new enough,
with seccomp) and every runtime it has registered, with the agent's own seccomp probe
(``runtime/offer.py``) run on each."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions

from testhide.agent.runtime import gvisor
from testhide.agent.runtime.docker import DEFAULT_DOCKER_HOST
from testhide.agent.runtime.offer import PROBE_IMAGE, ProbeResult, Registration, probe, registrations
from testhide.agent.runtime.offer import _fix as registration_fix
from testhide.common.findings import (
    Finding,
    fail,
    ok,
    warn,
)

MIN_DOCKER = "20.10"
MIN_DOCKER_API = (1, 41)
ENGINE_TIMEOUT_S = 20
"""Docker's own answers (version, info, a probe container) may take longer than a network check."""


@dataclass(frozen=True)
class Engine:
    """What the doctor learned from Docker: findings, and where its data lives."""

    findings: list[Finding]
    root_dir: str | None = None


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def check_engine(runtime: str) -> Engine:
    """Docker and its runtimes (blocks: run in a thread)."""
    where = docker_host()
    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
        version = client.version()
        info = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        fix = "start it (systemctl start docker), or point DOCKER_HOST at the engine"
        if "Permission denied" in str(exc):
            fix = "give the agent's user the socket (usermod -aG docker USER), or run the agent as root"
        return Engine(
            [
                fail("docker", f"cannot reach the Docker engine at {where}: {exc}", fix),
                warn("runtimes", "not checked: Docker is not reachable"),
            ]
        )
    try:
        findings = [engine_finding(where, version, info)]
        findings += runtime_findings(client, info, runtime)
    finally:
        client.close()
    root = str(info.get("DockerRootDir") or "") if where.startswith("unix://") else ""
    return Engine(findings, root or None)


def engine_finding(where: str, version: dict[str, Any], info: dict[str, Any]) -> Finding:
    name = "docker"
    api = str(version.get("ApiVersion", "0"))
    described = f"Docker {version.get('Version', '?')} (API {api}) at {where}"
    try:
        api_tuple = tuple(int(part) for part in api.split("."))
    except ValueError:
        api_tuple = (0,)
    if api_tuple < MIN_DOCKER_API:
        return fail(
            name,
            f"{described} is older than the oldest supported, Docker {MIN_DOCKER} (API 1.41)",
            f"upgrade the engine to Docker {MIN_DOCKER} or newer",
        )
    if not any("seccomp" in option for option in info.get("SecurityOptions") or []):
        return fail(
            name,
            f"{described} does not support seccomp: the agent offers no runtime without it",
            "use a Docker engine built with seccomp (Linux, libseccomp)",
        )
    return ok(name, f"{described}, seccomp supported")


def runtime_findings(client: docker.DockerClient, info: dict[str, Any], runtime: str) -> list[Finding]:
    """The agent's probe on every registered runtime, the default one too (a job must start there)."""
    found = registrations(info)
    default = str(info.get("DefaultRuntime") or "runc")
    ordered = sorted(found.values(), key=lambda r: (r.name != default, r.name))
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="doctor-probe") as pool:
        results = list(pool.map(lambda r: probe(client, r, PROBE_IMAGE), ordered))
    findings = [runtime_verdict(r, result, default) for r, result in zip(ordered, results, strict=True)]
    if runtime not in found:
        findings.append(
            fail(
                f"runtime {runtime}",
                f"the agent's --runtime {runtime} is not registered in Docker"
                f" (registered: {', '.join(sorted(found))})",
                "register it in /etc/docker/daemon.json, or run the agent with --runtime runc",
            )
        )
    return findings


def runtime_verdict(registration: Registration, result: ProbeResult, default: str) -> Finding:
    """What the probe of one runtime means for the agent, and how to fix it."""
    name = f"runtime {registration.name}"
    if registration.is_gvisor:
        seccomp = "with" if "--oci-seccomp" in registration.args else "WITHOUT"
        what = f"gVisor ({' '.join((registration.path, *registration.args))}; {seccomp} --oci-seccomp)"
    else:
        what = "the engine's default" if registration.name == default else registration.path
    if result.seen.startswith("cannot probe"):
        fix = "see dockerd's log (journalctl -u docker) for why the container did not run"
        if "No such image" in result.seen or "not found" in result.seen:
            fix = f"load the probe image {PROBE_IMAGE} (scripts/host-setup builds it with docker import)"
        return fail(name, f"{what}: {result.seen}", fix)
    if not result.enforced:
        return fail(
            name,
            f"{what}: seccomp is not enforced in its containers ({result.seen}); the agent does not offer it",
            registration_fix(registration),
        )
    finding = f"{what}: seccomp enforced ({result.seen}) in {result.seconds:.1f} s"
    if registration.is_gvisor and gvisor.PANIC_LOG_ARG not in registration.args:
        return warn(
            name,
            f"{finding}; a failed sandbox would look like the job exiting 2",
            registration_fix(registration),
        )
    return ok(name, finding)
