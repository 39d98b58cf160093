"""Blobs (workspaces, artifacts, reports), secrets and test results in the PostgreSQL
store: mixed into PgStore."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from testhide.controlplane.errors import NotFound
from testhide.controlplane.jobs.model import (
    BlobInfo,
    SecretInfo,
    TestCase,
    TestStatus,
)
from testhide.controlplane.store.pg_common import (
    PgConnection,
    PgParts,
    Row,
)


class PgJobFiles(PgParts):
    # blobs: workspaces, artifacts, reports ----------------------------------------
    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blobs (id, org, kind, job_id, path, data_key, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                blob_id,
                org,
                kind,
                job_id,
                path,
                data_key,
                now,
            )
        )

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blob_chunks (blob_id, idx, data) VALUES ($1, $2, $3)", blob_id, index, sealed
            )
        )

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        """Mark complete; a complete blob of the same job, kind and path is replaced
        (its chunks go with it: ON DELETE CASCADE). NotFound if the blob is gone,
        replaced meanwhile by another upload to the same path that completed first."""

        async def run(c: PgConnection) -> None:
            row = await c.fetchrow(
                "UPDATE blobs SET size = $1, sha256 = $2, complete = 1 WHERE id = $3"
                " RETURNING job_id, kind, path",
                size,
                sha256,
                blob_id,
            )
            if row is None:
                raise NotFound(f"blob {blob_id} not found")
            if row["job_id"] is not None:
                await c.execute(
                    "DELETE FROM blobs WHERE job_id = $1 AND kind = $2 AND path = $3 AND id <> $4",
                    row["job_id"],
                    row["kind"],
                    row["path"],
                    blob_id,
                )

        await self._tx(run)

    async def delete_blob(self, blob_id: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM blobs WHERE id = $1", blob_id))  # chunks: CASCADE

    @staticmethod
    def _blob(r: Row) -> BlobInfo:
        return BlobInfo(r["id"], r["org"], r["kind"], r["job_id"], r["path"], r["size"], r["sha256"])

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND id = $2 AND complete = 1", org, blob_id
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND job_id = $2 AND kind = $3 AND path = $4 AND complete = 1",
            org,
            job_id,
            kind,
            path,
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND job_id = $2 AND kind = $3 AND complete = 1"
            ' ORDER BY path COLLATE "C"',
            org,
            job_id,
            kind,
        )
        return [self._blob(r) for r in rows]

    async def jobs_blobs(
        self, org: str, job_ids: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, list[BlobInfo]]:
        async def run(c: PgConnection) -> dict[str, list[BlobInfo]]:
            return await jobs_blobs(c, org, list(job_ids), kinds)

        return await self._tx(run)

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        rows = await self._fetch(
            "SELECT data FROM blob_chunks WHERE blob_id = $1 AND idx = $2", blob_id, index
        )
        return bytes(rows[0]["data"]) if rows else None

    # secrets ---------------------------------------------------------------------
    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO secrets (org, name, data_key, value, updated_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (org, name) DO UPDATE SET"
                " data_key = excluded.data_key, value = excluded.value, updated_at = excluded.updated_at",
                org,
                name,
                data_key,
                sealed,
                now,
            )
        )

    async def list_secrets(self, org: str) -> list[SecretInfo]:
        rows = await self._fetch(
            "SELECT name, updated_at, last_used_at, last_used_by_job FROM secrets WHERE org = $1"
            ' ORDER BY name COLLATE "C"',
            org,
        )
        return [
            SecretInfo(r["name"], r["updated_at"], r["last_used_at"], r["last_used_by_job"]) for r in rows
        ]

    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE secrets SET last_used_at = $1, last_used_by_job = $2"
                " WHERE org = $3 AND name = ANY($4::text[])",
                now,
                job_id,
                org,
                list(names),
            )
        )

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        row = await self._tx(
            lambda c: c.fetchrow(
                "DELETE FROM secrets WHERE org = $1 AND name = $2 RETURNING updated_at", org, name
            )
        )
        return row["updated_at"] if row else None

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        if not names:
            return {}
        rows = await self._fetch(
            "SELECT name, data_key, value FROM secrets WHERE org = $1 AND name = ANY($2::text[])",
            org,
            list(names),
        )
        return {r["name"]: (bytes(r["data_key"]), bytes(r["value"])) for r in rows}

    # test results ----------------------------------------------------------------
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        """The report row is written first: its lock orders two writers of the same
        report, so the second deletes the cases the first committed."""

        async def run(c: PgConnection) -> None:
            await c.execute(
                "INSERT INTO test_reports (job_id, path, error) VALUES ($1, $2, $3)"
                " ON CONFLICT (job_id, path) DO UPDATE SET error = excluded.error",
                job_id,
                path,
                error,
            )
            await c.execute("DELETE FROM test_cases WHERE job_id = $1 AND path = $2", job_id, path)
            if cases:
                await c.execute(
                    "INSERT INTO test_cases"
                    " (job_id, path, n, suite, classname, name, duration_s, status, message)"
                    " SELECT $1, $2, t.n - 1, t.suite, t.classname, t.name, t.duration_s, t.status, t.message"
                    " FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[], $7::text[], $8::text[])"
                    " WITH ORDINALITY AS t(suite, classname, name, duration_s, status, message, n)",
                    job_id,
                    path,
                    [t.suite for t in cases],
                    [t.classname for t in cases],
                    [t.name for t in cases],
                    [float(t.duration_s) for t in cases],
                    [t.status.value for t in cases],
                    [t.message for t in cases],
                )

        await self._tx(run)

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        async def run(c: PgConnection) -> tuple[list[TestCase], list[str]]:
            if await c.fetchrow("SELECT 1 FROM jobs WHERE org = $1 AND id = $2", org, job_id) is None:
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
                for r in await c.fetch(
                    'SELECT * FROM test_cases WHERE job_id = $1 ORDER BY path COLLATE "C", n', job_id
                )
            ]
            rejected = [
                r["path"]
                for r in await c.fetch(
                    "SELECT path FROM test_reports WHERE job_id = $1 AND error <> ''"
                    ' ORDER BY path COLLATE "C"',
                    job_id,
                )
            ]
            return cases, rejected

        return await self._snapshot(run)


async def jobs_blobs(
    c: PgConnection, org: str, job_ids: list[str], kinds: Sequence[str]
) -> dict[str, list[BlobInfo]]:
    """The complete blobs of ``kinds`` of the organisation's jobs, by job id, in path order."""
    found: dict[str, list[BlobInfo]] = {}
    for r in await c.fetch(
        "SELECT * FROM blobs WHERE org = $1 AND complete = 1 AND kind = ANY($2::text[])"
        ' AND job_id = ANY($3::text[]) ORDER BY job_id, path COLLATE "C"',
        org,
        list(kinds),
        job_ids,
    ):
        found.setdefault(r["job_id"], []).append(PgJobFiles._blob(r))
    return found
