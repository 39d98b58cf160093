"""Creating a data dir and serving it: ``init`` and ``serve``."""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from testhide.common.durations import Duration
from testhide.common.logging import configure
from testhide.common.settings import Reloader, SettingsCommand, log_options
from testhide.common.sizes import KiB, MiB, Size
from testhide.controlplane.commands.common import data_dir_option, master_key_option
from testhide.controlplane.commands.common import run as _run
from testhide.controlplane.config import ControlPlaneConfig


@click.command()
@data_dir_option
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="DNS name or IP the listeners answer as (repeatable). Default: localhost, 127.0.0.1.",
)
@click.option("--trust-domain", default="testhide.local", show_default=True)
@click.option(
    "--import-ca",
    nargs=2,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="CERT KEY",
    help="Use an existing CA (PEM certificate and ECDSA key).",
)
@click.option("--dev", is_flag=True, help="Allow development certificates from certs-dev/.")
@click.option(
    "--database",
    "database_url",
    metavar="URL",
    envvar="TESTHIDE_DATABASE_URL",
    show_envvar=True,
    help="Keep the store in this empty PostgreSQL database (postgresql://USER:PASSWORD@HOST:PORT/DB)"
    " instead of SQLite in the data dir; prefer the environment variable or --database-file for a"
    " password.",
)
@click.option(
    "--database-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the PostgreSQL URL from this file.",
)
@click.option(
    "--master-key",
    metavar="pkcs11:URI",
    help="Keep the master key ring wrapped by this HSM key (created in the token if absent) in"
    " DATA_DIR/keyring.pkcs11 instead of DATA_DIR/master.key, e.g. pkcs11:token=testhide;object=master"
    "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/testhide/pin (or the PIN in"
    " TESTHIDE_PKCS11_PIN).",
)
def init(
    data_dir: Path,
    server_names: tuple[str, ...],
    trust_domain: str,
    import_ca: tuple[Path, Path] | None,
    dev: bool,
    database_url: str | None,
    database_file: Path | None,
    master_key: str | None,
) -> None:
    """Create the data dir: CA, server certificate, database, admin API key.

    With --database, the store lives in PostgreSQL and the data dir records its
    URL (database.url, 0600): a copy of the data dir is all another machine needs
    to serve as a replica."""
    from cryptography import x509

    from testhide.controlplane.ca.authority import is_development_ca
    from testhide.controlplane.datadir import initialise

    imported = None
    if import_ca:
        imported = (import_ca[0].read_bytes(), import_ca[1].read_bytes())
        if is_development_ca(x509.load_pem_x509_certificate(imported[0])) and not dev:
            raise click.ClickException(
                "that CA is development material from certs-dev/; pass --dev to use it"
            )
    if database_file is not None:
        if database_url:
            raise click.UsageError("give --database or --database-file, not both")
        database_url = database_file.read_text().strip()
    admin_key = _run(
        initialise(
            data_dir,
            list(server_names) or ["localhost", "127.0.0.1"],
            trust_domain,
            imported,
            database_url or None,
            master_key,
        )
    )
    click.echo(f"initialised {data_dir}", err=True)
    from testhide.controlplane.store.base import DEFAULT_ADMIN_KEY_MAX_LIFETIME

    days = DEFAULT_ADMIN_KEY_MAX_LIFETIME.days
    click.echo(
        f"admin API key (shown once; store it now). It expires in {days} days, as the organisation's"
        " policy for keys with admin scopes requires: before then, create the keys you need"
        " (testhide admin api-keys create) or a new one (testhide-controlplane api-keys create"
        f" --scope org:admin --expires-in {days}d):",
        err=True,
    )
    click.echo(admin_key)


