"""What Docker actually applied to a container, read back from the live
container (``docker inspect``), not taken from what the agent asked for: a
job's owner sees the facts, and a later check can hold them against the spec.

Everything comes from the container's and its image's inspect documents but
the network interfaces: those are read from ``/proc/<pid>/net/dev`` of the
container's first process, which exists only once the container has started.
So the agent reads isolation right after the start and sends it with the
job's "started" report. A job that exits within milliseconds may be gone by
then; its interfaces stay empty (not observed), as they do when the agent's
/proc is not the engine host's (an agent in a container of its own). Under
gVisor that process is the sandbox, whose network namespace Docker made.

The functions take any container: a fetch step's container is read back the
same way right after its start and reported with the step (``steps.py``), each
service's right after its start and reported with the job's start
(``services.py``). The holder of the services' namespace and the egress proxy
are the agent's own and are not reported (``controlplane/jobs/isolation_policy.py``
says why)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from testhide.agent.model import Isolation
from testhide.agent.runtime import seccomp

PROC = Path("/proc")
DEFAULT_SECCOMP = "default"
UNCONFINED = "unconfined"


def seccomp_name(security_opt: list[str]) -> str:
    """The profile a container runs under: "testhide" (ours), "testhide-gvisor" (ours,
    adapted for gVisor), "default" (Docker's, when none was given), "unconfined",
    or ``custom:sha256:<12 hex>`` for any other profile text."""
    for option in security_opt:
        key, sep, value = option.partition("=")
        if not sep:
            key, sep, value = option.partition(":")
        if key != "seccomp":
            continue
        if value == UNCONFINED:
            return UNCONFINED
        if value == seccomp.security_opt(False).partition("=")[2]:
            return "testhide"
        if value == seccomp.security_opt(True).partition("=")[2]:
            return "testhide-gvisor"
        return "custom:sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]
    return DEFAULT_SECCOMP


def _no_new_privileges(security_opt: list[str]) -> bool:
    return any(
        o in ("no-new-privileges", "no-new-privileges:true", "no-new-privileges=true") for o in security_opt
    )


def mounts_of(container: dict[str, Any]) -> tuple[str, ...]:
    """ "TARGET (ro)" or "TARGET (rw)" per volume, "TARGET (tmpfs)" per tmpfs, by target;
    a bind mount of a host path (which the agent never makes: the Docker socket is one)
    says so with the path, "TARGET (rw, bind SOURCE)"."""
    shown = [_mount(m) for m in container.get("Mounts") or []]
    shown += [f"{target} (tmpfs)" for target in (container.get("HostConfig", {}).get("Tmpfs") or {})]
    return tuple(sorted(shown))


def _mount(mount: dict[str, Any]) -> str:
    mode = "rw" if mount.get("RW") else "ro"
    if mount.get("Type") == "bind":
        mode += f", bind {mount.get('Source') or '?'}"
    return f"{mount.get('Destination', '?')} ({mode})"


def interfaces_of(pid: int, proc: Path = PROC) -> tuple[str, ...]:
    """The network interfaces in process ``pid``'s namespace; () if it is gone or unreadable."""
    if pid <= 0:
        return ()
    try:
        lines = (proc / str(pid) / "net" / "dev").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple(sorted(line.split(":", 1)[0].strip() for line in lines[2:] if ":" in line))


def isolation_from_inspect(
    container: dict[str, Any], image: dict[str, Any], interfaces: tuple[str, ...]
) -> Isolation:
    """From docker's inspect documents of a container and of its image."""
    host = container.get("HostConfig") or {}
    config = container.get("Config") or {}
    security_opt = list(host.get("SecurityOpt") or [])
    digests = image.get("RepoDigests") or []
    return Isolation(
        runtime=host.get("Runtime") or "",
        network_mode=host.get("NetworkMode") or "",
        interfaces=interfaces,
        user=config.get("User") or "",
        cap_add=tuple(host.get("CapAdd") or ()),
        cap_drop=tuple(host.get("CapDrop") or ()),
        no_new_privileges=_no_new_privileges(security_opt),
        seccomp=seccomp_name(security_opt),
        read_only_root=bool(host.get("ReadonlyRootfs")),
        pids_limit=int(host.get("PidsLimit") or 0),
        memory_bytes=int(host.get("Memory") or 0),
        cpus=int(host.get("NanoCpus") or 0) / 1e9,
        image_id=container.get("Image") or "",
        image_digest=digests[0].partition("@")[2] if digests else "",
        mounts=mounts_of(container),
    )


def read_isolation(api: Any, container_id: str, proc: Path = PROC) -> Isolation:
    """Blocking (docker-py's low-level ``APIClient``): inspect the container and its image."""
    container = api.inspect_container(container_id)
    image = api.inspect_image(container.get("Image") or "")
    pid = int((container.get("State") or {}).get("Pid") or 0)
    return isolation_from_inspect(container, image, interfaces_of(pid, proc))
