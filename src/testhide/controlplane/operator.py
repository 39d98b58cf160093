"""What operator commands share: the data dir opened with its store, master
key and audit log, and the operator's identity for the audit trail."""

from __future__ import annotations

import getpass
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.shared import SharedFiles
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.postgres import PgStore


@dataclass(frozen=True)
class OperatorContext:
    directory: DataDir
    master: MasterKey
    store: Store
    auditor: Auditor

    @property
    def actor(self) -> str:
        return f"operator:{getpass.getuser()}"


@asynccontextmanager
async def operator_context(
    data_dir: Path, master_key: str | None = None, *, require_current: bool = True
) -> AsyncIterator[OperatorContext]:
    """``master_key``: ``--master-key`` (``file:PATH`` or a ``pkcs11:`` URI), if given.
    The store is never migrated here, and refused when its schema is behind unless
    ``require_current`` is false (the ``migrate`` command)."""
    directory = DataDir(data_dir, master_key)
    directory.require_initialised()
    master = directory.master_key()
    store = await directory.open_store(migrate=False, require_current=require_current)
    try:
        shared = SharedFiles(directory, master, store) if isinstance(store, PgStore) else None
        if shared is not None:
            await shared.start()  # this copy of the data dir may be behind a rotation made elsewhere
        try:
            yield OperatorContext(
                directory, master, store, Auditor(store, await directory.audit_key(master, store))
            )
        finally:
            if shared is not None:
                # What the command rotated reaches the other copies; after a master-key rotation,
                # every file again, sealed under the new key.
                fresh = directory.master_key()
                await shared.publish(everything=fresh.current_id != master.current_id, master=fresh)
    finally:
        await store.close()
