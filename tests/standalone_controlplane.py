"""A test control plane in a process of its own, for tests that watch it from outside
(its memory, its survival):
``python -m tests.standalone_controlplane DIR CONFIG_JSON PARENT_PID READY_FD``.

It is ``harness.control_plane`` (a fresh data dir in DIR, pools that never pull) with
the config overrides in CONFIG_JSON (rate limits, say). Once both ports serve it writes
to READY_FD (a pipe the parent passed it), as one JSON line, and closes it: the ports,
the admin API key and a one-time enrollment token. The parent waits on the pipe, which
also ends, empty, if this process dies first. It runs until SIGTERM, or until the
process PARENT_PID that started it ends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from testhide.common.logging import configure
from testhide.common.orphans import end_with
from tests.harness import control_plane


async def serve(directory: Path, config: dict[str, object], ready_fd: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with control_plane(directory, database_url=None, **config) as cp:
        info = {
            "api_port": cp.daemon.api_port,
            "agent_port": cp.daemon.agent_port,
            "admin_key": cp.admin_key,
            "ca_pem": cp.ca_pem.decode(),
            "enrollment_token": await cp.enrollment_token(),
        }
        with os.fdopen(ready_fd, "w") as ready:
            ready.write(json.dumps(info) + "\n")
        await stop.wait()


if __name__ == "__main__":
    end_with(int(sys.argv[3]), signal.SIGTERM)  # SIGTERM: it stops as it would be stopped
    configure("info")
    asyncio.run(serve(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[4])))
