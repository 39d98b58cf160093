"""Persistence. Each package declares the few store calls it makes in its own
small protocol (``jobs/store.py``, ``auth/store.py``, ``ca/store.py``);
``Store`` is their union, which a backend implements whole. SQLite is the
embedded default; the SQL stays portable so PostgreSQL can be a second backend
for replicas."""

from testhide.controlplane.store.base import (
    AgentRecord,
    ApiKeyRecord,
    EnrollmentTokenRecord,
    Store,
    StoredLogEntry,
)
from testhide.controlplane.store.sqlite import SqliteStore

__all__ = ["AgentRecord", "ApiKeyRecord", "EnrollmentTokenRecord", "SqliteStore", "Store", "StoredLogEntry"]
