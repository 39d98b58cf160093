"""The Docker side of the agent's caches (``caches.py``): the volumes, their
labels, sizes and removal. Blocking docker-py calls: run them in a worker
thread (``engine``).

A cache's volume is labeled ``dev.testhide.cache=1``, with its org, pool and
key, and with the agent that owns it; a lookup compares all of them, so a
cache never crosses orgs or agents. Its root is the job user's, mode 0700:
a tiny imported image holding only that directory is mounted over the fresh
volume in a container created and removed at once, and Docker copies the
ownership and mode onto the volume (as for the job's workspace). Containers
then mount it with ``no_copy``, so that their image cannot undo that.

Sizes come from the engine's disk-usage report. A volume driver that reports
none (-1) is measured by streaming the volume as a tar and counting its bytes:
an upper bound (tar headers and padding count too) that errs towards evicting."""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import docker
import docker.errors
import structlog
from docker.models.volumes import Volume
from docker.types import Mount

from testhide.agent.runtime.docker import OWNER_LABEL, import_if_missing, owned_directory_tar

log = structlog.get_logger("testhide.agent.caches")

CACHE_LABEL = "dev.testhide.cache"
ORG_LABEL = "dev.testhide.cache.org"
POOL_LABEL = "dev.testhide.cache.pool"
KEY_LABEL = "dev.testhide.cache.key"
CACHE_MOUNT = "/cache"
VOLUME_PREFIX = "testhide-cache-"
_KEY = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")

Identity = tuple[str, str, str]
"""(org, pool, key)"""


def check_key(key: str) -> str:
    """``key`` if it is 1 to 128 of ``A-Z a-z 0-9 . _ -``; ValueError otherwise."""
    if not _KEY.match(key):
        raise ValueError(f"invalid cache key {key[:40]!r}: use 1 to 128 letters, digits, '.', '_' or '-'")
    return key


def volume_name(org: str, pool: str, key: str) -> str:
    """``testhide-cache-<24 hex of the identity's hash>-<8 random hex>``: the same
    prefix for one identity, a new volume each time one is filled."""
    digest = hashlib.sha256(f"{org}\0{pool}\0{key}".encode()).hexdigest()[:24]
    return f"{VOLUME_PREFIX}{digest}-{secrets.token_hex(4)}"


def cache_init_image(user: str) -> str:
    uid, _, gid = user.partition(":")
    return f"testhide/cache-init:{uid}-{gid or uid}"


def cache_init_tar(user: str) -> bytes:
    """An image holding only ``cache/``, the job user's, mode 0700."""
    return owned_directory_tar("cache", user, 0o700)


