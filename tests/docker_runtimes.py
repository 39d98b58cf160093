"""A container runtime registered with the local dockerd for one test: written
into /etc/docker/daemon.json under a name of the test run's own, dockerd reloaded
(SIGHUP: containers keep running), and taken out again afterwards."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from docker import DockerClient

from tests.harness import unavailable

DAEMON_JSON = Path("/etc/docker/daemon.json")
LOCK = Path("/run/lock/testhide-tests-daemon-json.lock")
RUNSC = "/usr/bin/runsc"
SHARED_LOOPBACK_ARGS = (
    "--network=host",
    "--oci-seccomp",
    "--panic-log=/proc/self/fd/2",
    "--traceback=single",
)
"""runsc as an operator registers it once more for services and fetch steps under gVisor."""


def _dockerd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "dockerd":
                return int(entry.name)
    return None


@contextlib.contextmanager
def _daemon_json_held() -> Iterator[None]:
    """daemon.json to this process alone: test workers run side by side, and each reload must be
    its own (read, change, write, SIGHUP, and its reload event) with no other's in between."""
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _reload(client: DockerClient, pid: int, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """daemon.json's runtimes changed, and dockerd reloaded; returns after its reload event."""
    with _daemon_json_held():
        events = client.events(decode=True, filters={"type": "daemon", "event": "reload"})
        try:
            config = json.loads(DAEMON_JSON.read_text())
            config["runtimes"] = change(config.get("runtimes", {}))
            DAEMON_JSON.write_text(json.dumps(config, indent=2))
            os.kill(pid, signal.SIGHUP)
            next(iter(events))
        finally:
            events.close()


@contextlib.contextmanager
def registered_runtime(client: DockerClient, prefix: str, runtime_args: tuple[str, ...]) -> Iterator[str]:
    """runsc registered with ``runtime_args`` as PREFIX-PID for the ``with`` block; its name."""
    pid = _dockerd_pid()
    if pid is None or not os.access(DAEMON_JSON, os.W_OK):
        unavailable("needs a local dockerd and a writable /etc/docker/daemon.json")
    name = f"{prefix}-{os.getpid()}"
    entry = {"path": RUNSC, "runtimeArgs": list(runtime_args)}
    _reload(client, pid, lambda runtimes: {**runtimes, name: entry})
    try:
        yield name
    finally:
        _reload(client, pid, lambda runtimes: {k: v for k, v in runtimes.items() if k != name})
