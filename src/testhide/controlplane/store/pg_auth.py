"""Credentials in the PostgreSQL store: API keys, users, refresh tokens (sessions),
failed logins by subject and by address, and the audit chain; the port of
``sqlite_auth``, mixed into PgStore, which provides the transaction runner.

SQLite has one writer at a time; here several control planes write under READ
COMMITTED, so every read that decides a write is atomic with it: a refresh
token is spent by a conditional update (of two concurrent uses one wins, the
other then sees it spent, at the winner's time), the failure counters are
inserts and upserts, and an audit append locks the head before it chains the
next entry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from testhide.controlplane.auth.audit import GENESIS, AuditChain, AuditEntry, AuditEvent
from testhide.controlplane.store.base import ApiKeyRecord, OrgRecord, RefreshRecord, UserRecord
from testhide.controlplane.store.pg_common import PgConnection, PgParts, Row


async def append_audit_entries(
    c: PgConnection, events: Sequence[AuditEvent], chain: AuditChain
) -> list[AuditEntry]:
    """``events`` chained in order after the head, within the caller's transaction.
    The head row is locked (``FOR UPDATE``; made first, as seq 0 on ``GENESIS``,
    if the log is empty) before the next seq and prev_hash are read from it, so
    appends from several replicas queue up and never fork the chain; one head
    update for all of them. The time is chained in UTC, as ``timestamptz`` gives
    it back (a naive one taken as UTC): chained with another offset, the entry
    would not verify."""
    head = await c.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
    if head is None:
        await c.execute(
            "INSERT INTO audit_head (id, seq, hash, mac) VALUES (1, 0, $1, $2) ON CONFLICT (id) DO NOTHING",
            GENESIS,
            b"",
        )
        head = await c.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        assert head is not None
    seq, prev = int(head["seq"]), bytes(head["hash"])
    entries = []
    for event in events:
        at = event.at.astimezone(UTC) if event.at.tzinfo else event.at.replace(tzinfo=UTC)
        seq += 1
        entry = chain.entry(seq, prev, replace(event, at=at))
        entries.append(entry)
        prev = entry.hash
    if not entries:
        return entries
    await c.executemany(
        "INSERT INTO audit_log (seq, at, actor, org, action, target, details, source_ip, prev_hash, hash)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        [
            (
                e.seq,
                e.event.at,
                e.event.actor,
                e.event.org,
                e.event.action,
                e.event.target,
                json.dumps(e.event.details, sort_keys=True),
                e.event.source_ip,
                e.prev_hash,
                e.hash,
            )
            for e in entries
        ],
    )
    await c.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, mac = $3 WHERE id = 1",
        seq,
        prev,
        chain.head_mac(seq, prev),
    )
    return entries


class PgAuth(PgParts):
    # organisations and their access policy ---------------------------------------------
    @staticmethod
    def _org(r: Row) -> OrgRecord:
        seconds = r["admin_key_max_lifetime_s"]
        return OrgRecord(
            r["name"],
            r["created_at"],
            r["revoked_at"],
            None if seconds is None else timedelta(seconds=seconds),
        )

    async def list_org_records(self) -> list[OrgRecord]:
        return [self._org(r) for r in await self._fetch('SELECT * FROM orgs ORDER BY name COLLATE "C"')]

    async def get_org(self, org: str) -> OrgRecord | None:
        rows = await self._fetch("SELECT * FROM orgs WHERE name = $1", org)
        return self._org(rows[0]) if rows else None

    async def set_admin_key_max_lifetime(self, org: str, lifetime: timedelta | None) -> OrgRecord | None:
        seconds = None if lifetime is None else int(lifetime.total_seconds())
        row = await self._tx(
            lambda c: c.fetchrow(
                "UPDATE orgs SET admin_key_max_lifetime_s = $1 WHERE name = $2 RETURNING *", seconds, org
            )
        )
        return None if row is None else self._org(row)

    # API keys ------------------------------------------------------------------
    async def create_api_key(self, record: ApiKeyRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO api_keys"
                " (id, org, name, secret_hash, scopes, created_at, revoked_at, owner, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                record.id,
                record.org,
                record.name,
                record.secret_hash,
                " ".join(record.scopes),
                record.created_at,
                record.revoked_at,
                record.owner,
                record.expires_at,
            )
        )

    @staticmethod
    def _api_key(r: Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            r["id"],
            r["org"],
            r["name"],
            bytes(r["secret_hash"]),
            tuple(r["scopes"].split()),
            r["created_at"],
            r["revoked_at"],
            r["owner"],
            r["expires_at"],
            r["last_used_at"],
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._fetch("SELECT * FROM api_keys WHERE id = $1", key_id)
        return self._api_key(rows[0]) if rows else None

    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]:
        """In creation order; ties by id (SQLite leaves them in insertion order)."""
        return [
            self._api_key(r)
            for r in await self._fetch("SELECT * FROM api_keys WHERE org = $1 ORDER BY created_at, id", org)
        ]

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute("UPDATE api_keys SET last_used_at = $1 WHERE id = $2", now, key_id)
        )

    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None:
        """Revoke the key and every session (refresh family) it opened."""

        async def run(c: PgConnection) -> ApiKeyRecord | None:
            row = await c.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE org = $2 AND id = $3"
                " RETURNING *",
                now,
                org,
                key_id,
            )
            if row is None:
                return None
            await c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1)"
                " WHERE principal_kind = 'api_key' AND principal_id = $2",
                now,
                key_id,
            )
            return self._api_key(row)

        return await self._tx(run)

    # users ------------------------------------------------------------------------
    @staticmethod
    def _user(r: Row) -> UserRecord:
        return UserRecord(
            r["id"],
            r["org"],
            r["name"],
            r["password_hash"],
            tuple(r["scopes"].split()),
            r["created_at"],
            r["revoked_at"],
        )

    async def create_user(self, record: UserRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO users (id, org, name, password_hash, scopes, created_at, revoked_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, NULL)",
                record.id,
                record.org,
                record.name,
                record.password_hash,
                " ".join(record.scopes),
                record.created_at,
            )
        )

    async def find_user(self, org: str, name: str) -> UserRecord | None:
        rows = await self._fetch("SELECT * FROM users WHERE org = $1 AND name = $2", org, name)
        return self._user(rows[0]) if rows else None

    async def get_user(self, org: str, user_id: str) -> UserRecord | None:
        rows = await self._fetch("SELECT * FROM users WHERE org = $1 AND id = $2", org, user_id)
        return self._user(rows[0]) if rows else None

    async def list_users(self, org: str) -> list[UserRecord]:
        """By name, bytewise (``COLLATE "C"``) as SQLite orders text, whatever the database's locale."""
        return [
            self._user(r)
            for r in await self._fetch('SELECT * FROM users WHERE org = $1 ORDER BY name COLLATE "C"', org)
        ]

    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None:
        async def run(c: PgConnection) -> UserRecord | None:
            row = await c.fetchrow(
                "UPDATE users SET revoked_at = COALESCE(revoked_at, $1) WHERE org = $2 AND name = $3"
                " RETURNING *",
                now,
                org,
                name,
            )
            if row is None:
                return None
            await c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1)"
                " WHERE principal_kind = 'user' AND principal_id = $2",
                now,
                row["id"],
            )
            return self._user(row)

        return await self._tx(run)

    # refresh tokens ---------------------------------------------------------------------
    @staticmethod
    def _refresh(r: Row) -> RefreshRecord:
        return RefreshRecord(
            r["id"],
            r["family"],
            r["org"],
            r["principal_kind"],
            r["principal_id"],
            tuple(r["scopes"].split()),
            bytes(r["secret_hash"]),
            r["created_at"],
            r["family_expires_at"],
            r["used_at"],
            r["revoked_at"],
            tuple(r["amr"].split()),
        )

    async def create_refresh_token(self, record: RefreshRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO refresh_tokens (id, family, org, principal_kind, principal_id, scopes,"
                " secret_hash, created_at, family_expires_at, used_at, revoked_at, amr)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, $10)",
                record.id,
                record.family,
                record.org,
                record.principal_kind,
                record.principal_id,
                " ".join(record.scopes),
                record.secret_hash,
                record.created_at,
                record.family_expires_at,
                " ".join(record.amr),
            )
        )

    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        """Mark used; returns the record as it was and whether this call spent it.
        The update is conditional: of two concurrent uses, the second waits for the
        first to commit and spends nothing; its next statement (READ COMMITTED: a new
        snapshot) reads the token as the winner left it, with the winner's ``used_at``
        as SQLite would show it."""

        async def run(c: PgConnection) -> tuple[RefreshRecord, bool] | None:
            row = await c.fetchrow(
                "UPDATE refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL RETURNING *",
                now,
                token_id,
            )
            if row is not None:
                return replace(self._refresh(row), used_at=None), True
            row = await c.fetchrow("SELECT * FROM refresh_tokens WHERE id = $1", token_id)
            return None if row is None else (self._refresh(row), False)

        return await self._tx(run)

    async def revoke_refresh_family(self, family: str, now: datetime) -> int:
        return await self._tx(
            lambda c: c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family = $2",
                now,
                family,
            )
        )

    async def family_revoked(self, family: str) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM refresh_tokens WHERE family = $1 AND revoked_at IS NOT NULL LIMIT 1", family
        )
        return bool(rows)

    # failed authentication -----------------------------------------------------------
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int:
        """Record one failure; returns the failures of ``subject`` within ``keep``.
        One statement: its count reads the table as it was before the statement's
        own delete and insert, hence the cutoff and the ``+ 1``. Failures other
        replicas have not committed yet are not counted, though none is lost."""
        return int(
            await self._tx(
                lambda c: c.fetchval(
                    "WITH pruned AS (DELETE FROM auth_failures WHERE at < $3),"
                    " added AS (INSERT INTO auth_failures (subject, at) VALUES ($1, $2))"
                    " SELECT COUNT(*) + 1 FROM auth_failures WHERE subject = $1 AND at >= $3",
                    subject,
                    now,
                    now - keep,
                )
            )
        )

    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        rows = await self._fetch(
            "SELECT COUNT(*) AS failures, MAX(at) AS last_at FROM auth_failures"
            " WHERE subject = $1 AND at >= $2",
            subject,
            since,
        )
        return int(rows[0]["failures"]), rows[0]["last_at"]

    async def clear_auth_failures(self, subject: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM auth_failures WHERE subject = $1", subject))

    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int:
        """One failed login from ``address``; returns its failures since it was last
        quiet for a whole ``window``. Addresses quiet that long are pruned. The
        upsert adds to the row as committed (it waits for a concurrent one), so
        replicas counting the same address lose no failure."""

        async def run(c: PgConnection) -> int:
            await c.execute("DELETE FROM address_failures WHERE last_at < $1", now - window)
            return int(
                await c.fetchval(
                    "INSERT INTO address_failures (address, failures, first_at, last_at)"
                    " VALUES ($1, 1, $2, $2)"
                    " ON CONFLICT (address) DO UPDATE"
                    " SET failures = address_failures.failures + 1, last_at = excluded.last_at"
                    " RETURNING failures",
                    address,
                    now,
                )
            )

        return await self._tx(run)

    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]:
        """Failures of ``address`` and its last one, if that was at or after ``since``."""
        rows = await self._fetch(
            "SELECT failures, last_at FROM address_failures WHERE address = $1 AND last_at >= $2",
            address,
            since,
        )
        if not rows:
            return 0, None
        return int(rows[0]["failures"]), rows[0]["last_at"]

    # audit ---------------------------------------------------------------------
    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry:
        return (await self._tx(lambda c: append_audit_entries(c, [event], chain)))[0]

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        """Entries and head from one snapshot (REPEATABLE READ): under READ COMMITTED
        each statement has its own, and an append landing between the two reads
        would look like entries removed from the end."""

        async def run(c: PgConnection) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            entries = [
                AuditEntry(
                    r["seq"],
                    AuditEvent(
                        r["action"],
                        r["actor"],
                        r["org"],
                        r["target"],
                        json.loads(r["details"]),
                        r["source_ip"],
                        r["at"],
                    ),
                    bytes(r["prev_hash"]),
                    bytes(r["hash"]),
                )
                for r in await c.fetch("SELECT * FROM audit_log ORDER BY seq")
            ]
            head = await c.fetchrow("SELECT seq, hash, mac FROM audit_head WHERE id = 1")
            return entries, ((head["seq"], bytes(head["hash"]), bytes(head["mac"])) if head else None)

        return await self._tx(run)
