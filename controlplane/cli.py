"""``testhide-controlplane``: the operator's command."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from common.durations import format_duration, parse_duration
from common.logging import configure
from controlplane.config import ControlPlaneConfig
from controlplane.errors import ControlPlaneError

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from exc


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return parse_duration(value) if isinstance(value, str) else value
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path), required=True,
                               envvar="TESTHIDE_DATA_DIR", help="The control plane's data directory.")


@click.group()
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True)
@click.option("--log-level", default="info", show_default=True)
def main(log_format: str, log_level: str) -> None:
    """Run and administer a testhide control plane."""
    configure(log_level, json_output=log_format == "json")


@main.command()
@data_dir_option
@click.option("--server-name", "server_names", multiple=True,
              help="DNS name or IP the listeners answer as (repeatable). Default: localhost, 127.0.0.1.")
@click.option("--trust-domain", default="testhide.local", show_default=True)
@click.option("--import-ca", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="CERT KEY", help="Use an existing CA (PEM certificate and ECDSA key).")
@click.option("--dev", is_flag=True, help="Allow development certificates from certs-dev/.")
def init(data_dir: Path, server_names: tuple[str, ...], trust_domain: str, import_ca: tuple[Path, Path] | None,
         dev: bool) -> None:
    """Create the data dir: CA, server certificate, database, admin API key."""
    from cryptography import x509

    from controlplane.ca.authority import is_development_ca
    from controlplane.datadir import initialise

    imported = None
    if import_ca:
        imported = (import_ca[0].read_bytes(), import_ca[1].read_bytes())
        if is_development_ca(x509.load_pem_x509_certificate(imported[0])) and not dev:
            raise click.ClickException("that CA is development material from certs-dev/; pass --dev to use it")
    admin_key = _run(initialise(data_dir, list(server_names) or ["localhost", "127.0.0.1"], trust_domain,
                                imported))
    click.echo(f"initialised {data_dir}", err=True)
    click.echo("admin API key (shown once; store it now):", err=True)
    click.echo(admin_key)


@main.command()
@data_dir_option
@click.option("--listen", default="127.0.0.1:7443", show_default=True, envvar="TESTHIDE_LISTEN",
              help="HOST:PORT of the API port.")
@click.option("--agent-listen", default=None, help="HOST:PORT of the mutual-TLS agent port [API port + 1].")
@click.option("--agent-cert-ttl", type=Duration(), default="1h", show_default=True)
@click.option("--dev", is_flag=True, help="Accept development certificates. Never in production.")
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the bound ports as JSON here once serving (for port 0).")
def serve(data_dir: Path, listen: str, agent_listen: str | None, agent_cert_ttl: Any, dev: bool,
          port_file: Path | None) -> None:
    """Serve the API and agent ports until SIGTERM or SIGINT."""
    from controlplane.daemon import ControlPlane

    async def run() -> None:
        daemon = ControlPlane(ControlPlaneConfig(data_dir=data_dir, listen=listen, agent_listen=agent_listen,
                                                 agent_cert_ttl=agent_cert_ttl, dev=dev))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(daemon.shutdown()))
        await daemon.start()
        if port_file:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(json.dumps({"api_port": daemon.api_port, "agent_port": daemon.agent_port}))
            tmp.replace(port_file)
        await daemon.run()

    _run(run())


@main.group("enroll-token")
def enroll_token() -> None:
    """One-time agent enrollment tokens."""


@enroll_token.command("create")
@data_dir_option
@click.option("--org", default="default", show_default=True)
@click.option("--pool", default="default", show_default=True)
@click.option("--ttl", type=Duration(), default="10m", show_default=True)
def enroll_token_create(data_dir: Path, org: str, pool: str, ttl: Any) -> None:
    """Print a one-time token that enrolls one agent into ORG/POOL."""
    from controlplane.ca.enrollment import create_token
    from controlplane.datadir import DataDir
    from controlplane.store.sqlite import SqliteStore

    async def run() -> str:
        directory = DataDir(data_dir)
        directory.require_initialised()
        store = await SqliteStore.open(directory.db_path)
        try:
            return await create_token(store, (data_dir / "ca.pem").read_bytes(), org, pool, ttl)
        finally:
            await store.close()

    token = _run(run())
    click.echo(f"enrollment token for {org}/{pool}, valid {format_duration(ttl)}, one use:", err=True)
    click.echo(token)



if __name__ == "__main__":
    main()
