"""What a job's fetch step did: one definition for the three programs (like the
isolation facts): the agent's egress proxy records the requests and the agent
reports the step, the control plane stores and serves it, the CLI prints it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from testhide.common.isolation import Isolation

JOB_NETWORK_PREFIX = "testhide-egress-"
"""The fetch step's network is ``JOB_NETWORK_PREFIX + job id``: internal, made for the job
alone, its only other member the job's egress proxy (``agent/egress/proxy.py``)."""


def job_network(job_id: str) -> str:
    """The name of the job's own internal network, the fetch step's only one."""
    return f"{JOB_NETWORK_PREFIX}{job_id}"


@dataclass(frozen=True)
class EgressRequest:
    """One request the fetch step's egress proxy saw."""

    at: datetime
    method: str
    """``GET``, ``CONNECT`` (HTTPS, tunnelled, never intercepted), ..."""
    host: str
    port: int
    allowed: bool
    """False when the proxy refused it: not on the pool's egress list."""
    http_status: int
    """What the proxy answered (200, 403, ...); 0 when it answered nothing."""
    bytes_sent: int
    """From the fetch step to the proxy."""
    bytes_received: int
    """From the proxy to the fetch step."""


@dataclass(frozen=True)
class FetchStep:
    """What the fetch step did, reported by the agent as its container starts and again
    at its end, before the job step starts."""

    cache: str
    """``hit`` (restored, the fetch step skipped), ``miss`` (fetched, then kept) or ``none``."""
    exit_code: int
    """The fetch command's exit code; 0 on a cache hit."""
    duration_s: float
    requests: tuple[EgressRequest, ...] = ()
    isolation: Isolation | None = None
    """What Docker applied to the fetch step's container, read back right after its start;
    None on a cache hit (no container) or when it could not be read."""
    running: bool = False
    """True in the report sent as the fetch step's container starts: its isolation facts,
    for the control plane to check while it runs (a mismatch stops it); ``exit_code``,
    ``duration_s`` and ``requests`` come with the step's end, in a later report."""
