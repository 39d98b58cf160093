"""The PostgreSQL connection behind ``PgStore``: a pool, transactions that are
retried on serialization failures and deadlocks, and one error for "the
database cannot be reached". SQL is written once, with asyncpg's ``$1``
placeholders; two drivers run it:

- ``asyncpg`` (the default and the only runtime dependency): binary protocol,
  prepared-statement cache per connection;
- ``psycopg`` 3 (``psycopg[binary]`` and ``psycopg-pool``, installed with the
  test extra): the same statements with ``$n`` rewritten to named parameters.
  It exists so that the scheduler benchmark can compare the two on the same
  store (README: "PostgreSQL driver"); choose it with ``?driver=psycopg`` in
  the URL.

Every connection runs in UTC, so timestamps come back as aware UTC datetimes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from testhide.controlplane.errors import ConfigError, StorageUnavailable

if TYPE_CHECKING:
    import asyncpg  # imported when a PostgreSQL store opens: 3.6 MiB a SQLite control plane does without

T = TypeVar("T")

RETRIED_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
"""A transaction that lost a race with another replica: run again from the start."""
TRANSACTION_ATTEMPTS = 8


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


class PgConnection(Protocol):
    """One connection, inside a transaction (``PgDriver.transaction``) or in
    autocommit mode (``PgDriver.connection``)."""

    async def fetch(self, sql: str, *args: object) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: object) -> Row | None: ...
    async def fetchval(self, sql: str, *args: object) -> Any: ...
    async def execute(self, sql: str, *args: object) -> int:
        """Runs ``sql``; returns the number of rows it affected."""
        ...

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None: ...


class PgDriver(Protocol):
    name: str

    def connection(self) -> AbstractAsyncContextManager[PgConnection]: ...
    def raw_transaction(self) -> AbstractAsyncContextManager[PgConnection]: ...
    async def close(self) -> None: ...
    async def listen(
        self, channel: str, on_message: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        """LISTEN on ``channel`` on a connection of its own (outside the pool) and
        pass each payload to ``on_message``; ``on_listening`` once it listens.
        Returns, or raises, when that connection is lost: the caller reconnects
        and treats everything in between as missed."""
        ...


def unavailable(exc: BaseException) -> StorageUnavailable | None:
    """``exc`` as "the database cannot be reached" when that is what it means."""
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    driver = sys.modules.get("asyncpg")  # not imported: no asyncpg error to recognise
    lost = (driver.InterfaceError, driver.PostgresConnectionError) if driver is not None else ()
    if (
        isinstance(exc, (OSError, TimeoutError, *lost))
        or sqlstate.startswith(("08", "57P", "53"))
        or type(exc).__name__ in ("OperationalError", "PoolTimeout", "PoolClosed")
    ):
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageUnavailable(f"the control plane's database is unavailable ({detail}); try again")
    return None


async def in_transaction(driver: PgDriver, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
    """``fn`` in one transaction (READ COMMITTED), run again from the start when
    PostgreSQL aborts it for a serialization failure or a deadlock."""
    for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
        try:
            async with driver.raw_transaction() as conn:
                return await fn(conn)
        except Exception as exc:
            if str(getattr(exc, "sqlstate", "")) in RETRIED_SQLSTATES and attempt < TRANSACTION_ATTEMPTS:
                await asyncio.sleep(0.001 * 2**attempt)
                continue
            mapped = unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover


async def with_connection(driver: PgDriver, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
    """``fn`` on one autocommit connection (each statement its own transaction)."""
    try:
        async with driver.connection() as conn:
            return await fn(conn)
    except Exception as exc:
        mapped = unavailable(exc)
        if mapped is not None:
            raise mapped from exc
        raise


def split_url(url: str) -> tuple[str, str]:
    """The URL without testhide's own ``driver=`` parameter, and that driver."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("the database URL must start with postgresql:// (or be a SQLite data dir)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    drivers = [v for k, v in query if k == "driver"]
    driver = drivers[-1] if drivers else "asyncpg"
    if driver not in ("asyncpg", "psycopg"):
        raise ConfigError(f"unknown PostgreSQL driver {driver!r} (asyncpg or psycopg)")
    rest = urlencode([(k, v) for k, v in query if k != "driver"])
    return urlunsplit(parts._replace(query=rest)), driver


async def connect(url: str, min_size: int = 1, max_size: int = 10) -> PgDriver:
    dsn, name = split_url(url)
    try:
        if name == "psycopg":
            return await _PsycopgDriver.create(dsn, min_size, max_size)
        return await _AsyncpgDriver.create(dsn, min_size, max_size)
    except Exception as exc:
        mapped = unavailable(exc)
        if mapped is not None:
            raise mapped from exc
        raise


