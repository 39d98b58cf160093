"""``migrate-store``: move a SQLite control plane into an empty PostgreSQL
database, and the data dir with it.

    1. refuse   unless the data dir is on SQLite and no ``serve`` runs on it
                (``DIR/run/serve-*.json``; a running serve would go on writing
                to SQLite during the copy), and the URL is a PostgreSQL one
    2. copy     every table from one read-only snapshot of ``testhide.db`` in
                one PostgreSQL transaction (``store.pg_copy``), into a database
                whose testhide tables are all empty; row counts are checked
                before it commits
    3. verify   the row counts again, and the audit chain as PostgreSQL gives
                it back, under the data dir's audit key, ending at SQLite's
                head; a failure empties the database again
    4. record   ``store_migrated`` in the new store's audit log
    5. switch   ``DIR/database.url`` (0600), then ``state.json`` "store":
                "postgresql", each written atomically

Nothing is re-encrypted: the data keys stay wrapped by the same master key, the
CA and every sealed file stay where they are, so enrolled agents, API keys,
sessions and users keep working. ``testhide.db`` is left exactly as it was;
the operator deletes it once satisfied."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import click

from testhide.common.files import atomic_write
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import AuditChain, Auditor
from testhide.controlplane.commands.common import data_dir_option, print_rows, run
from testhide.controlplane.datadir import DATABASE_URL_ENV, DATABASE_URL_FILE, DataDir
from testhide.controlplane.errors import (
    ConfigError,
    ControlPlaneError,
    DataDirError,
    FailedPrecondition,
    IntegrityError,
    StorageUnavailable,
)

if TYPE_CHECKING:  # asyncpg is imported only by commands that use PostgreSQL
    from testhide.controlplane.store.pg_copy import SqliteSnapshot
    from testhide.controlplane.store.postgres import PgStore


@dataclass(frozen=True)
class Target:
    """Where the store goes, as it may be shown and recorded: no user, no password."""

    host: str
    port: int
    database: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.database}"


def target_of(url: str) -> Target:
    """The URL's host, port and database; a URL that is not PostgreSQL's is refused."""
    from testhide.controlplane.store.pgdriver import split_url

    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            "the target must be a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB);"
            " nothing was changed"
        )
    dsn, _ = split_url(url)
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    try:
        port = parts.port or int(query.get("port", "5432"))
    except ValueError as exc:
        raise ConfigError(f"the database URL has an invalid port ({exc}); nothing was changed") from None
    database = parts.path.lstrip("/") or query.get("dbname", "") or parts.username or ""
    return Target(parts.hostname or query.get("host", "localhost"), port, database)


@dataclass(frozen=True)
class Migration:
    data_dir: str
    target: Target
    tables: dict[str, int]
    audit_entries: int
    """In PostgreSQL, ``store_migrated`` included."""
    seconds: float

    def as_json(self) -> dict[str, Any]:
        """The `--json` summary: the duration as ``duration_s``, as every `--json` names one."""
        document = asdict(self)
        document["duration_s"] = document.pop("seconds")
        return {**document, "rows": sum(self.tables.values())}


def refuse_unless_idle_sqlite(directory: DataDir) -> None:
    from testhide.controlplane.masterkey import ring_holders

    state = directory.require_initialised()
    if state.get("store", "sqlite") != "sqlite":
        raise DataDirError(f"data dir {directory.path} already uses {state['store']}: nothing to migrate")
    if not directory.db_path.is_file():
        raise DataDirError(f"data dir {directory.path} has no {directory.db_path.name}: nothing to migrate")
    holders = ring_holders(directory)  # announcements of dead serves are pruned
    if holders:
        pids = ", ".join(str(h.pid) for h in holders)
        raise FailedPrecondition(
            f"the control plane is running on {directory.path} (serve pid {pids}); stop it first: it would"
            " go on writing to SQLite during the copy. Nothing was changed."
        )


async def migrate_store(
    directory: DataDir, url: str, actor: str, progress: Callable[[str, int, int], None]
) -> Migration:
    """Steps 1-5 of the module docstring."""
    from testhide.controlplane.store import pg_copy

    started = time.monotonic()
    refuse_unless_idle_sqlite(directory)
    target = target_of(url)
    master = directory.master_key()
    snapshot = await pg_copy.SqliteSnapshot.open(directory.db_path)
    try:
        store = await _open_target(url, target)
        try:
            counts = await pg_copy.copy_store(snapshot, store, progress)
            try:
                key = await _verify(directory, master, snapshot, store, counts)
                await _refuse_written_meanwhile(directory, snapshot)
                entry = await Auditor(store, key).record(
                    "store_migrated",
                    actor,
                    target=str(target),
                    database_host=target.host,
                    database_port=target.port,
                    database_name=target.database,
                    counts=counts,
                    source=str(directory.db_path),
                )
                _switch(directory, url)
            except BaseException:
                await pg_copy.empty_target(store)  # the data dir still says sqlite: undo the copy
                raise
        finally:
            await store.close()
    finally:
        await snapshot.close()
    return Migration(str(directory.path), target, counts, entry.seq, time.monotonic() - started)


async def _refuse_written_meanwhile(directory: DataDir, snapshot: SqliteSnapshot) -> None:
    """A serve started, or an operator command ran, during the copy: what it wrote is not in it."""
    refuse_unless_idle_sqlite(directory)
    if await snapshot.written_since_opened():
        raise FailedPrecondition(
            f"{directory.db_path} was written to during the copy (by another command or process), so the"
            " copy is not complete; the database was emptied again. Run migrate-store again once nothing"
            " else uses the data dir."
        )


async def _open_target(url: str, target: Target) -> PgStore:
    """The PostgreSQL store, schema migrated; a database that cannot be reached or
    used is refused with what PostgreSQL said (never the URL: it may hold a password)."""
    from testhide.controlplane.store.postgres import PgStore

    try:
        return await PgStore.open(url, pool_size=2)
    except StorageUnavailable as exc:
        cause = exc.__cause__ or exc
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise StorageUnavailable(
            f"cannot reach the PostgreSQL database at {target} ({detail}); nothing was changed"
        ) from exc
    except ControlPlaneError:
        raise
    except Exception as exc:
        if getattr(exc, "sqlstate", None) is None:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FailedPrecondition(
            f"cannot use the PostgreSQL database at {target} ({detail}); nothing was changed"
        ) from exc


async def _verify(
    directory: DataDir, master: MasterKey, snapshot: SqliteSnapshot, store: PgStore, counts: dict[str, int]
) -> bytes:
    """Row counts, and the audit chain as the PostgreSQL store reads it; returns the audit key."""
    from testhide.controlplane.store import pg_copy

    stored = await pg_copy.stored_counts(store)
    if stored != counts:
        differ = ", ".join(f"{t} {counts[t]} -> {stored[t]}" for t in counts if stored[t] != counts[t])
        raise IntegrityError(f"row counts differ after the copy ({differ}); the database was emptied again")
    key = await directory.audit_key(master, store)
    chain = AuditChain(key)
    entries, head = await store.read_audit()
    source_entries, source_head = await snapshot.read_audit()
    source_problems = chain.verify(source_entries, source_head)
    if source_problems:
        raise IntegrityError(
            f"the SQLite audit log is already damaged ({'; '.join(source_problems[:3])}; `audit verify`"
            " lists all): refusing to migrate it; the database was emptied again"
        )
    problems = chain.verify(entries, head)
    if problems or head != source_head:
        detail = "; ".join(problems[:3]) or "its head differs from SQLite's"
        raise IntegrityError(
            f"the audit chain did not survive the copy ({detail}); the database was emptied again"
        )
    return key


def _switch(directory: DataDir, url: str) -> None:
    """URL first: while state.json still says sqlite, nothing reads it (and a failure removes it)."""
    url_file = directory.path / DATABASE_URL_FILE
    atomic_write(url_file, url.encode() + b"\n", 0o600)
    try:
        state = directory.require_initialised()
        state["store"] = "postgresql"
        directory.write_state(state)
    except BaseException:
        url_file.unlink(missing_ok=True)
        raise


# the command ------------------------------------------------------------------------------------


@click.command("migrate-store")
@data_dir_option
@click.option(
    "--to",
    "url",
    metavar="URL",
    envvar=DATABASE_URL_ENV,
    show_envvar=True,
    help="The empty PostgreSQL database (postgresql://USER:PASSWORD@HOST:PORT/DB); prefer the"
    " environment variable or --to-file for a password.",
)
@click.option(
    "--to-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the PostgreSQL URL from this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def migrate_store_command(data_dir: Path, url: str | None, to_file: Path | None, as_json: bool) -> None:
    """Copy a SQLite control plane (jobs, logs, results, artifacts, secrets,
    users, keys, agents, audit chain) into an empty PostgreSQL database, verify
    row counts and the audit chain, and switch the data dir to it.

    Stop serve first. testhide.db is left as it was; delete it once satisfied.
    Enrolled agents, API keys and sessions keep working."""
    source = click.get_current_context().get_parameter_source("url")
    if to_file is not None:
        if url and source == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("give --to or --to-file, not both")
        url = to_file.read_text()
    url = (url or "").strip()
    if not url:
        raise click.UsageError(f"give the PostgreSQL URL with --to, --to-file or {DATABASE_URL_ENV}")
    migration = run(migrate_store(DataDir(data_dir), url, f"operator:{getpass.getuser()}", _Progress()))
    if as_json:
        click.echo(json.dumps(migration.as_json(), indent=2))
        return
    rows = [{"table": t, "rows": str(n)} for t, n in migration.tables.items()]
    print_rows(rows, False, ["table", "rows"])
    total = sum(migration.tables.values())
    db = Path(migration.data_dir) / "testhide.db"
    for line in (
        f"copied {total} rows into PostgreSQL at {migration.target} in {migration.seconds:.1f}s;"
        " row counts match",
        f"audit chain intact in PostgreSQL: {migration.audit_entries} entries (store_migrated is the last)",
        f"data dir {migration.data_dir} now uses PostgreSQL ({DATABASE_URL_FILE}, 0600);"
        " start serve as before",
        f"{db} was left as it was: delete it (and any {db.name}-wal, {db.name}-shm) once satisfied",
    ):
        click.echo(line, err=True)


class _Progress:
    """A line on stderr every few seconds while a large table copies."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._every_s = every_s
        self._last = time.monotonic()

    def __call__(self, table: str, copied: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s and copied < total:
            self._last = now
            click.echo(f"copying {table}: {copied} of {total} rows", err=True)
