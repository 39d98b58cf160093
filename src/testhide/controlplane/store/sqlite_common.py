"""What the SQLite backend's parts share: timestamps, job specs, isolation and fetch steps as text."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from testhide.controlplane.jobs.model import (
    EgressRequest,
    FetchStep,
    Isolation,
    JobSpec,
    Resources,
    ServiceIsolation,
    ServiceSpec,
)

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


_SPEC_LISTS = ("command", "secrets", "artifact_globs", "junit_globs", "fetch_secrets")


def _spec_to_json_lists(spec: JobSpec) -> dict[str, object]:
    lists: dict[str, object] = {k: list(getattr(spec, k)) for k in _SPEC_LISTS}
    lists["services"] = [
        {**asdict(s), "command": list(s.command), "tmpfs": list(s.tmpfs)} for s in spec.services
    ]
    return lists


def _spec_from_json(text: str) -> JobSpec:
    """A spec stored by any version: fields added since take their defaults."""
    data = json.loads(text)
    data["timeout"] = timedelta(seconds=data["timeout"])
    for key in _SPEC_LISTS:
        data[key] = tuple(data.get(key, ()))
    data["resources"] = Resources(**data["resources"])
    data["services"] = tuple(
        ServiceSpec(s["name"], s["image"], tuple(s["command"]), dict(s["env"]), tuple(s["tmpfs"]))
        for s in data.get("services", ())
    )
    return JobSpec(**data)


_ISOLATION_FIELDS = {f.name: f for f in fields(Isolation)}


def _isolation_to_json(isolation: Isolation | None) -> str | None:
    return None if isolation is None else json.dumps(asdict(isolation), sort_keys=True)


def _isolation_from_json(text: str | None) -> Isolation | None:
    """Keys this version does not know are left out, so a newer agent's facts still read."""
    if not text:
        return None
    return _isolation_from_data(json.loads(text))


def _isolation_from_data(stored: dict[str, Any]) -> Isolation:
    data = {k: v for k, v in stored.items() if k in _ISOLATION_FIELDS}
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return Isolation(**data)


def _services_isolation_to_json(services: tuple[ServiceIsolation, ...]) -> str:
    return json.dumps([{"name": s.name, "isolation": asdict(s.isolation)} for s in services], sort_keys=True)


def _services_isolation_from_json(text: str | None) -> tuple[ServiceIsolation, ...]:
    if not text:
        return ()
    return tuple(ServiceIsolation(s["name"], _isolation_from_data(s["isolation"])) for s in json.loads(text))


def _fetch_to_json(fetch: FetchStep) -> str:
    data = asdict(fetch)
    data["requests"] = [{**asdict(r), "at": r.at.isoformat()} for r in fetch.requests]
    return json.dumps(data, sort_keys=True)


def _fetch_from_json(text: str | None) -> FetchStep | None:
    if not text:
        return None
    data = json.loads(text)
    requests = tuple(
        EgressRequest(**{**r, "at": datetime.fromisoformat(r["at"])}) for r in data.pop("requests", ())
    )
    isolation = data.pop("isolation", None)
    facts = _isolation_from_data(isolation) if isolation is not None else None
    return FetchStep(**data, requests=requests, isolation=facts)
