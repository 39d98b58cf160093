"""``testhide-controlplane doctor``: what breaks a control plane in practice, one
line per check with the fix, and a non-zero exit on any failure. It changes
nothing: the store is opened without migrating, no file is written.

Checked, in order: the data dir (0700, ours, initialised; key files 0600), the
master key (present, and it opens every sealed file), the store (SQLite: quick
integrity check and schema version; PostgreSQL: the URL file 0600, reachable,
schema current, and its clock against ours), the CA and server certificates
(expiry, issuer, names), free disk, and the two listeners: answering (with the
data dir's CA) when a ``serve`` of this data dir runs, else free to bind."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testhide.common.findings import (
    Finding,
    exit_status,
    fail,
    free_space,
    ok,
    render,
    user_name,
    warn,
)
from testhide.common.tls import split_target
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey
from testhide.controlplane.commands.common import data_dir_option
from testhide.controlplane.commands.doctor_certs import certificate_findings
from testhide.controlplane.datadir import DATABASE_URL_ENV, DATABASE_URL_FILE, DataDir
from testhide.controlplane.errors import ControlPlaneError
from testhide.controlplane.hsm import KEYRING_FILE, PIN_ENV
from testhide.controlplane.store.migrations import MIGRATIONS

if TYPE_CHECKING:
    from testhide.controlplane.store.pgdriver import PgConnection

CLOCK_WARN_S = 1.0
CLOCK_FAIL_S = 30.0
"""Agent certificates are backdated 30 s: a replica further off issues ones another cannot accept yet."""
DISK_FAIL_BYTES = 256 * 1024**2
"""One workspace at its default cap."""
DISK_WARN_BYTES = 2 * 1024**3
NETWORK_TIMEOUT_S = 5.0
RESTORE_FIX = "restore the newest backup: testhide-controlplane restore --from BACKUP --data-dir NEWDIR"
SECRET_FILES = ("master.key", KEYRING_FILE, DATABASE_URL_FILE)
# Where to reach a listener bound to every address.
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


# ---------------------------------------------------------------- files


def data_dir_finding(directory: DataDir) -> Finding:
    name, path = "data dir", directory.path
    if not path.is_dir():
        return fail(name, f"{path} does not exist", f"testhide-controlplane init --data-dir {path}")
    info, me = path.stat(), os.geteuid()
    if info.st_uid != me:
        return fail(
            name,
            f"{path} is owned by {user_name(info.st_uid)}, this is {user_name(me)}",
            f"run the doctor as serve's user, or chown -R {user_name(me)} {path}",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        return fail(
            name,
            f"{path} is mode {stat.S_IMODE(info.st_mode):04o}: others can reach its keys and database",
            f"chmod 700 {path}",
        )
    return ok(name, f"{path}, mode 0700, owned by {user_name(me)}")


def state_finding(directory: DataDir) -> tuple[Finding, dict[str, Any] | None]:
    try:
        state = directory.require_initialised()
        store = "PostgreSQL" if state.get("store") == "postgresql" else "SQLite"
        finding = f"layout {state['layout_version']}, trust domain {state['trust_domain']}, {store} store"
    except (ControlPlaneError, OSError, ValueError, KeyError) as exc:
        return fail("state", str(exc), "testhide-controlplane init, or restore a backup into it"), None
    return ok("state", finding), state


def guarded(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """A check that could not look at what it checks fails with the reason, never a traceback."""
    try:
        return run()
    except (ControlPlaneError, OSError, ValueError, KeyError) as exc:
        return [fail(check, f"could not be checked: {exc}")]


def files_finding(directory: DataDir) -> Finding:
    """Keys and the database URL 0600 and everything ours; public files
    (certificates, state) may be readable: the 0700 directory guards them."""
    me, exposed, foreign = os.geteuid(), [], []
    for path in sorted(directory.path.rglob("*")):
        info = path.lstat()
        relative = path.relative_to(directory.path).as_posix()
        if info.st_uid != me:
            foreign.append(relative)
        secret = path.name in SECRET_FILES or path.name.endswith(".sealed")
        if secret and stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
            exposed.append(f"{relative} ({stat.S_IMODE(info.st_mode):04o})")
    if exposed:
        return fail(
            "files",
            f"readable by others: {', '.join(exposed[:5])}",
            f"chmod 600 those files in {directory.path}",
        )
    if foreign:
        return fail(
            "files",
            f"not owned by {user_name(me)}: {', '.join(foreign[:5])}",
            f"chown -R {user_name(me)} {directory.path}",
        )
    return ok("files", "keys and the database URL are 0600, every file is ours")


def master_key_finding(directory: DataDir) -> tuple[Finding, MasterKey | None]:
    name = "master key"
    in_hsm = directory.keyring_path.exists()
    from_env = bool(os.environ.get(MASTER_KEY_ENV))
    if not in_hsm and not from_env and not directory.master_key_path.exists():
        return fail(
            name,
            f"{directory.master_key_path} is missing and {MASTER_KEY_ENV} is not set: nothing sealed opens",
            f"restore master.key (0600) from where you keep it, or set {MASTER_KEY_ENV}",
        ), None
    try:
        master = directory.master_key()
    except ControlPlaneError as exc:
        fix = (
            f"make the HSM that {KEYRING_FILE}'s URI names reachable: its module, token, key label and PIN"
            f" (pin-source, or {PIN_ENV})"
            if in_hsm
            else f"chmod 600 {directory.master_key_path}"
        )
        return fail(name, str(exc), fix), None
    source = master.describe()
    sealed = directory.sealed_files()
    refused = []
    for relative in sealed:
        try:
            master.unseal((directory.path / relative).read_bytes(), relative.encode())
        except (ControlPlaneError, OSError) as exc:
            refused.append(f"{relative}: {exc}")
    if refused:
        return fail(
            name,
            f"from {source}, it does not open {len(refused)} of {len(sealed)} sealed files ({refused[0]})",
            "use the master key this data dir was sealed with; after an interrupted rotation,"
            " run 'testhide-controlplane master-key rotate' again",
        ), master
    finding = f"from {source}; it opens all {len(sealed)} sealed files (current key {master.current_id})"
    if len(master.key_ids) > 1:
        return warn(
            name,
            f"{finding}; the ring holds {len(master.key_ids)} keys: a rotation is under way or stopped",
            "testhide-controlplane master-key rotate --data-dir DIR finishes it",
        ), master
    return ok(name, finding), master


# ---------------------------------------------------------------- store


def sqlite_finding(db_path: Path) -> Finding:
    """Quick integrity check and schema version, on a connection that writes nothing."""
    name = "store"
    if not db_path.is_file():
        return fail(name, f"{db_path} is missing", RESTORE_FIX)
    if db_path.stat().st_size == 0:
        return fail(name, f"{db_path} is empty (0 bytes)", RESTORE_FIX)
    try:
        # mode=rw: a file that vanished meanwhile is not created.
        conn = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=rw", uri=True, timeout=NETWORK_TIMEOUT_S)
        try:
            conn.execute("PRAGMA query_only=ON")
            verdict = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return fail(name, f"SQLite {db_path}: {exc}", RESTORE_FIX)
    if verdict != ["ok"]:
        return fail(
            name,
            f"SQLite {db_path} fails its integrity check: {'; '.join(verdict[:3])}",
            "stop serve and restore the latest backup (testhide-controlplane restore)",
        )
    return schema_finding(f"SQLite {db_path}, integrity ok", applied, {v for v, _ in MIGRATIONS})


def schema_finding(described: str, applied: set[int], known: set[int]) -> Finding:
    name = "store"
    if applied - known:
        return fail(
            name,
            f"{described}; schema {max(applied)} comes from a newer testhide (this one knows {max(known)})",
            "run that version (upgrade this control plane), or restore a backup made before the upgrade",
        )
    missing = sorted(known - applied)
    if missing:
        return fail(
            name,
            f"{described}; schema {max(applied, default=0)} is behind (lacks versions {missing});"
            " every command but serve and migrate refuses it",
            "testhide-controlplane migrate (it writes a backup first), or start serve",
        )
    return ok(name, f"{described}, schema {max(known)} (current)")


async def postgres_findings(directory: DataDir) -> list[Finding]:
    """The URL file 0600, the database reachable and current, and its clock."""
    from testhide.controlplane.store.pg_migrations import PG_MIGRATIONS
    from testhide.controlplane.store.pgdriver import connect, with_connection

    name, url_file = "store", directory.path / DATABASE_URL_FILE
    if not os.environ.get(DATABASE_URL_ENV) and url_file.exists() and url_file.stat().st_mode & 0o077:
        return [
            fail(
                name,
                f"{url_file} holds the database password and is readable by others",
                f"chmod 600 {url_file}",
            )
        ]
    try:
        url = directory.database_url()
        parts = urlsplit(url)
        described = f"PostgreSQL {parts.hostname}:{parts.port or 5432}{parts.path}"
        async with asyncio.timeout(NETWORK_TIMEOUT_S * 2):
            driver = await connect(url, min_size=1, max_size=1)
        try:
            rows = await with_connection(driver, _schema_and_clock)
        finally:
            await driver.close()
    except Exception as exc:  # whatever refused us (address, password, database, TLS) is the finding
        fix = f"is PostgreSQL running and reachable? the URL is in {url_file} or {DATABASE_URL_ENV}"
        return [fail(name, f"cannot reach the database: {str(exc) or type(exc).__name__}", fix)]
    applied, (before, database_now, after) = rows
    if applied is None:
        return [fail(name, f"{described} has no testhide schema", "testhide-controlplane init --database …")]
    found = [schema_finding(described, applied, {v for v, _ in PG_MIGRATIONS})]
    return [*found, clock_finding(before, database_now, after)]


async def _schema_and_clock(conn: PgConnection) -> tuple[set[int] | None, tuple[float, datetime, float]]:
    applied = None
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    before = time.time()
    database_now = await conn.fetchval("SELECT clock_timestamp()")
    return applied, (before, database_now, time.time())


def clock_finding(before: float, database_now: datetime, after: float) -> Finding:
    skew = database_now.timestamp() - (before + after) / 2
    finding = (
        f"the database server's clock is {abs(skew):.2f} s {'ahead of' if skew > 0 else 'behind'} this host's"
        f" (±{(after - before) / 2:.2f} s)"
    )
    fix = "synchronise the clocks of this host and the database server (NTP: timedatectl set-ntp true)"
    if abs(skew) > CLOCK_FAIL_S:
        return fail("clock", finding, fix)
    if abs(skew) > CLOCK_WARN_S:
        return warn("clock", finding, fix)
    return ok("clock", finding)


# ---------------------------------------------------------------- disk and listeners


def disk_finding(directory: DataDir, on_postgres: bool) -> Finding:
    free = shutil.disk_usage(directory.path).free
    finding = f"{free_space(free)} free at {directory.path}"
    fix = f"free space on the filesystem of {directory.path}, or move the data dir to a larger one"
    if free < (16 * 1024**2 if on_postgres else DISK_FAIL_BYTES):
        return fail("disk", f"{finding}: writes will fail with 'disk is full'", fix)
    if not on_postgres and free < DISK_WARN_BYTES:
        return warn("disk", f"{finding} (logs, workspaces and artifacts are stored here)", fix)
    return ok("disk", finding)


def derived_agent_listen(listen: str) -> str:
    """serve's default: the API port + 1 on the same host."""
    try:
        host, port = split_target(listen)
    except ValueError:
        return listen  # its own line says what is wrong with it
    return f"{'[' + host + ']' if ':' in host else host}:{port + 1 if port else 0}"


