"""``testhide-agent caches``: what the jobs' caches hold on this host, and
removing them. Run on the agent's host as the agent's user (it reads the
data dir and talks to the same Docker engine); the agent may be running:
the index is shared under a file lock, and a cache a container is using is
never removed (Docker refuses, and the cache is reported as skipped)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from testhide.common.sizes import describe_size

if TYPE_CHECKING:
    from testhide.agent.caches import CacheEntry, Caches

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    envvar="TESTHIDE_AGENT_DATA_DIR",
    show_envvar=True,
    help="The agent's data dir (its identity names its caches; caches.json indexes them).",
)
T = TypeVar("T")
COLUMNS = ("org", "pool", "key", "size", "last_used_at", "created_at", "volume")


def rfc3339(value: datetime) -> str:
    """A time as every --json shows it: RFC 3339, UTC, microseconds, Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_json(entry: CacheEntry) -> dict[str, Any]:
    return {
        "org": entry.org,
        "pool": entry.pool,
        "key": entry.key,
        "volume": entry.volume,
        "size_bytes": entry.size_bytes,
        "last_used_at": rfc3339(entry.last_used_at),
        "created_at": rfc3339(entry.created_at),
    }


def _row(entry: CacheEntry) -> dict[str, str]:
    shown = {**entry_json(entry), "size": describe_size(entry.size_bytes)}
    for name in ("last_used_at", "created_at"):
        shown[name] = f"{getattr(entry, name).astimezone(UTC):%Y-%m-%d %H:%M:%S}"
    return shown


def _table(entries: list[CacheEntry]) -> str:
    rows = [_row(entry) for entry in entries]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """One line, not a traceback, when the engine or the data dir fails us."""
    import docker.errors

    from testhide.agent.errors import AgentError

    try:
        return asyncio.run(coro)
    except (AgentError, docker.errors.DockerException, OSError) as exc:
        raise click.ClickException(str(getattr(exc, "explanation", None) or exc)) from exc


def open_caches(data_dir: Path) -> Caches:
    """The caches of the agent enrolled in ``data_dir``, on the engine of DOCKER_HOST."""
    import docker
    import docker.errors

    from testhide.agent.caches import Caches
    from testhide.agent.config import AgentConfig
    from testhide.agent.credentials import Credentials
    from testhide.agent.errors import ConfigError
    from testhide.agent.runtime.docker import unreachable_engine

    try:
        owner = Credentials.load(data_dir).agent_id
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        raise click.ClickException(unreachable_engine(exc)) from exc
    config = AgentConfig(data_dir=data_dir)
    return Caches(client, config.caches_index, config.cache_max_bytes, owner, config.job_user)


@click.group()
def caches() -> None:
    """The jobs' caches (--cache KEY) kept on this host: Docker volumes, one
    per org, pool and key, the least recently used removed past --cache-max."""


@caches.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document (an array) instead of a table.")
def list_caches(data_dir: Path, as_json: bool) -> None:
    """Every cache: its org, pool and key, size, last use and volume; most recently used first."""
    found = _run(open_caches(data_dir).entries())
    if as_json:
        click.echo(json.dumps([entry_json(entry) for entry in found], indent=2))
        return
    click.echo(_table(found))
    total = sum(entry.size_bytes for entry in found)
    click.echo(f"{len(found)} cache{'' if len(found) == 1 else 's'}, {describe_size(total)}", err=True)


@caches.command("clear")
@data_dir_option
@click.option("--org", help="Only this org's caches.")
@click.option("--pool", help="Only caches of this pool.")
@click.option("--key", help="Only caches of this key.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
def clear_caches(data_dir: Path, org: str | None, pool: str | None, key: str | None, as_json: bool) -> None:
    """Remove the caches matching every filter given; all of them when none is.
    A cache a container is using is skipped (and named); the next job of its key
    fills a new one."""
    report = _run(open_caches(data_dir).clear_report(org, pool, key))
    if as_json:
        document = {
            "removed_count": len(report.removed),
            "removed_bytes": report.removed_bytes,
            "removed": [entry_json(entry) for entry in report.removed],
            "skipped": [entry_json(entry) for entry in report.skipped],
        }
        click.echo(json.dumps(document, indent=2))
        return
    for entry in report.skipped:
        click.echo(
            f"skipped cache {entry.key} (org {entry.org}, pool {entry.pool}, volume {entry.volume}): in use",
            err=True,
        )
    count, size = len(report.removed), report.removed_bytes
    exact = f" ({size} bytes)" if size >= 1024 else ""
    in_use = f"; {len(report.skipped)} in use, kept" if report.skipped else ""
    click.echo(f"removed {count} cache{'' if count == 1 else 's'}, {describe_size(size)}{exact}{in_use}")
