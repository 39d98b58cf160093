"""PostgreSQL for the tests: the throwaway cluster ``scripts/postgres`` starts
(its superuser URL in TESTHIDE_TEST_DATABASE_URL), and a fresh database per
test, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.harness import REPO, unavailable

URL_ENV = "TESTHIDE_TEST_DATABASE_URL"


def server_url() -> str:
    url = os.environ.get(URL_ENV, "")
    if not url:
        unavailable(f"PostgreSQL not configured: {URL_ENV} is unset (scripts/test starts a cluster)")
    return url


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database on the test cluster; dropped on exit
    (also when connections to it are still open)."""
    url = server_url()
    name = f"t_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL at {URL_ENV} not reachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (``scripts/postgres`` with a
    state dir of its own), for tests that stop and start the server."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.url = ""

    async def _script(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "postgres"),
            *args,
            env={**os.environ, "TESTHIDE_STATE_DIR": str(self.state_dir)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            unavailable(f"scripts/postgres {' '.join(args)} failed: {err.decode(errors='replace')[-500:]}")
        return out.decode().strip()

    async def start(self) -> None:
        """Starts the server, or resumes it after ``pause`` (same port, same data)."""
        await self._script("start")
        self.url = await self._script("url")

    async def pause(self) -> None:
        """Stops the server (a fast shutdown: sessions are cut), keeping its data."""
        await self._script("pause")

    async def remove(self) -> None:
        await self._script("stop")


@asynccontextmanager
async def private_cluster() -> AsyncIterator[PrivateCluster]:
    if shutil.which("runuser") is None or os.geteuid() != 0:
        unavailable("a private PostgreSQL cluster needs root (it runs as the postgres user)")
    cluster = PrivateCluster(Path(tempfile.mkdtemp(prefix="testhide-pg-")))
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.remove()
        shutil.rmtree(cluster.state_dir, ignore_errors=True)
