"""What every job container gets from Docker, whatever runs in it: no network,
no capabilities, no new privileges, our seccomp profile, a read-only root, a
non-root user, and pid/memory/CPU limits. The runtime-check probe gets the same,
so a runtime is judged as jobs will meet it.

Under gVisor the job's pids limit is enforced inside the sandbox (RLIMIT_NPROC),
and the container's pids limit is the sandbox's host-thread budget
(``gvisor.py`` explains the arithmetic)."""

from __future__ import annotations

from typing import Any

from docker.types import Ulimit

from testhide.agent.runtime import gvisor, seccomp


def container_options(
    runtime: str,
    is_gvisor: bool,
    pids: int,
    memory_bytes: int,
    cpus: float,
    user: str,
    *,
    network_mode: str = "none",
) -> dict[str, Any]:
    """Keyword arguments for docker-py's ``containers.create``. ``network_mode``
    stays "none" unless the caller made another namespace for the container,
    such as its services' (``services.py``: "container:<holder>", only ``lo``)."""
    options: dict[str, Any] = {
        "runtime": runtime,
        "user": user,
        "network_mode": network_mode,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", seccomp.security_opt(is_gvisor)],
        "read_only": True,
        "pids_limit": pids,
        "mem_limit": memory_bytes,
        "memswap_limit": memory_bytes,
        "nano_cpus": int(cpus * 1e9),
        "init": False,
        "stdin_open": False,
        "tty": False,
    }
    if is_gvisor:
        options["pids_limit"] = gvisor.sandbox_pids_limit(pids, gvisor.host_pid_max())
        options["ulimits"] = [Ulimit(name="nproc", soft=pids, hard=pids)]
    return options
