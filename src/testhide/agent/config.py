"""The agent's configuration: one frozen, validated object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from testhide.agent.errors import ConfigError
from testhide.common.metrics_tls import check_metrics_options

_USER_RE = re.compile(r"\A[0-9]+(:[0-9]+)?\Z")


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    """Directory written by ``testhide-agent enroll``: key, certificate, CA bundle."""
    max_jobs: int = 1
    """Jobs run at once."""
    job_user: str = "65534:65534"
    """uid:gid the job's processes run as; never 0."""
    runtime: str = "runc"
    """Docker runtime for jobs (``runsc`` for gVisor)."""
    heartbeat_interval: timedelta = timedelta(seconds=20)
    """How often the agent tells the control plane it is alive."""
    log_batch_bytes: int = 1024 * 1024
    """A log batch is sent when it holds this many bytes ..."""
    log_batch_interval: timedelta = timedelta(milliseconds=250)
    """... or when its oldest byte is this old, whichever comes first."""
    stop_grace: timedelta = timedelta(seconds=10)
    """Between SIGTERM and SIGKILL when a job is canceled or times out."""
    max_backoff: timedelta = timedelta(seconds=30)
    """Cap of the reconnect backoff."""
    labels: dict[str, str] = field(default_factory=dict)
    """What this host offers; jobs asking for labels only come to agents that have them all."""
    log_cap_bytes: int = 64 * 1024 * 1024
    """Past this, a job's log gets a truncation marker and the rest is dropped; the job runs on."""
    max_workspace_bytes: int = 256 * 1024 * 1024
    max_artifact_bytes: int = 256 * 1024 * 1024
    """Largest single artifact collected."""
    max_job_artifact_bytes: int = 1024 * 1024 * 1024
    """Largest total of artifacts collected from one job."""

    spool_max_bytes: int = 512 * 1024 * 1024
    """Log bytes kept on disk while the control plane is out of reach; past it, jobs' output waits."""
    drain_timeout: timedelta = timedelta(minutes=5)
    """On SIGTERM, how long running jobs may go on before they are canceled."""
    metrics_listen: str | None = None
    """HOST:PORT serving Prometheus metrics on /metrics and health on /healthz; off when None.
    Plain HTTP on a loopback address; on any other, TLS with ``metrics_cert`` (required there)."""
    metrics_cert: Path | None = None
    """PEM certificate chain the metrics port serves TLS with, on any address (with ``metrics_key``)."""
    metrics_key: Path | None = None
    """PEM private key (unencrypted) of ``metrics_cert``."""
    cache_max_bytes: int = 10 * 1024**3
    """The jobs' caches (``--cache KEY``) kept on this host, in all; past it the least
    recently used go, and a single cache larger than this is not kept."""
    egress_network: str = "bridge"
    """The Docker network the egress proxy reaches the outside through (the fetch step's only way out)."""

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def caches_index(self) -> Path:
        """Which Docker volume holds each cache, its size and last use (``agent/caches.py``)."""
        return self.data_dir / "caches.json"

    def __post_init__(self) -> None:
        if not 1 <= self.max_jobs <= 64:
            raise ConfigError("max_jobs must be between 1 and 64")
        if not _USER_RE.match(self.job_user) or self.job_user.split(":")[0] == "0":
            raise ConfigError("job_user must be a numeric non-root uid[:gid]")
        if self.spool_max_bytes < 2 * self.log_batch_bytes:
            raise ConfigError("spool_max_bytes must hold at least two log batches")
        if self.drain_timeout < timedelta(0):
            raise ConfigError("drain_timeout must not be negative")
        if not 1024 <= self.log_batch_bytes <= 2 * 1024 * 1024:
            raise ConfigError("log_batch_bytes must be between 1 KiB and 2 MiB")
        if self.cache_max_bytes <= 0:
            raise ConfigError("cache_max_bytes must be positive")
        if not self.egress_network.strip():
            raise ConfigError("egress_network must name a Docker network")
        try:
            # The agent's own certificate names it to the control plane: no certificate to serve.
            check_metrics_options(
                self.metrics_listen, self.metrics_cert, self.metrics_key, own_certificate=False
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
