"""The SQLite backend implements the whole Store protocol (what a PostgreSQL
backend must implement too): every protocol method exists with the same
parameters."""

from __future__ import annotations

import inspect

from testhide.controlplane.store.base import Store
from testhide.controlplane.store.sqlite import SqliteStore


def test_sqlite_store_implements_every_protocol_method() -> None:
    wanted = {name for name, member in vars(Store).items() if inspect.iscoroutinefunction(member)}
    assert len(wanted) > 50
    for name in sorted(wanted):
        implementation = getattr(SqliteStore, name, None)
        assert implementation is not None, name
        assert list(inspect.signature(implementation).parameters) == list(
            inspect.signature(getattr(Store, name)).parameters
        ), name
