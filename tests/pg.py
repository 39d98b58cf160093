"""PostgreSQL for the tests: the throwaway cluster ``scripts/postgres`` starts
(its superuser URL in TESTHIDE_TEST_DATABASE_URL), and a fresh database per
test, dropped afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.harness import unavailable

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