@dataclass(frozen=True)
class CacheEntry:
    org: str
    pool: str
    key: str
    volume: str
    size_bytes: int
    created_at: datetime
    last_used_at: datetime

    @property
    def identity(self) -> Identity:
        return (self.org, self.pool, self.key)

    def to_json(self) -> dict[str, Any]:
        """As the index keeps it."""
        return {
            **asdict(self),
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CacheEntry:
        """From the index; ValueError, KeyError or TypeError if it is not one."""
        entry = cls(
            str(raw["org"]),
            str(raw["pool"]),
            check_key(str(raw["key"])),
            str(raw["volume"]),
            int(raw["size_bytes"]),
            _aware(datetime.fromisoformat(raw["created_at"])),
            _aware(datetime.fromisoformat(raw["last_used_at"])),
        )
        if not entry.org or not entry.pool or not entry.volume.startswith(VOLUME_PREFIX):
            raise ValueError(f"not a cache: {entry.volume!r}")
        if entry.size_bytes < 0:
            raise ValueError(f"negative size of {entry.volume!r}")
        return entry


class Removal(Enum):
    REMOVED = "removed"
    GONE = "gone"
    IN_USE = "in use"


class CacheVolumes:
    """The cache volumes of agent ``owner``, rooted for ``job_user``."""

    def __init__(self, client: docker.DockerClient, owner: str, job_user: str) -> None:
        self._client = client
        self._owner = owner
        self._user = job_user
        self._init_ready = False

    def labeled(self) -> list[Volume]:
        selector = {"label": [f"{CACHE_LABEL}=1", f"{OWNER_LABEL}={self._owner}"]}
        volumes: list[Volume] = self._client.volumes.list(filters=selector)
        return volumes

    def labeled_entries(self, now: datetime) -> list[CacheEntry]:
        """Every cache volume of this agent as an entry (sizes measured), whether
        an index names it or not; last used when created (or ``now`` if unknown)."""
        found: list[tuple[Identity, Volume]] = []
        for volume in self.labeled():
            identity = identity_of(volume.attrs.get("Labels") or {})
            if identity is not None:
                found.append((identity, volume))
        sizes = self._engine_sizes() if found else {}
        entries = []
        for identity, volume in found:
            created = _created_at(volume.attrs.get("CreatedAt")) or now
            size = sizes.get(volume.name, -1)
            size = size if size >= 0 else self._archive_size(volume.name)
            entries.append(CacheEntry(*identity, volume.name, size, created, created))
        return entries

    def is_cache_of(self, volume: str, identity: Identity) -> bool:
        """The volume exists and its labels name this agent and all three of ``identity``."""
        try:
            labels = self._client.api.inspect_volume(volume).get("Labels") or {}
        except docker.errors.NotFound:
            return False
        return labels.get(OWNER_LABEL) == self._owner and identity_of(labels) == identity

    def create(self, identity: Identity) -> str:
        """A new, empty volume for ``identity``, its root the job user's, mode 0700."""
        org, pool, key = identity
        labels = {
            CACHE_LABEL: "1",
            ORG_LABEL: org,
            POOL_LABEL: pool,
            KEY_LABEL: key,
            OWNER_LABEL: self._owner,
        }
        name = str(self._client.volumes.create(name=volume_name(org, pool, key), labels=labels).name)
        try:
            init = self._client.containers.create(
                self._init_image(),
                ["/none"],
                network_mode="none",
                mounts=[Mount(CACHE_MOUNT, name, type="volume")],
                labels={CACHE_LABEL: "1", OWNER_LABEL: self._owner},
            )
            init.remove(force=True)
        except docker.errors.DockerException:
            with contextlib.suppress(docker.errors.DockerException):
                self._client.api.remove_volume(name, force=True)
            raise
        return name

    def _init_image(self) -> str:
        image = cache_init_image(self._user)
        if not self._init_ready:
            import_if_missing(self._client, image, lambda: cache_init_tar(self._user))
            self._init_ready = True
        return image

    def size_of(self, volume: str) -> int:
        size = self._engine_sizes().get(volume, -1)
        return size if size >= 0 else self._archive_size(volume)

    def _engine_sizes(self) -> dict[str, int]:
        """Bytes per volume as the engine counts them; -1 where it does not know."""
        volumes = self._client.df().get("Volumes") or []
        return {v["Name"]: int((v.get("UsageData") or {}).get("Size", -1)) for v in volumes}

    def _archive_size(self, volume: str) -> int:
        """The volume's bytes as a tar stream: for drivers the engine does not measure."""
        reader = self._client.containers.create(
            self._init_image(),
            ["/none"],
            network_mode="none",
            mounts=[Mount(CACHE_MOUNT, volume, type="volume", read_only=True, no_copy=True)],
            labels={CACHE_LABEL: "1", OWNER_LABEL: self._owner},
        )
        try:
            stream, _ = reader.get_archive(CACHE_MOUNT)
            return sum(len(chunk) for chunk in stream)
        finally:
            reader.remove(force=True)

    def remove(self, volume: str) -> Removal:
        """Removed unless a container uses it (Docker refuses: 409)."""
        try:
            self._client.api.remove_volume(volume)
        except docker.errors.NotFound:
            return Removal.GONE
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                log.info("cache_volume_in_use", volume=volume)
                return Removal.IN_USE
            raise
        return Removal.REMOVED


def identity_of(labels: dict[str, str]) -> Identity | None:
    """The (org, pool, key) a cache volume's labels name; None for any other volume."""
    org, pool, key = labels.get(ORG_LABEL, ""), labels.get(POOL_LABEL, ""), labels.get(KEY_LABEL, "")
    if labels.get(CACHE_LABEL) != "1" or not org or not pool or not _KEY.match(key):
        return None
    return (org, pool, key)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _created_at(text: object) -> datetime | None:
    """Docker's CreatedAt (RFC 3339, maybe with nanoseconds) as a datetime."""
    if not isinstance(text, str):
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return _aware(datetime.fromisoformat(trimmed))
    except ValueError:
        return None
