"""Statement-signing keys and jobs' signed statements in the PostgreSQL store; the port of
``sqlite_statements``, mixed into PgStore."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from testhide.controlplane.ca.statement_store import JobStatementRecord, StatementKeyRecord
from testhide.controlplane.store.pg_common import PgConnection, PgParts, Row


def _key(r: Row) -> StatementKeyRecord:
    return StatementKeyRecord(
        r["id"],
        bytes(r["data_key"]),
        bytes(r["private_key"]),
        bytes(r["certificate"]),
        r["created_at"],
        r["active_until"],
        r["retired_at"],
    )


def _bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


class PgStatements(PgParts):
    async def add_statement_key(self, record: StatementKeyRecord) -> None:
        async def run(c: PgConnection) -> None:
            await c.execute(
                "INSERT INTO statement_keys (id, data_key, private_key, certificate, created_at,"
                " active_until, retired_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                record.id,
                record.data_key,
                record.private_key,
                record.certificate,
                record.created_at,
                record.active_until,
                record.retired_at,
            )

        await self._tx(run)

    async def statement_keys(self) -> list[StatementKeyRecord]:
        rows = await self._fetch("SELECT * FROM statement_keys ORDER BY created_at, rowid")
        return [_key(r) for r in rows]

    async def retire_statement_key(self, key_id: str, at: datetime) -> bool:
        async def run(c: PgConnection) -> bool:
            changed = await c.execute(
                "UPDATE statement_keys SET retired_at = $1 WHERE id = $2 AND retired_at IS NULL", at, key_id
            )
            return bool(changed == 1)

        return await self._tx(run)

    async def add_job_statements(self, records: Sequence[JobStatementRecord]) -> list[bool]:
        async def run(c: PgConnection) -> list[bool]:
            kept = []
            for record in records:
                changed = await c.execute(
                    "INSERT INTO job_statements (job_id, org, payload, agent_signature, agent_certificate,"
                    " countersignature, signing_key_id, mismatch, recorded_at)"
                    " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE EXISTS"
                    " (SELECT 1 FROM jobs WHERE id = $1 AND org = $2) ON CONFLICT (job_id) DO NOTHING",
                    record.job_id,
                    record.org,
                    record.payload,
                    record.agent_signature,
                    record.agent_certificate,
                    record.countersignature,
                    record.signing_key_id,
                    record.mismatch,
                    record.recorded_at,
                )
                kept.append(bool(changed == 1))
            return kept

        return await self._tx(run)

    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None:
        rows = await self._fetch("SELECT * FROM job_statements WHERE org = $1 AND job_id = $2", org, job_id)
        if not rows:
            return None
        r = rows[0]
        return JobStatementRecord(
            r["job_id"],
            r["org"],
            bytes(r["payload"]),
            bytes(r["agent_signature"]),
            bytes(r["agent_certificate"]),
            r["recorded_at"],
            _bytes(r["countersignature"]),
            r["signing_key_id"],
            r["mismatch"],
        )
