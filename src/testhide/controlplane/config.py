"""The control plane's configuration: one frozen, validated object. Only the
command line reads flags and the environment; the daemon gets this."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from testhide.common.metrics_tls import check_metrics_options
from testhide.common.tls import split_target
from testhide.controlplane.auth.limits import DEFAULT_ADDRESS_LOCKOUT, LockoutPolicy
from testhide.controlplane.auth.passwords import default_workers
from testhide.controlplane.ca.signer import default_processes
from testhide.controlplane.datadir import BACKUPS_DIR
from testhide.controlplane.errors import ConfigError

MIN_AGENT_CERT_TTL = timedelta(seconds=10)
MAX_AGENT_CERT_TTL = timedelta(hours=24)
MIN_BACKUP_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True)
class ControlPlaneConfig:
    data_dir: Path
    """Directory created by ``testhide-controlplane init``."""
    listen: str = "127.0.0.1:7443"
    """HOST:PORT of the API port (server TLS; users and enrollment)."""
    agent_listen: str | None = None
    """HOST:PORT of the agent port (mutual TLS). Default: the API port + 1 (0 stays 0)."""
    agent_cert_ttl: timedelta = timedelta(hours=1)
    """Lifetime of agent certificates; also bounds the age of agent connections."""
    dev: bool = False
    """Accept development certificates from certs-dev/. Never in production."""
    max_request_bytes: int = 4 * 1024 * 1024
    """Largest request accepted on the API port."""
    shutdown_grace: timedelta = timedelta(seconds=5)
    """How long in-flight RPCs get to finish on SIGTERM."""
    rate_per_address: float = 100.0
    """API requests per second from one client address (token bucket, burst twice that)."""
    rate_per_principal: float = 50.0
    """API requests per second for one user or API key (token bucket, burst twice that)."""
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    """Failed logins per account before exponential backoff, and the window they count in."""
    address_lockout: LockoutPolicy = field(default_factory=lambda: DEFAULT_ADDRESS_LOCKOUT)
    """Failed logins from one client address (an IPv6 /64), over all accounts and API keys,
    before exponential backoff (20 in 15 min, then 1 s doubling per failure up to 15 min;
    attempts refused with RESOURCE_EXHAUSTED meanwhile). Kept in the store, so replicas share it."""
    password_workers: int = field(default_factory=default_workers)
    """Threads that run bcrypt for password logins (default: half the cores, at least 1)."""
    password_queue: int = 16
    """Password logins that may wait for a bcrypt thread; more are refused at once with
    RESOURCE_EXHAUSTED, so a login flood cannot stall other RPCs or agent streams."""
    signing_processes: int = field(default_factory=default_processes)
    """Helper processes that sign agent certificates (enrollment, renewal) off the event loop (default: a
    core each but one, up to 4); 0 signs on the event loop."""
    refresh_reuse_grace: timedelta = timedelta(seconds=10)
    """A spent refresh token presented again within this window is taken as a retry of a
    reply lost in transit; later, as theft, and its whole session is revoked."""
    job_lease: timedelta = timedelta(seconds=60)
    """How long an assignment holds without a heartbeat from its agent (agents send three per
    lease). Past it, a job that had not started is queued again and a running one is LOST."""
    db_busy_timeout: timedelta = timedelta(seconds=10)
    """How long a write waits for a database lock held by another process before the
    request fails with UNAVAILABLE (nothing changed; clients retry)."""
    failure_spike_threshold: int = 20
    """Failed authentications from one address or against one account, per minute, that raise an alert."""
    metrics_listen: str | None = None
    """HOST:PORT serving Prometheus metrics on /metrics; off when None. Plain HTTP on a loopback
    address; on any other, TLS with ``metrics_cert``, or else the server certificate."""
    metrics_cert: Path | None = None
    """PEM certificate chain the metrics port serves TLS with, on any address (with ``metrics_key``)."""
    metrics_key: Path | None = None
    """PEM private key (unencrypted) of ``metrics_cert``."""
    master_key: str | None = None
    """Where the master key ring is, when not where the data dir says: ``file:PATH`` (a ring file)
    or a ``pkcs11:`` URI (the HSM key that wraps DIR/keyring.pkcs11, e.g. another module path)."""
    backup_every: timedelta | None = None
    """How often to write an encrypted backup, as ``testhide-controlplane backup`` does, into
    ``backup_dir``; off when None. At least 1s (a day is usual; seconds are for tests).
    SQLite data dirs only: a PostgreSQL one is refused at start (back it up with pg_dump)."""
    backup_dir: Path | None = None
    """Where scheduled backups go (created 0700); None: DATA_DIR/backups. Outside the data
    dir, or that very directory, which backups leave out: a backup never holds another."""
    backup_keep: int = 14
    """Scheduled backups kept: after each one, older ones of its naming are deleted; other
    files in ``backup_dir`` (pre-migration backups, an operator's own) are never touched."""

    def __post_init__(self) -> None:
        try:
            split_target(self.listen)
            split_target(self.resolved_agent_listen)
            check_metrics_options(
                self.metrics_listen, self.metrics_cert, self.metrics_key, own_certificate=True
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not MIN_AGENT_CERT_TTL <= self.agent_cert_ttl <= MAX_AGENT_CERT_TTL:
            raise ConfigError("agent certificate lifetime must be between 10s and 24h")
        if not timedelta(seconds=1) <= self.job_lease <= timedelta(hours=1):
            raise ConfigError("the job lease must be between 1s and 1h")
        if self.rate_per_address <= 0 or self.rate_per_principal <= 0:
            raise ConfigError("rate limits must be positive")
        if not 1024 <= self.max_request_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max request size must be between 1 KiB and 64 MiB")
        for policy in (self.lockout, self.address_lockout):
            if policy.failures < 1 or policy.window <= timedelta(0) or policy.first_delay <= timedelta(0):
                raise ConfigError("a failure budget needs at least 1 failure, a window and a first delay")
        if not 1 <= self.password_workers <= 64 or not 0 <= self.password_queue <= 10_000:
            raise ConfigError("password workers must be 1-64 and the password queue 0-10000")
        if not 0 <= self.signing_processes <= 64:
            raise ConfigError("signing processes must be 0-64")
        self._check_backups()

    def _check_backups(self) -> None:
        if self.backup_every is not None and self.backup_every < MIN_BACKUP_INTERVAL:
            raise ConfigError("the backup interval must be at least 1s")
        if self.backup_keep < 1:
            raise ConfigError("at least 1 scheduled backup must be kept")
        data_dir, backups = self.data_dir.resolve(), self.resolved_backup_dir.resolve()
        if backups != data_dir / BACKUPS_DIR and backups.is_relative_to(data_dir):
            raise ConfigError(
                f"the backup dir {self.resolved_backup_dir} is inside the data dir: each backup would"
                f" hold the earlier ones; use {self.data_dir / BACKUPS_DIR} or a directory outside it"
            )

    @property
    def resolved_backup_dir(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else self.data_dir / BACKUPS_DIR

    @property
    def resolved_agent_listen(self) -> str:
        if self.agent_listen:
            return self.agent_listen
        host, port = split_target(self.listen)
        return f"{host}:{port + 1 if port else 0}"
