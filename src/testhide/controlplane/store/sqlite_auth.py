"""Credentials in the SQLite store: API keys, users, refresh tokens (sessions),
failed logins by subject and by address, and the audit chain. Mixed into
SqliteStore, which provides the transaction runner."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta

from testhide.controlplane.auth.audit import GENESIS, AuditChain, AuditEntry, AuditEvent
from testhide.controlplane.store.base import ApiKeyRecord, OrgRecord, RefreshRecord, UserRecord
from testhide.controlplane.store.sqlite_common import SqliteParts, _dt, _ts


def append_audit_entries(
    c: sqlite3.Connection, events: Sequence[AuditEvent], chain: AuditChain
) -> list[AuditEntry]:
    """``events`` chained in order after the head, within the caller's transaction:
    one head read and one head write for all of them, the same chain as one
    append each."""
    head = c.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    seq, prev = (head["seq"], bytes(head["hash"])) if head else (0, GENESIS)
    entries = []
    for event in events:
        seq += 1
        entry = chain.entry(seq, prev, event)
        entries.append(entry)
        prev = entry.hash
    if not entries:
        return entries
    c.executemany(
        "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.seq,
                _ts(e.event.at),
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
    c.execute(
        "INSERT INTO audit_head VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
        (seq, prev, chain.head_mac(seq, prev)),
    )
    return entries


class SqliteAuth(SqliteParts):
    # organisations and their access policy ---------------------------------------------
    @staticmethod
    def _org(r: sqlite3.Row) -> OrgRecord:
        seconds = r["admin_key_max_lifetime_s"]
        return OrgRecord(
            r["name"],
            _dt(r["created_at"]) or datetime.min,
            _dt(r["revoked_at"]),
            None if seconds is None else timedelta(seconds=seconds),
        )

    async def list_org_records(self) -> list[OrgRecord]:
        return [self._org(r) for r in await self._query("SELECT * FROM orgs ORDER BY name")]

    async def get_org(self, org: str) -> OrgRecord | None:
        rows = await self._query("SELECT * FROM orgs WHERE name = ?", (org,))
        return self._org(rows[0]) if rows else None

    async def set_admin_key_max_lifetime(self, org: str, lifetime: timedelta | None) -> OrgRecord | None:
        seconds = None if lifetime is None else int(lifetime.total_seconds())

        def run(c: sqlite3.Connection) -> OrgRecord | None:
            c.execute("UPDATE orgs SET admin_key_max_lifetime_s = ? WHERE name = ?", (seconds, org))
            row = c.execute("SELECT * FROM orgs WHERE name = ?", (org,)).fetchone()
            return self._org(row) if row else None

        return await self._tx(run)

    # API keys ------------------------------------------------------------------
    async def create_api_key(self, record: ApiKeyRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO api_keys"
                " (id, org, name, secret_hash, scopes, created_at, revoked_at, owner, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.name,
                    record.secret_hash,
                    " ".join(record.scopes),
                    _ts(record.created_at),
                    _ts(record.revoked_at),
                    record.owner,
                    _ts(record.expires_at),
                ),
            )
        )

    @staticmethod
    def _api_key(r: sqlite3.Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            r["id"],
            r["org"],
            r["name"],
            r["secret_hash"],
            tuple(r["scopes"].split()),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["revoked_at"]),
            r["owner"],
            _dt(r["expires_at"]),
            _dt(r["last_used_at"]),
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self._api_key(rows[0]) if rows else None

    async def list_api_keys(self, org: str) -> list[ApiKeyRecord]:
        return [
            self._api_key(r)
            for r in await self._query("SELECT * FROM api_keys WHERE org = ? ORDER BY created_at", (org,))
        ]

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_ts(now), key_id))
        )

    async def revoke_api_key(self, org: str, key_id: str, now: datetime) -> ApiKeyRecord | None:
        """Revoke the key and every session (refresh family) it opened."""

        def run(c: sqlite3.Connection) -> ApiKeyRecord | None:
            if (
                c.execute(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE org = ? AND id = ?",
                    (_ts(now), org, key_id),
                ).rowcount
                != 1
            ):
                return None
            c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE principal_kind = 'api_key' AND principal_id = ?",
                (_ts(now), key_id),
            )
            return self._api_key(c.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone())

        return await self._tx(run)

    # users ------------------------------------------------------------------------
    @staticmethod
    def _user(r: sqlite3.Row) -> UserRecord:
        return UserRecord(
            r["id"],
            r["org"],
            r["name"],
            r["password_hash"],
            tuple(r["scopes"].split()),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["revoked_at"]),
        )

    async def create_user(self, record: UserRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.org,
                    record.name,
                    record.password_hash,
                    " ".join(record.scopes),
                    _ts(record.created_at),
                    None,
                ),
            )
        )

    async def find_user(self, org: str, name: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND name = ?", (org, name))
        return self._user(rows[0]) if rows else None

    async def get_user(self, org: str, user_id: str) -> UserRecord | None:
        rows = await self._query("SELECT * FROM users WHERE org = ? AND id = ?", (org, user_id))
        return self._user(rows[0]) if rows else None

    async def list_users(self, org: str) -> list[UserRecord]:
        return [
            self._user(r)
            for r in await self._query("SELECT * FROM users WHERE org = ? ORDER BY name", (org,))
        ]

    async def revoke_user(self, org: str, name: str, now: datetime) -> UserRecord | None:
        def run(c: sqlite3.Connection) -> UserRecord | None:
            row = c.execute("SELECT * FROM users WHERE org = ? AND name = ?", (org, name)).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE users SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (_ts(now), row["id"])
            )
            c.execute(
                "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE principal_kind = 'user' AND principal_id = ?",
                (_ts(now), row["id"]),
            )
            return self._user(c.execute("SELECT * FROM users WHERE id = ?", (row["id"],)).fetchone())

        return await self._tx(run)

    # refresh tokens ---------------------------------------------------------------------
    @staticmethod
    def _refresh(r: sqlite3.Row) -> RefreshRecord:
        return RefreshRecord(
            r["id"],
            r["family"],
            r["org"],
            r["principal_kind"],
            r["principal_id"],
            tuple(r["scopes"].split()),
            bytes(r["secret_hash"]),
            _dt(r["created_at"]) or datetime.min,
            _dt(r["family_expires_at"]) or datetime.min,
            _dt(r["used_at"]),
            _dt(r["revoked_at"]),
            tuple(r["amr"].split()),
        )

    async def create_refresh_token(self, record: RefreshRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO refresh_tokens (id, family, org, principal_kind, principal_id, scopes,"
                " secret_hash, created_at, family_expires_at, used_at, revoked_at, amr)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.family,
                    record.org,
                    record.principal_kind,
                    record.principal_id,
                    " ".join(record.scopes),
                    record.secret_hash,
                    _ts(record.created_at),
                    _ts(record.family_expires_at),
                    None,
                    None,
                    " ".join(record.amr),
                ),
            )
        )

    async def spend_refresh_token(self, token_id: str, now: datetime) -> tuple[RefreshRecord, bool] | None:
        """Mark used; returns the record as it was and whether this call spent it."""

        def run(c: sqlite3.Connection) -> tuple[RefreshRecord, bool] | None:
            row = c.execute("SELECT * FROM refresh_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return None
            spent = (
                c.execute(
                    "UPDATE refresh_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                    (_ts(now), token_id),
                ).rowcount
                == 1
            )
            return self._refresh(row), spent

        return await self._tx(run)

    async def revoke_refresh_family(self, family: str, now: datetime) -> int:
        return await self._tx(
            lambda c: (
                c.execute(
                    "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family = ?",
                    (_ts(now), family),
                ).rowcount
            )
        )

    async def family_revoked(self, family: str) -> bool:
        rows = await self._query(
            "SELECT 1 FROM refresh_tokens WHERE family = ? AND revoked_at IS NOT NULL LIMIT 1", (family,)
        )
        return bool(rows)

    # failed authentication -----------------------------------------------------------
    async def record_auth_failure(self, subject: str, now: datetime, keep: timedelta) -> int:
        """Record one failure; returns the failures of ``subject`` within ``keep``."""

        def run(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM auth_failures WHERE at < ?", (_ts(now - keep),))
            c.execute("INSERT INTO auth_failures VALUES (?, ?)", (subject, _ts(now)))
            return int(
                c.execute("SELECT COUNT(*) FROM auth_failures WHERE subject = ?", (subject,)).fetchone()[0]
            )

        return await self._tx(run)

    async def auth_failures(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        rows = await self._query(
            "SELECT COUNT(*), MAX(at) FROM auth_failures WHERE subject = ? AND at >= ?", (subject, _ts(since))
        )
        return int(rows[0][0]), _dt(rows[0][1])

    async def clear_auth_failures(self, subject: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM auth_failures WHERE subject = ?", (subject,)))

    async def record_address_failure(self, address: str, now: datetime, window: timedelta) -> int:
        """One failed login from ``address``; returns its failures since it was last
        quiet for a whole ``window``. Addresses quiet that long are pruned."""

        def run(c: sqlite3.Connection) -> int:
            cutoff = _ts(now - window)
            c.execute("DELETE FROM address_failures WHERE last_at < ?", (cutoff,))
            c.execute(
                "INSERT INTO address_failures (address, failures, first_at, last_at) VALUES (?, 1, ?, ?)"
                " ON CONFLICT (address) DO UPDATE SET failures = failures + 1, last_at = excluded.last_at",
                (address, _ts(now), _ts(now)),
            )
            row = c.execute("SELECT failures FROM address_failures WHERE address = ?", (address,)).fetchone()
            return int(row[0])

        return await self._tx(run)

    async def address_failures(self, address: str, since: datetime) -> tuple[int, datetime | None]:
        """Failures of ``address`` and its last one, if that was at or after ``since``."""
        rows = await self._query(
            "SELECT failures, last_at FROM address_failures WHERE address = ? AND last_at >= ?",
            (address, _ts(since)),
        )
        if not rows:
            return 0, None
        return int(rows[0][0]), _dt(rows[0][1])

    # audit ---------------------------------------------------------------------
    async def append_audit(self, event: AuditEvent, chain: AuditChain) -> AuditEntry:
        return (await self._tx(lambda c: append_audit_entries(c, [event], chain)))[0]

    async def read_audit(self) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
        def run(c: sqlite3.Connection) -> tuple[list[AuditEntry], tuple[int, bytes, bytes] | None]:
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
                        _dt(r["at"]) or datetime.min,
                    ),
                    bytes(r["prev_hash"]),
                    bytes(r["hash"]),
                )
                for r in c.execute("SELECT * FROM audit_log ORDER BY seq")
            ]
            head = c.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
            return entries, ((head["seq"], bytes(head["hash"]), bytes(head["mac"])) if head else None)

        return await self._tx(run, write=False)
