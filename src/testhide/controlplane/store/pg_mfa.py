"""Users' TOTP second factors in the PostgreSQL store; the port of
``sqlite_mfa``, mixed into PgStore. Several control planes write under READ
COMMITTED: enrolling and confirming lock the user's row first, so two of them
for one user take turns; a time step is accepted, and a recovery code spent,
by a conditional update (of two concurrent uses one wins)."""

from __future__ import annotations

from datetime import datetime

from testhide.controlplane.store.base import MfaFactorRecord
from testhide.controlplane.store.pg_common import PgConnection, PgParts, Row

_DELETE_CODES = "DELETE FROM mfa_recovery_codes WHERE factor_id IN (SELECT id FROM mfa_factors WHERE {})"
_LOCK_USER = "SELECT 1 FROM users WHERE org = $1 AND id = $2 FOR UPDATE"


class PgMfa(PgParts):
    @staticmethod
    def _factor(r: Row) -> MfaFactorRecord:
        return MfaFactorRecord(
            r["id"],
            r["org"],
            r["user_id"],
            bytes(r["data_key"]),
            bytes(r["secret"]),
            r["created_at"],
            r["confirmed_at"],
            r["last_step"],
        )

    async def mfa_factor(self, org: str, user_id: str, confirmed: bool) -> MfaFactorRecord | None:
        state = "IS NOT NULL" if confirmed else "IS NULL"
        rows = await self._fetch(
            f"SELECT * FROM mfa_factors WHERE org = $1 AND user_id = $2 AND confirmed_at {state}",  # noqa: S608
            org,
            user_id,
        )
        return self._factor(rows[0]) if rows else None

    async def create_mfa_factor(self, record: MfaFactorRecord, code_hashes: list[bytes]) -> None:
        pending = "org = $1 AND user_id = $2 AND confirmed_at IS NULL"

        async def run(c: PgConnection) -> None:
            await c.execute(_LOCK_USER, record.org, record.user_id)
            await c.execute(_DELETE_CODES.format(pending), record.org, record.user_id)
            await c.execute(f"DELETE FROM mfa_factors WHERE {pending}", record.org, record.user_id)  # noqa: S608
            await c.execute(
                "INSERT INTO mfa_factors (id, org, user_id, data_key, secret, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                record.id,
                record.org,
                record.user_id,
                record.data_key,
                record.sealed_secret,
                record.created_at,
            )
            await c.executemany(
                "INSERT INTO mfa_recovery_codes (factor_id, code_hash) VALUES ($1, $2)",
                [(record.id, h) for h in code_hashes],
            )

        await self._tx(run)

    async def confirm_mfa_factor(self, factor_id: str, step: int, now: datetime) -> bool:
        async def run(c: PgConnection) -> bool:
            row = await c.fetchrow("SELECT org, user_id FROM mfa_factors WHERE id = $1", factor_id)
            if row is None:
                return False
            org, user_id = row["org"], row["user_id"]
            await c.execute(_LOCK_USER, org, user_id)
            active = "org = $1 AND user_id = $2 AND confirmed_at IS NOT NULL"
            if not await c.fetchrow(
                "SELECT 1 FROM mfa_factors WHERE id = $1 AND confirmed_at IS NULL", factor_id
            ):
                return False  # confirmed (or replaced) meanwhile
            await c.execute(_DELETE_CODES.format(active), org, user_id)
            await c.execute(f"DELETE FROM mfa_factors WHERE {active}", org, user_id)  # noqa: S608
            await c.execute(
                "UPDATE mfa_factors SET confirmed_at = $1, last_step = $2 WHERE id = $3", now, step, factor_id
            )
            return True

        return await self._tx(run)

    async def accept_mfa_step(self, factor_id: str, step: int) -> bool:
        changed = await self._tx(
            lambda c: c.execute(
                "UPDATE mfa_factors SET last_step = $1"
                " WHERE id = $2 AND (last_step IS NULL OR last_step < $1)",
                step,
                factor_id,
            )
        )
        return changed == 1

    async def spend_recovery_code(self, factor_id: str, code_hash: bytes, now: datetime) -> bool:
        changed = await self._tx(
            lambda c: c.execute(
                "UPDATE mfa_recovery_codes SET used_at = $1"
                " WHERE factor_id = $2 AND code_hash = $3 AND used_at IS NULL AND factor_id IN"
                " (SELECT id FROM mfa_factors WHERE confirmed_at IS NOT NULL)",
                now,
                factor_id,
                code_hash,
            )
        )
        return changed == 1

    async def delete_mfa_factors(self, org: str, user_id: str) -> int:
        async def run(c: PgConnection) -> int:
            await c.execute(_DELETE_CODES.format("org = $1 AND user_id = $2"), org, user_id)
            return await c.execute("DELETE FROM mfa_factors WHERE org = $1 AND user_id = $2", org, user_id)

        return await self._tx(run)