# asyncpg -------------------------------------------------------------------------------


class _AsyncpgConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        return list(await self._conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        row: Row | None = await self._conn.fetchrow(sql, *args)
        return row

    async def fetchval(self, sql: str, *args: object) -> Any:
        return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: object) -> int:
        status: str = await self._conn.execute(sql, *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        await self._conn.executemany(sql, list(args))


_SERVER_SETTINGS = {"timezone": "UTC", "application_name": "testhide"}


async def _keep_session(_: object) -> None:
    """No reset query when a connection goes back to the pool: the store changes no
    session state (settings come with the connection; transactions end themselves),
    and the default (RESET ALL, UNLISTEN *, …) is a round trip per transaction
    (15 transactions per job instead of 7.5 on the scheduler benchmark)."""


class _AsyncpgDriver:
    name = "asyncpg"

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    @classmethod
    async def create(cls, dsn: str, min_size: int, max_size: int) -> _AsyncpgDriver:
        import asyncpg

        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=_SERVER_SETTINGS,
            timeout=10,
            command_timeout=60,
            reset=_keep_session,
        )
        return cls(pool, dsn)

    async def listen(
        self, channel: str, on_message: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, server_settings=_SERVER_SETTINGS, timeout=10)
        lost = asyncio.get_running_loop().create_future()

        def terminated(_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        try:
            conn.add_termination_listener(terminated)
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_message(payload))
            on_listening()
            await lost
        finally:
            conn.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PgConnection]:
        async with self._pool.acquire() as conn:
            yield _AsyncpgConnection(conn)

    @asynccontextmanager
    async def raw_transaction(self) -> AsyncIterator[PgConnection]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _AsyncpgConnection(conn)

    async def close(self) -> None:
        await self._pool.close()


# psycopg 3 ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=1024)
def psycopg_sql(sql: str) -> str:
    """``$1`` placeholders as psycopg's named ones (``%(p1)s``); a literal ``%`` doubled."""
    return _PLACEHOLDER.sub(r"%(p\1)s", sql.replace("%", "%%"))


def _params(args: Sequence[object]) -> dict[str, object]:
    return {f"p{i}": value for i, value in enumerate(args, start=1)}


class _PsycopgConnection:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        cursor = await self._conn.execute(psycopg_sql(sql), _params(args))
        return list(await cursor.fetchall()) if cursor.description else []

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        cursor = await self._conn.execute(psycopg_sql(sql), _params(args))
        row: Row | None = await cursor.fetchone() if cursor.description else None
        return row

    async def fetchval(self, sql: str, *args: object) -> Any:
        cursor = await self._conn.execute(psycopg_sql(sql), _params(args))
        row = await cursor.fetchone() if cursor.description else None
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql: str, *args: object) -> int:
        cursor = await self._conn.execute(psycopg_sql(sql), _params(args))
        return max(int(cursor.rowcount), 0)

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        async with self._conn.cursor() as cursor:
            await cursor.executemany(psycopg_sql(sql), [_params(a) for a in args])


class _PsycopgDriver:
    name = "psycopg"

    def __init__(self, pool: Any, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    async def listen(
        self, channel: str, on_message: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        import psycopg  # the optional driver

        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            await conn.execute(f'LISTEN "{channel}"')
            on_listening()
            async for notification in conn.notifies():
                on_message(notification.payload)

    @classmethod
    async def create(cls, dsn: str, min_size: int, max_size: int) -> _PsycopgDriver:
        try:
            from psycopg.rows import dict_row  # the optional driver
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise ConfigError("driver=psycopg needs psycopg[binary] and psycopg-pool installed") from exc
        pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": dict_row, "options": "-c timezone=UTC"},
            timeout=10,
            open=False,
        )
        await pool.open(wait=True, timeout=10)
        return cls(pool, dsn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PgConnection]:
        try:
            async with self._pool.connection() as conn:
                yield _PsycopgConnection(conn)
        except Exception as exc:
            await self._after(exc)
            raise

    @asynccontextmanager
    async def raw_transaction(self) -> AsyncIterator[PgConnection]:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield _PsycopgConnection(conn)
        except Exception as exc:
            await self._after(exc)
            raise

    async def _after(self, exc: Exception) -> None:
        """One pooled connection found dead: test the idle others now, as asyncpg's
        pool does on its own, so the next request does not find another one."""
        if unavailable(exc) is not None:
            with contextlib.suppress(Exception):
                await self._pool.check()

    async def close(self) -> None:
        await self._pool.close()
