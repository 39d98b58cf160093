"""``testhide-agent``: enroll once, then run."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from testhide import __version__
from testhide.agent.errors import AgentError
from testhide.common.durations import Duration
from testhide.common.logging import configure
from testhide.common.settings import Reloader, SettingsCommand, log_options
from testhide.common.sizes import MiB, Size

T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    envvar="TESTHIDE_AGENT_DATA_DIR",
    help="Where the agent keeps its identity.",
)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(__version__, prog_name="testhide-agent", message="%(prog)s %(version)s")
@log_options("TESTHIDE_AGENT_")
def main(log_format: str, log_level: str) -> None:
    """The testhide build agent."""
    configure(log_level, json_output=log_format == "json")


@main.command()
@click.option(
    "--server",
    "servers",
    required=True,
    multiple=True,
    help="HOST:PORT of the control plane's API port; repeat for each replica (tried in order).",
)
@click.option("--token", required=True, envvar="TESTHIDE_ENROLL_TOKEN", help="One-time enrollment token.")
@data_dir_option
@click.option("--name", default=socket.gethostname(), show_default=True)
@click.option(
    "--agent-server",
    "agent_servers",
    multiple=True,
    help="HOST:PORT of a replica's agent port (repeatable). Default: each --server at the same"
    " distance from its API port as the answering replica's agent port.",
)
def enroll(
    servers: tuple[str, ...], token: str, data_dir: Path, name: str, agent_servers: tuple[str, ...]
) -> None:
    """Enroll this host with a one-time token; the private key stays here.
    `run` connects to any of the servers, moving on when one goes away."""
    from testhide.agent.rpc.enroll import enroll as do_enroll

    credentials = _run(do_enroll(servers, token, data_dir, name, agent_servers))
    click.echo(
        f"enrolled as agent {credentials.agent_id}; "
        f"certificate valid until {credentials.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    )


@main.command(cls=SettingsCommand, envvar_prefix="TESTHIDE_AGENT_")
@data_dir_option
@click.option("--max-jobs", default=1, show_default=True, help="Jobs run at once.")
@click.option(
    "--runtime", default="runc", show_default=True, help="Default Docker runtime for jobs (runsc: gVisor)."
)
@click.option("--label", "labels", multiple=True, metavar="K=V", help="What this host offers (repeatable).")
@click.option(
    "--drain-timeout",
    type=Duration(),
    default="5m",
    show_default=True,
    help="On SIGTERM, how long running jobs may go on before they are canceled.",
)
@click.option(
    "--spool-max",
    type=Size(min=4 * MiB),
    default="512MiB",
    show_default=True,
    help="Job output kept on disk while the control plane is out of reach.",
)
@click.option(
    "--cache-max",
    type=Size(min=1),
    default="10GiB",
    show_default=True,
    help="Jobs' caches (--cache KEY) kept on this host in all; the least recently used go first.",
)
@click.option(
    "--egress-network",
    default="bridge",
    show_default=True,
    help="Docker network the jobs' egress proxies (the fetch step's only way out) reach the outside through.",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on /metrics and health on /healthz here [off]: plain HTTP on a"
    " loopback address; on any other, TLS with --metrics-cert and --metrics-key (required there).",
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
@log_options("TESTHIDE_AGENT_")
def run(
    data_dir: Path,
    max_jobs: int,
    runtime: str,
    labels: tuple[str, ...],
    drain_timeout: timedelta,
    spool_max: int,
    cache_max: int,
    egress_network: str,
    metrics_listen: str | None,
    metrics_cert: Path | None,
    metrics_key: Path | None,
    log_format: str,
    log_level: str,
) -> None:
    """Connect to the control plane and run jobs. SIGTERM drains (no new jobs;
    running ones finish or are canceled after --drain-timeout; results are
    delivered); a second SIGTERM or SIGINT stops at once. SIGHUP reads the
    config file again (the log level and format change at once; other settings
    at the next start) and checks the credentials files."""
    from testhide.agent.config import AgentConfig
    from testhide.agent.daemon import Agent
    from testhide.agent.runtime.docker import DockerRuntime

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the handler below is in place
    configure(log_level, json_output=log_format == "json")
    reloader = Reloader(click.get_current_context())

    async def serve() -> None:
        offered = {}
        for label in labels:
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{label!r} is not K=V", param_hint="--label")
            offered[key] = value
        agent = Agent(
            AgentConfig(
                data_dir=data_dir,
                max_jobs=max_jobs,
                runtime=runtime,
                labels=offered,
                drain_timeout=drain_timeout,
                spool_max_bytes=spool_max,
                cache_max_bytes=cache_max,
                egress_network=egress_network,
                metrics_listen=metrics_listen,
                metrics_cert=metrics_cert,
                metrics_key=metrics_key,
            ),
            DockerRuntime(),
        )
        loop = asyncio.get_running_loop()
        draining: list[asyncio.Task[None]] = []

        def on_signal() -> None:
            if draining:
                agent.shutdown()
            else:
                draining.append(asyncio.create_task(agent.drain()))

        def on_hangup() -> None:
            with agent.notifier.reloading():  # RELOADING=1, then READY=1 (systemd)
                reloader.reload()
                agent.check_credentials()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        await agent.run()

    _run(serve())


from testhide.agent.doctor import doctor  # noqa: E402  (the command lives beside its checks)

main.add_command(doctor)

from testhide.agent.cache_commands import caches  # noqa: E402

main.add_command(caches)

if __name__ == "__main__":
    main()
