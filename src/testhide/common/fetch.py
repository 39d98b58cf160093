"""What a job's fetch step did: one definition for the three programs (like the
isolation facts): the agent's egress proxy records the requests and the agent
reports the step, the control plane stores and serves it, the CLI prints it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
    """What the fetch step did, reported by the agent before the job step starts."""

    cache: str
    """``hit`` (restored, the fetch step skipped), ``miss`` (fetched, then kept) or ``none``."""
    exit_code: int
    """The fetch command's exit code; 0 on a cache hit."""
    duration_s: float
    requests: tuple[EgressRequest, ...] = ()
