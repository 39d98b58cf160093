"""Persistence behind one ``Store`` protocol. SQLite is the embedded default;
the SQL stays portable so PostgreSQL can be a second backend for replicas."""

from testhide.controlplane.store.base import (
    AgentRecord,
    ApiKeyRecord,
    EnrollmentTokenRecord,
    Store,
    StoredLogEntry,
)
from testhide.controlplane.store.sqlite import SqliteStore

__all__ = ["AgentRecord", "ApiKeyRecord", "EnrollmentTokenRecord", "SqliteStore", "Store", "StoredLogEntry"]
