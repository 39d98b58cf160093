"""Isolation facts: what the container engine applied to a job's container, read back by
the agent from the live container (not what was asked for). One definition for the three
programs: the agent reads and sends them, the control plane stores and shows them, the CLI
prints them. A field added here travels wherever `fields_of` and `asdict` carry them; the
control plane's store ignores stored keys it does not know."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Isolation:
    runtime: str = ""
    network_mode: str = ""
    interfaces: tuple[str, ...] = ()
    """Network interfaces inside the container (only ``lo`` when the promise holds); empty
    when they could not be observed (the job had already exited, or this host's /proc is
    not the engine's)."""
    user: str = ""
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    no_new_privileges: bool = False
    seccomp: str = ""
    read_only_root: bool = False
    pids_limit: int = 0
    memory_bytes: int = 0
    cpus: float = 0.0
    image_id: str = ""
    image_digest: str = ""
    mounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceIsolation:
    """One of a job's services: its name (as the job's spec gives it) and its container's facts."""

    name: str
    isolation: Isolation


def fields_of(source: Any) -> Isolation:
    """The facts from anything that has them as attributes of the same names (the wire
    message), sequences as tuples."""
    values: dict[str, Any] = {}
    for field in fields(Isolation):
        value = getattr(source, field.name)
        values[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    return Isolation(**values)