def running_serves(directory: DataDir) -> list[int]:
    """Pids of live serves of this data dir, from their announcements (read only)."""
    pids = []
    for path in (directory.path / "run").glob("serve-*.json"):
        try:
            pid = int(json.loads(path.read_text())["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # alive, another user's
        except (OSError, ValueError, KeyError):
            continue
        pids.append(pid)
    return sorted(pids)


def _bind_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use by another process, and no serve of this data dir runs"
            return f"cannot bind: {exc.strerror or exc}"
    return None


def _tls_problem(host: str, port: int, bundle: bytes, name: str, client_auth: bool) -> str | None:
    """A TLS handshake that verifies the data dir's certificate; on the agent
    port the server must then close the connection: it requires a client certificate."""
    context = ssl.create_default_context(cadata=bundle.decode())
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            first = tls.recv(9)
    except ssl.SSLCertVerificationError as exc:
        return f"answers with another certificate than this data dir's ({exc.verify_message})"
    except (OSError, ssl.SSLError) as exc:
        return f"does not answer TLS: {getattr(exc, 'strerror', None) or exc}"
    if client_auth and first:
        return "answers without asking for a client certificate: not this data dir's agent port"
    return None


async def listener_finding(
    kind: str, listen: str, directory: DataDir, names: list[str], serves: list[int]
) -> Finding:
    check = f"{kind} {listen}"
    try:
        host, port = split_target(listen)
    except ValueError as exc:
        return fail(check, str(exc), "give HOST:PORT")
    if not serves:
        if port == 0:
            return ok(check, "port 0: chosen when serve starts")
        problem = await asyncio.to_thread(_bind_problem, host, port)
        if problem:
            return fail(check, problem, "stop what holds it (ss -ltnp shows which), or serve on another port")
        return ok(check, "free (no serve of this data dir runs)")
    connect_to = WILDCARDS.get(host, host)
    bundle = (directory.path / "ca.pem").read_bytes()
    agent_port = kind == "agent port"
    problem = await asyncio.to_thread(_tls_problem, connect_to, port, bundle, names[0], agent_port)
    if problem is None and not agent_port:
        problem = await _health_problem(
            f"{connect_to}:{port}" if ":" not in connect_to else f"[{connect_to}]:{port}", bundle, names[0]
        )
    pids = ", ".join(map(str, serves))
    if problem:
        return fail(
            check,
            f"serve runs (pid {pids}) but this address {problem}",
            "give the doctor serve's --listen and --agent-listen, or see serve's log",
        )
    what = "requires a client certificate" if agent_port else "health SERVING"
    return ok(check, f"serve (pid {pids}) answers with this data dir's certificate; {what}")


async def _health_problem(target: str, bundle: bytes, name: str) -> str | None:
    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(bundle), options=options
    ) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=NETWORK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            return f"fails the gRPC health check: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return "is not serving (stopping?)"
    return None


# ---------------------------------------------------------------- all of it


async def diagnose(data_dir: Path, listen: str, agent_listen: str | None) -> list[Finding]:
    directory = DataDir(data_dir)
    findings = [data_dir_finding(directory)]
    if not directory.path.is_dir():
        return findings
    state_check, state = state_finding(directory)
    findings.append(state_check)
    if state is None:
        return findings
    findings += guarded("files", lambda: [files_finding(directory)])
    master_finding, master = master_key_finding(directory)
    findings.append(master_finding)
    on_postgres = state.get("store") == "postgresql"
    if on_postgres:
        findings += await postgres_findings(directory)
    else:
        findings.append(await asyncio.to_thread(sqlite_finding, directory.db_path))
    now = datetime.now(UTC)
    findings += guarded("certificates", lambda: certificate_findings(directory, state, master, now))
    findings += guarded("disk", lambda: [disk_finding(directory, on_postgres)])
    serves = running_serves(directory)
    names = [str(n) for n in state.get("server_names") or ["localhost"]]
    if agent_listen is None:
        agent_listen = derived_agent_listen(listen)
    for kind, address in (("API port", listen), ("agent port", agent_listen)):
        findings.append(await listener_finding(kind, address, directory, names, serves))
    return findings


@click.command()
@data_dir_option
@click.option(
    "--listen",
    default="127.0.0.1:7443",
    show_default=True,
    envvar="TESTHIDE_LISTEN",
    show_envvar=True,
    help="serve's --listen (the API port).",
)
@click.option(
    "--agent-listen",
    default=None,
    envvar="TESTHIDE_AGENT_LISTEN",
    show_envvar=True,
    help="serve's --agent-listen [API port + 1].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
def doctor(data_dir: Path, listen: str, agent_listen: str | None, as_json: bool, strict: bool) -> None:
    """Check what breaks a control plane in practice: the data dir and its
    permissions, the master key, the store (never migrated), certificates,
    disk, the listeners' ports, the database's clock. One line per check with
    the fix; exit 1 if any check fails (with --strict, also if any warns)."""
    findings = asyncio.run(diagnose(data_dir, listen, agent_listen))
    click.echo(render(findings, as_json, strict))
    raise SystemExit(exit_status(findings, strict))
