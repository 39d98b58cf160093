"""Blobs (workspaces, artifacts, reports), secrets and test results in the SQLite
store: mixed into SqliteStore."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from testhide.controlplane.errors import NotFound
from testhide.controlplane.jobs.model import (
    BlobInfo,
    SecretInfo,
    TestCase,
    TestStatus,
)
from testhide.controlplane.store.sqlite_common import (
    SqliteParts,
    _dt,
    _ts,
)


class SqliteJobFiles(SqliteParts):
    # blobs: workspaces, artifacts, reports ----------------------------------------
    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blobs (id, org, kind, job_id, path, data_key, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (blob_id, org, kind, job_id, path, data_key, _ts(now)),
            )
        )

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        await self._tx(
            lambda c: c.execute("INSERT INTO blob_chunks VALUES (?, ?, ?)", (blob_id, index, sealed))
        )

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        """Mark complete; a complete blob of the same job, kind and path is replaced."""

        def run(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT job_id, kind, path FROM blobs WHERE id = ?", (blob_id,)).fetchone()
            if row["job_id"] is not None:
                for old in c.execute(
                    "SELECT id FROM blobs WHERE job_id = ? AND kind = ? AND path = ? AND id != ?",
                    (row["job_id"], row["kind"], row["path"], blob_id),
                ).fetchall():
                    c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (old["id"],))
                    c.execute("DELETE FROM blobs WHERE id = ?", (old["id"],))
            c.execute(
                "UPDATE blobs SET size = ?, sha256 = ?, complete = 1 WHERE id = ?", (size, sha256, blob_id)
            )

        await self._tx(run)

    async def delete_blob(self, blob_id: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
            c.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))

        await self._tx(run)

    @staticmethod
    def _blob(r: sqlite3.Row) -> BlobInfo:
        return BlobInfo(r["id"], r["org"], r["kind"], r["job_id"], r["path"], r["size"], r["sha256"])

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND id = ? AND complete = 1", (org, blob_id)
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND path = ? AND complete = 1",
            (org, job_id, kind, path),
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND complete = 1 ORDER BY path",
            (org, job_id, kind),
        )
        return [self._blob(r) for r in rows]

    async def jobs_blobs(
        self, org: str, job_ids: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, list[BlobInfo]]:
        return await self._tx(lambda c: jobs_blobs(c, org, json.dumps(list(job_ids)), kinds), write=False)

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        rows = await self._query(
            "SELECT data FROM blob_chunks WHERE blob_id = ? AND idx = ?", (blob_id, index)
        )
        return bytes(rows[0]["data"]) if rows else None

    # secrets ---------------------------------------------------------------------
    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO secrets (org, name, data_key, value, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (org, name) DO UPDATE SET"
                " data_key = excluded.data_key, value = excluded.value, updated_at = excluded.updated_at",
                (org, name, data_key, sealed, _ts(now)),
            )
        )

    async def list_secrets(self, org: str) -> list[SecretInfo]:
        rows = await self._query(
            "SELECT name, updated_at, last_used_at, last_used_by_job FROM secrets WHERE org = ?"
            " ORDER BY name",
            (org,),
        )
        return [SecretInfo(r[0], _dt(r[1]) or datetime.min, _dt(r[2]), r[3]) for r in rows]

    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        marks = ", ".join("?" * len(names))
        # Only "?" placeholders are interpolated: the names travel as parameters.
        sql = f"UPDATE secrets SET last_used_at = ?, last_used_by_job = ? WHERE org = ? AND name IN ({marks})"  # noqa: S608
        await self._tx(lambda c: c.execute(sql, (_ts(now), job_id, org, *names)))

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        def run(c: sqlite3.Connection) -> datetime | None:
            row = c.execute(
                "SELECT updated_at FROM secrets WHERE org = ? AND name = ?", (org, name)
            ).fetchone()
            c.execute("DELETE FROM secrets WHERE org = ? AND name = ?", (org, name))
            return _dt(row["updated_at"]) if row else None

        return await self._tx(run)

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        if not names:
            return {}
        marks = ", ".join("?" * len(names))
        rows = await self._query(
            # Only "?" placeholders are interpolated: the names travel as parameters.
            f"SELECT name, data_key, value FROM secrets WHERE org = ? AND name IN ({marks})",  # noqa: S608
            (org, *names),
        )
        return {r["name"]: (bytes(r["data_key"]), bytes(r["value"])) for r in rows}

    # test results ----------------------------------------------------------------
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM test_cases WHERE job_id = ? AND path = ?", (job_id, path))
            c.execute(
                "INSERT INTO test_reports VALUES (?, ?, ?) ON CONFLICT (job_id, path) DO UPDATE SET"
                " error = excluded.error",
                (job_id, path, error),
            )
            c.executemany(
                "INSERT INTO test_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, path, n, t.suite, t.classname, t.name, t.duration_s, t.status.value, t.message)
                    for n, t in enumerate(cases)
                ],
            )

        await self._tx(run)

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        def run(c: sqlite3.Connection) -> tuple[list[TestCase], list[str]]:
            if c.execute("SELECT 1 FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone() is None:
                raise NotFound(f"job {job_id} not found")
            cases = [
                TestCase(
                    r["suite"],
                    r["classname"],
                    r["name"],
                    r["duration_s"],
                    TestStatus(r["status"]),
                    r["message"],
                )
                for r in c.execute("SELECT * FROM test_cases WHERE job_id = ? ORDER BY path, n", (job_id,))
            ]
            rejected = [
                r["path"]
                for r in c.execute(
                    "SELECT path FROM test_reports WHERE job_id = ? AND error != '' ORDER BY path", (job_id,)
                )
            ]
            return cases, rejected

        return await self._tx(run, write=False)


def jobs_blobs(
    c: sqlite3.Connection, org: str, job_ids: str, kinds: Sequence[str]
) -> dict[str, list[BlobInfo]]:
    """The complete blobs of ``kinds`` of the organisation's jobs (``job_ids``, a JSON array),
    by job id, in path order."""
    found: dict[str, list[BlobInfo]] = {}
    for r in c.execute(
        "SELECT * FROM blobs WHERE org = ? AND complete = 1"
        " AND kind IN (SELECT value FROM json_each(?))"
        " AND job_id IN (SELECT value FROM json_each(?)) ORDER BY job_id, path",
        (org, json.dumps(list(kinds)), job_ids),
    ):
        found.setdefault(r["job_id"], []).append(SqliteJobFiles._blob(r))
    return found
