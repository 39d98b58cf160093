"""Writing to a running control plane's own SQLite store behind its back, as someone holding
its database (and, for re-sealing, its master key) could: what the log chain and the signed
statements must expose (tests/integration/test_log_chain.py, test_verify.py)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from typing import Any

from testhide.controlplane.atrest import seal, unseal
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.jobs.blobs import CHUNK
from testhide.controlplane.jobs.blobs import _aad as blob_aad  # the vault's own binding of a chunk
from testhide.controlplane.jobs.logs import entry_aad
from testhide.controlplane.store.sqlite import SqliteStore
from tests.harness import RunningControlPlane

Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


class Database:
    """The control plane's own SQLite store, written behind its back, about one job."""

    def __init__(self, cp: RunningControlPlane, job_id: str) -> None:
        assert isinstance(cp.daemon._store, SqliteStore)
        self.store = cp.daemon._store
        self.data_dir = DataDir(cp.data_dir)
        self.job_id = job_id

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self.store._tx(fn)

    async def rows(self) -> Rows:
        """The job's stored log, to `restore` after a tampering."""

        def read(c: sqlite3.Connection) -> Rows:
            entries = c.execute("SELECT * FROM log_entries WHERE job_id = ?", (self.job_id,)).fetchall()
            batches = c.execute("SELECT * FROM log_batches WHERE job_id = ?", (self.job_id,)).fetchall()
            return [tuple(r) for r in entries], [tuple(r) for r in batches]

        return await self.run(read)  # type: ignore[no-any-return]

    async def restore(self, saved: Rows) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM log_entries WHERE job_id = ?", (self.job_id,))
            c.execute("DELETE FROM log_batches WHERE job_id = ?", (self.job_id,))
            c.executemany("INSERT INTO log_entries VALUES (?, ?, ?, ?, ?, ?)", saved[0])
            c.executemany("INSERT INTO log_batches VALUES (?, ?, ?)", saved[1])

        await self.run(write)

    async def reseal(self, seq: int, index: int, plaintext: bytes) -> None:
        """What someone holding the master key can do: new bytes, sealed as the control plane seals."""
        wrapped = await self.store.get_job_data_key("default", self.job_id)
        key = self.data_dir.master_key().unwrap_data_key(wrapped, aad=self.job_id.encode())
        sealed = seal(key, plaintext, entry_aad(self.job_id, seq, index))
        await self.run(
            lambda c: c.execute(
                "UPDATE log_entries SET data = ? WHERE job_id = ? AND seq = ? AND idx = ?",
                (sealed, self.job_id, seq, index),
            )
        )

    async def delete_batch(self, seq: int) -> None:
        def delete(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM log_entries WHERE job_id = ? AND seq = ?", (self.job_id, seq))
            c.execute("DELETE FROM log_batches WHERE job_id = ? AND seq = ?", (self.job_id, seq))

        await self.run(delete)

    async def swap(self, a: int, b: int) -> None:
        def swap(c: sqlite3.Connection) -> None:
            for table in ("log_entries", "log_batches"):
                for old, new in ((a, -1), (b, a), (-1, b)):
                    sql = f"UPDATE {table} SET seq = ? WHERE job_id = ? AND seq = ?"  # noqa: S608
                    c.execute(sql, (new, self.job_id, old))

        await self.run(swap)

    async def swap_resealed(self, a: int, b: int, entries_of: dict[int, list[tuple[int, bytes]]]) -> None:
        """Batches ``a`` and ``b`` swapped, each re-sealed for its new place, so that the store
        reads them back without complaint (``entries_of``: each batch's entries as downloaded)."""
        await self.swap(a, b)
        for seq, original in ((a, b), (b, a)):
            for index, (_, data) in enumerate(e for e in entries_of[original] if e[1]):
                await self.reseal(seq, index, data)

    async def replace_artifact(self, path: str, data: bytes) -> bytes:
        """An artifact's bytes replaced, sealed as the blob vault seals them and its listed size and
        sha256 updated to match; the bytes it had, to put back with this method."""
        assert len(data) <= CHUNK, "one chunk"
        found = await self.store.find_blob("default", self.job_id, "artifact", path)
        assert found is not None, path
        info, wrapped = found
        key = self.data_dir.master_key().unwrap_data_key(wrapped, aad=info.id.encode())
        old = await self.store.blob_chunk(info.id, 0)
        assert old is not None
        sealed = seal(key, data, blob_aad(info.id, 0, True))

        def write(c: sqlite3.Connection) -> None:
            c.execute("UPDATE blob_chunks SET data = ? WHERE blob_id = ? AND idx = 0", (sealed, info.id))
            c.execute(
                "UPDATE blobs SET size = ?, sha256 = ? WHERE id = ?",
                (len(data), hashlib.sha256(data).hexdigest(), info.id),
            )

        await self.run(write)
        return unseal(key, old, blob_aad(info.id, 0, True))

    async def set_result(self, exit_code: int, status: str) -> None:
        await self.run(
            lambda c: c.execute(
                "UPDATE jobs SET exit_code = ?, status = ? WHERE id = ?", (exit_code, status, self.job_id)
            )
        )