@click.command(cls=SettingsCommand, envvar_prefix="TESTHIDE_")
@data_dir_option
@click.option(
    "--listen",
    default="127.0.0.1:7443",
    show_default=True,
    envvar="TESTHIDE_LISTEN",
    help="HOST:PORT of the API port.",
)
@click.option("--agent-listen", default=None, help="HOST:PORT of the mutual-TLS agent port [API port + 1].")
@click.option(
    "--agent-cert-ttl",
    type=Duration(),
    default="1h",
    show_default=True,
    help="Lifetime of the certificates agents get at enrollment and renewal (at most 24h);"
    " they renew at half of it.",
)
@click.option(
    "--job-lease",
    type=Duration(),
    default="60s",
    show_default=True,
    help="How long a job's agent may stay silent before the job is requeued or LOST.",
)
@click.option(
    "--db-busy-timeout",
    type=Duration(),
    default="10s",
    show_default=True,
    help="How long a write waits for a database lock another process holds.",
)
@click.option(
    "--address-failure-budget",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    envvar="TESTHIDE_ADDRESS_FAILURE_BUDGET",
    show_envvar=True,
    help="Failed logins from one client address (all accounts) before exponential backoff.",
)
@click.option(
    "--address-failure-window",
    type=Duration(),
    default="15m",
    show_default=True,
    envvar="TESTHIDE_ADDRESS_FAILURE_WINDOW",
    show_envvar=True,
    help="An address's failures are forgotten after this long without one.",
)
@click.option(
    "--password-workers",
    type=click.IntRange(1, 64),
    default=None,
    envvar="TESTHIDE_PASSWORD_WORKERS",
    show_envvar=True,
    help="Threads that check passwords (bcrypt) [half the cores].",
)
@click.option(
    "--signing-processes",
    type=click.IntRange(0, 64),
    default=None,
    envvar="TESTHIDE_SIGNING_PROCESSES",
    show_envvar=True,
    help="Helper processes that sign agent certificates (enrollment, renewal); 0 signs in the daemon's"
    " event loop [a core each but one, up to 4].",
)
@click.option(
    "--password-queue",
    type=click.IntRange(0, 10_000),
    default=16,
    show_default=True,
    envvar="TESTHIDE_PASSWORD_QUEUE",
    show_envvar=True,
    help="Password logins that may wait for a thread; more get RESOURCE_EXHAUSTED at once.",
)
@click.option("--dev", is_flag=True, help="Accept development certificates. Never in production.")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound ports as JSON here once serving (for port 0).",
)
@click.option(
    "--max-request-size",
    type=Size(min=KiB, max=64 * MiB),
    default="4MiB",
    show_default=True,
    help="Largest request accepted on the API port.",
)
@master_key_option
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on /metrics here [off]: plain HTTP on a loopback address, TLS on"
    " any other (with --metrics-cert, or else the server certificate).",
)
@click.option(
    "--metrics-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM certificate chain the metrics port serves TLS with, on any address (with --metrics-key).",
)
@click.option(
    "--metrics-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Unencrypted PEM private key of --metrics-cert.",
)
@click.option(
    "--backup-every",
    type=Duration(),
    default=None,
    help="Write an encrypted backup, as the backup command does, this often (e.g. 24h) into"
    " --backup-dir [off]. SQLite data dirs only.",
)
@click.option(
    "--backup-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where --backup-every writes testhide-YYYYmmddTHHMMSSZ.thb files (created 0700) [DATA_DIR/backups].",
)
@click.option(
    "--backup-keep",
    type=click.IntRange(1),
    default=14,
    show_default=True,
    help="Scheduled backups kept; older ones are deleted, never any other file in --backup-dir.",
)
@log_options("TESTHIDE_")
def serve(
    data_dir: Path,
    listen: str,
    agent_listen: str | None,
    agent_cert_ttl: Any,
    job_lease: Any,
    db_busy_timeout: Any,
    address_failure_budget: int,
    address_failure_window: timedelta,
    password_workers: int | None,
    signing_processes: int | None,
    password_queue: int,
    dev: bool,
    port_file: Path | None,
    max_request_size: int,
    master_key: str | None,
    metrics_listen: str | None,
    metrics_cert: Path | None,
    metrics_key: Path | None,
    backup_every: timedelta | None,
    backup_dir: Path | None,
    backup_keep: int,
    log_format: str,
    log_level: str,
) -> None:
    """Serve the API and agent ports until SIGTERM or SIGINT. SIGHUP reads the
    config file again (the log level and format change at once; other settings
    at the next start) and looks for rotated certificates at once."""
    from testhide.controlplane.auth.limits import DEFAULT_ADDRESS_LOCKOUT
    from testhide.controlplane.auth.passwords import default_workers
    from testhide.controlplane.ca.signer import default_processes
    from testhide.controlplane.daemon import ControlPlane

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the handler below is in place
    configure(log_level, json_output=log_format == "json")
    reloader = Reloader(click.get_current_context())
    address_lockout = replace(
        DEFAULT_ADDRESS_LOCKOUT, failures=address_failure_budget, window=address_failure_window
    )

    async def run() -> None:
        daemon = ControlPlane(
            ControlPlaneConfig(
                data_dir=data_dir,
                listen=listen,
                agent_listen=agent_listen,
                agent_cert_ttl=agent_cert_ttl,
                job_lease=job_lease,
                db_busy_timeout=db_busy_timeout,
                address_lockout=address_lockout,
                password_workers=password_workers or default_workers(),
                password_queue=password_queue,
                signing_processes=default_processes() if signing_processes is None else signing_processes,
                dev=dev,
                max_request_bytes=max_request_size,
                master_key=master_key,
                metrics_listen=metrics_listen,
                metrics_cert=metrics_cert,
                metrics_key=metrics_key,
                backup_every=backup_every,
                backup_dir=backup_dir,
                backup_keep=backup_keep,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(daemon.shutdown()))

        def on_hangup() -> None:
            with daemon.notifier.reloading():  # RELOADING=1, then READY=1 (systemd)
                reloader.reload()
                daemon.reload()

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        await daemon.start()
        if port_file:
            tmp = port_file.with_name(port_file.name + ".tmp")
            ports = {
                "api_port": daemon.api_port,
                "agent_port": daemon.agent_port,
                "metrics_port": daemon.metrics_port,  # 0: no metrics port
            }
            tmp.write_text(json.dumps(ports))
            tmp.replace(port_file)
        await daemon.run()

    _run(run())
