"""Users' TOTP second factors in the SQLite store (``auth/mfa.py`` decides, this
keeps): one pending and one confirmed factor per user at most, the secret
sealed, the recovery codes hashed. Every check that decides a write is in the
write's own statement (a step accepted once, a code spent once). Mixed into
SqliteStore, which provides the transaction runner."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from testhide.controlplane.store.base import MfaFactorRecord
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts

_DELETE_CODES = "DELETE FROM mfa_recovery_codes WHERE factor_id IN (SELECT id FROM mfa_factors WHERE {})"


class SqliteMfa(SqliteParts):
    @staticmethod
    def _factor(r: sqlite3.Row) -> MfaFactorRecord:
        return MfaFactorRecord(
            r["id"],
            r["org"],
            r["user_id"],
            bytes(r["data_key"]),
            bytes(r["secret"]),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["confirmed_at"]),
            r["last_step"],
        )

    async def mfa_factor(self, org: str, user_id: str, confirmed: bool) -> MfaFactorRecord | None:
        state = "IS NOT NULL" if confirmed else "IS NULL"
        rows = await self._query(
            f"SELECT * FROM mfa_factors WHERE org = ? AND user_id = ? AND confirmed_at {state}",  # noqa: S608
            (org, user_id),
        )
        return self._factor(rows[0]) if rows else None

    async def create_mfa_factor(self, record: MfaFactorRecord, code_hashes: list[bytes]) -> None:
        pending = "org = ? AND user_id = ? AND confirmed_at IS NULL"

        def run(c: sqlite3.Connection) -> None:
            c.execute(_DELETE_CODES.format(pending), (record.org, record.user_id))
            c.execute(f"DELETE FROM mfa_factors WHERE {pending}", (record.org, record.user_id))  # noqa: S608
            c.execute(
                "INSERT INTO mfa_factors (id, org, user_id, data_key, secret, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.user_id,
                    record.data_key,
                    record.sealed_secret,
                    _ts(record.created_at),
                ),
            )
            c.executemany(
                "INSERT INTO mfa_recovery_codes (factor_id, code_hash) VALUES (?, ?)",
                [(record.id, h) for h in code_hashes],
            )

        await self._tx(run)

    async def confirm_mfa_factor(self, factor_id: str, step: int, now: datetime) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT org, user_id FROM mfa_factors WHERE id = ? AND confirmed_at IS NULL", (factor_id,)
            ).fetchone()
            if row is None:
                return False
            active = "org = ? AND user_id = ? AND confirmed_at IS NOT NULL"
            c.execute(_DELETE_CODES.format(active), (row["org"], row["user_id"]))
            c.execute(f"DELETE FROM mfa_factors WHERE {active}", (row["org"], row["user_id"]))  # noqa: S608
            c.execute(
                "UPDATE mfa_factors SET confirmed_at = ?, last_step = ? WHERE id = ?",
                (_ts(now), step, factor_id),
            )
            return True

        return await self._tx(run)

    async def accept_mfa_step(self, factor_id: str, step: int) -> bool:
        return await self._tx(
            lambda c: (
                c.execute(
                    "UPDATE mfa_factors SET last_step = ?"
                    " WHERE id = ? AND (last_step IS NULL OR last_step < ?)",
                    (step, factor_id, step),
                ).rowcount
                == 1
            )
        )

    async def spend_recovery_code(self, factor_id: str, code_hash: bytes, now: datetime) -> bool:
        return await self._tx(
            lambda c: (
                c.execute(
                    "UPDATE mfa_recovery_codes SET used_at = ?"
                    " WHERE factor_id = ? AND code_hash = ? AND used_at IS NULL AND factor_id IN"
                    " (SELECT id FROM mfa_factors WHERE confirmed_at IS NOT NULL)",
                    (_ts(now), factor_id, code_hash),
                ).rowcount
                == 1
            )
        )

    async def delete_mfa_factors(self, org: str, user_id: str) -> int:
        def run(c: sqlite3.Connection) -> int:
            c.execute(_DELETE_CODES.format("org = ? AND user_id = ?"), (org, user_id))
            return c.execute("DELETE FROM mfa_factors WHERE org = ? AND user_id = ?", (org, user_id)).rowcount

        return await self._tx(run)
