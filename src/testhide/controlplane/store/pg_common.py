"""What the PostgreSQL backend's parts share: the transaction runner they are
given by ``PgStore`` and the job-spec encoding (the same JSON as SQLite's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from testhide.controlplane.store.pgdriver import PgConnection, Row
from testhide.controlplane.store.sqlite_common import (
    _fetch_from_json,
    _fetch_to_json,
    _isolation_from_json,
    _isolation_to_json,
    _services_isolation_from_json,
    _services_isolation_to_json,
    _spec_from_json,
    _spec_to_json,
)

T = TypeVar("T")

__all__ = [
    "PgConnection",
    "PgParts",
    "Row",
    "fetch_from_json",
    "fetch_to_json",
    "isolation_from_json",
    "isolation_to_json",
    "services_isolation_from_json",
    "services_isolation_to_json",
    "spec_from_json",
    "spec_to_json",
]

spec_to_json = _spec_to_json
spec_from_json = _spec_from_json
isolation_to_json = _isolation_to_json
isolation_from_json = _isolation_from_json
fetch_to_json = _fetch_to_json
fetch_from_json = _fetch_from_json
services_isolation_to_json = _services_isolation_to_json
services_isolation_from_json = _services_isolation_from_json


class PgParts:
    """Base of the store's parts (mixins): PgStore provides these.

    ``_tx(fn)`` runs ``async fn(conn)`` in one READ COMMITTED transaction, again
    from the start if PostgreSQL aborts it for a serialization failure or a
    deadlock (so ``fn`` must not have effects outside the database);
    ``_read(fn)`` runs it on an autocommit connection; ``_fetch`` is one query.
    A database that cannot be reached raises ``StorageUnavailable``."""

    if TYPE_CHECKING:

        async def _tx(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T: ...
        async def _read(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T: ...
        async def _fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def _snapshot(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
        """``fn``'s reads in one snapshot (REPEATABLE READ, read only: never aborted for a race)."""

        async def run(c: PgConnection) -> T:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await fn(c)

        return await self._tx(run)
