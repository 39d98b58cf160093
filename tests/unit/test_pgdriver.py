"""What the PostgreSQL drivers' errors mean to the store: "the database cannot be reached"
(StorageUnavailable, the caller retries) or not (the error stays as it is), whichever driver
raised it, and whether asyncpg was imported at all (a SQLite control plane never imports it)."""

from __future__ import annotations

import asyncpg

from testhide.controlplane.errors import NotFound, StorageUnavailable
from testhide.controlplane.store.pgdriver import unavailable


class SqlError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def test_a_lost_connection_is_unavailable_whichever_driver_said_so() -> None:
    for exc in (
        ConnectionRefusedError("refused"),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        SqlError("08006"),  # connection failure
        SqlError("57P01"),  # admin shutdown
        SqlError("53300"),  # too many connections
    ):
        mapped = unavailable(exc)
        assert isinstance(mapped, StorageUnavailable), exc
        assert "the control plane's database is unavailable" in str(mapped)


def test_other_errors_are_left_as_they_are() -> None:
    for exc in (NotFound("pool p not found"), ValueError("bad"), SqlError("23505")):
        assert unavailable(exc) is None, exc
