"""What the SQLite backend's parts share: timestamps, job specs and isolation as text."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from testhide.controlplane.jobs.model import Isolation, JobSpec, Resources

T = TypeVar("T")


class SqliteParts:
    """Base of the store's parts (mixins): SqliteStore provides these."""

    if TYPE_CHECKING:

        async def _tx(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T: ...
        async def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]: ...


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _spec_to_json(spec: JobSpec) -> str:
    data = asdict(spec)
    data["timeout"] = spec.timeout.total_seconds()
    data.update(_spec_to_json_lists(spec))
    return json.dumps(data, sort_keys=True)


def _spec_to_json_lists(spec: JobSpec) -> dict[str, object]:
    return {k: list(getattr(spec, k)) for k in ("command", "secrets", "artifact_globs", "junit_globs")}


def _spec_from_json(text: str) -> JobSpec:
    data = json.loads(text)
    data["timeout"] = timedelta(seconds=data["timeout"])
    for key in ("command", "secrets", "artifact_globs", "junit_globs"):
        data[key] = tuple(data.get(key, ()))
    data["resources"] = Resources(**data["resources"])
    return JobSpec(**data)


_ISOLATION_FIELDS = {f.name: f for f in fields(Isolation)}


def _isolation_to_json(isolation: Isolation | None) -> str | None:
    return None if isolation is None else json.dumps(asdict(isolation), sort_keys=True)


def _isolation_from_json(text: str | None) -> Isolation | None:
    """Keys this version does not know are left out, so a newer agent's facts still read."""
    if not text:
        return None
    data = {k: v for k, v in json.loads(text).items() if k in _ISOLATION_FIELDS}
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return Isolation(**data)
