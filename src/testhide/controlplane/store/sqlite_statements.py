"""Statement-signing keys and jobs' signed statements in the SQLite store; mixed into
SqliteStore, which provides the transaction runner."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from testhide.controlplane.ca.statement_store import JobStatementRecord, StatementKeyRecord
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts


def _key(r: sqlite3.Row) -> StatementKeyRecord:
    return StatementKeyRecord(
        r["id"],
        bytes(r["data_key"]),
        bytes(r["private_key"]),
        bytes(r["certificate"]),
        _dt(r["created_at"]) or datetime.min,
        _dt(r["active_until"]) or datetime.min,
        _dt(r["retired_at"]),
    )


def _bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


class SqliteStatements(SqliteParts):
    async def add_statement_key(self, record: StatementKeyRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO statement_keys (id, data_key, private_key, certificate, created_at,"
                " active_until, retired_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.data_key,
                    record.private_key,
                    record.certificate,
                    _ts(record.created_at),
                    _ts(record.active_until),
                    _ts(record.retired_at),
                ),
            )
        )

    async def statement_keys(self) -> list[StatementKeyRecord]:
        rows = await self._query("SELECT * FROM statement_keys ORDER BY created_at, rowid")
        return [_key(r) for r in rows]

    async def retire_statement_key(self, key_id: str, at: datetime) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            return (
                c.execute(
                    "UPDATE statement_keys SET retired_at = ? WHERE id = ? AND retired_at IS NULL",
                    (_ts(at), key_id),
                ).rowcount
                == 1
            )

        return await self._tx(run)

    async def add_job_statements(self, records: Sequence[JobStatementRecord]) -> list[bool]:
        def run(c: sqlite3.Connection) -> list[bool]:
            return [_add_job_statement(c, record) for record in records]

        return await self._tx(run)

    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None:
        rows = await self._query("SELECT * FROM job_statements WHERE org = ? AND job_id = ?", (org, job_id))
        if not rows:
            return None
        r = rows[0]
        return JobStatementRecord(
            r["job_id"],
            r["org"],
            bytes(r["payload"]),
            bytes(r["agent_signature"]),
            bytes(r["agent_certificate"]),
            _dt(r["recorded_at"]) or datetime.min,
            _bytes(r["countersignature"]),
            r["signing_key_id"],
            r["mismatch"],
        )


def _add_job_statement(c: sqlite3.Connection, record: JobStatementRecord) -> bool:
    cursor = c.execute(
        "INSERT INTO job_statements (job_id, org, payload, agent_signature, agent_certificate,"
        " countersignature, signing_key_id, mismatch, recorded_at)"
        " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS"
        " (SELECT 1 FROM jobs WHERE id = ? AND org = ?) ON CONFLICT (job_id) DO NOTHING",
        (
            record.job_id,
            record.org,
            record.payload,
            record.agent_signature,
            record.agent_certificate,
            record.countersignature,
            record.signing_key_id,
            record.mismatch,
            _ts(record.recorded_at),
            record.job_id,
            record.org,
        ),
    )
    return cursor.rowcount == 1
