"""What replicas sharing one PostgreSQL database know of each other: which
replicas are alive (a heartbeat row each), which one holds a cluster-wide
role such as the lease sweep (a lease row, renewed by its holder; not an
advisory lock, which connection poolers break), which replica holds each
agent's stream, notifications (LISTEN/NOTIFY on one channel), and the data
dir's shared files (sealed under the master key; see controlplane/shared.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta

from testhide.controlplane.store.pg_common import PgConnection, PgParts
from testhide.controlplane.store.pgdriver import PgDriver, unavailable

CHANNEL = "testhide"
REPLICA_ROWS_KEPT = timedelta(days=1)


class PgCluster(PgParts):
    _driver: PgDriver

    async def replica_alive(
        self, replica: str, now: datetime, api: str, agent: str, key_ids: tuple[str, ...] = ()
    ) -> None:
        """The replica's heartbeat: its addresses and the master keys it holds (current first)."""

        async def run(c: PgConnection) -> None:
            await c.execute(
                "INSERT INTO replicas (id, started_at, seen_at, api, agent, key_ids, host, pid)"
                " VALUES ($1, $2, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, api = excluded.api,"
                " agent = excluded.agent, key_ids = excluded.key_ids",
                replica,
                now,
                api,
                agent,
                " ".join(key_ids),
                socket.gethostname(),
                os.getpid(),
            )

        await self._tx(run)

    async def replica_key_ids(self, alive_since: datetime) -> list[tuple[str, str, int, tuple[str, ...]]]:
        """(replica, host, pid, master key ids) of the live replicas."""
        rows = await self._fetch(
            "SELECT id, host, pid, key_ids FROM replicas WHERE seen_at >= $1 ORDER BY id", alive_since
        )
        return [(r["id"], r["host"], r["pid"], tuple(r["key_ids"].split())) for r in rows]

    # the data dir's shared files --------------------------------------------------------
    async def shared_version(self) -> int:
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) AS v FROM shared_files")
        return int(rows[0]["v"])

    async def shared_files(self, since: int) -> list[tuple[str, str, bytes | None, int]]:
        """(name, digest, sealed data or None when removed, version) changed after ``since``."""
        rows = await self._fetch(
            "SELECT name, digest, data, version FROM shared_files WHERE version > $1 ORDER BY version", since
        )
        return [(r["name"], r["digest"], r["data"], r["version"]) for r in rows]

    async def put_shared_files(self, files: list[tuple[str, str, bytes | None]]) -> int:
        """Writes (name, digest, sealed data or None to remove) in one transaction; the new version."""

        async def run(c: PgConnection) -> int:
            version = int(await c.fetchval("SELECT nextval('shared_files_version')"))
            for name, digest, data in files:
                await c.execute(
                    "INSERT INTO shared_files (name, digest, data, version) VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, data = excluded.data,"
                    " version = excluded.version",
                    name,
                    digest,
                    data,
                    version,
                )
            return version

        return await self._tx(run)

    async def replica_gone(self, replica: str) -> None:
        """A replica that stops cleanly: its roles and agents are free at once."""

        async def run(c: PgConnection) -> None:
            await c.execute("DELETE FROM roles WHERE holder = $1", replica)
            await c.execute("UPDATE agents SET replica = '' WHERE replica = $1", replica)
            await c.execute("DELETE FROM replicas WHERE id = $1", replica)

        await self._tx(run)

    async def prune_replicas(self, now: datetime) -> int:
        return await self._tx(
            lambda c: c.execute("DELETE FROM replicas WHERE seen_at < $1", now - REPLICA_ROWS_KEPT)
        )

    async def live_replicas(self, since: datetime) -> list[tuple[str, str, str]]:
        """(id, API address, agent address) of the replicas seen since ``since``."""
        rows = await self._fetch("SELECT id, api, agent FROM replicas WHERE seen_at >= $1 ORDER BY id", since)
        return [(r["id"], r["api"], r["agent"]) for r in rows]

    async def claim_role(self, role: str, holder: str, now: datetime, until: datetime) -> bool:
        """Take or renew ``role`` until ``until``: only when nobody holds it, the
        holder is ``holder`` already, or the holder's lease lapsed."""
        row = await self._tx(
            lambda c: c.fetchrow(
                "INSERT INTO roles (name, holder, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE roles.holder = excluded.holder OR roles.expires_at < $4"
                " RETURNING holder",
                role,
                holder,
                until,
                now,
            )
        )
        return row is not None

    async def set_agent_replica(self, org: str, agent_id: str, replica: str) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE agents SET replica = $1 WHERE org = $2 AND id = $3", replica, org, agent_id
            )
        )

    async def clear_agent_replica(self, agent_id: str, replica: str) -> None:
        """Only if ``replica`` still holds it: a newer stream elsewhere keeps its mark."""
        await self._tx(
            lambda c: c.execute(
                "UPDATE agents SET replica = '' WHERE id = $1 AND replica = $2", agent_id, replica
            )
        )

    async def agent_replica(self, org: str, agent_id: str, alive_since: datetime) -> str:
        """The live replica that holds the agent's stream, or ''."""
        rows = await self._fetch(
            "SELECT a.replica FROM agents a JOIN replicas r ON r.id = a.replica"
            " WHERE a.org = $1 AND a.id = $2 AND r.seen_at >= $3",
            org,
            agent_id,
            alive_since,
        )
        return str(rows[0]["replica"]) if rows else ""

    async def notify(self, payloads: list[str]) -> None:
        """Sent on their own, after (never inside) the writes they announce:
        NOTIFY takes a cluster-wide lock at commit."""
        await self._read(
            lambda c: c.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, payloads)
        )

    async def listen(self, on_message: Callable[[str], None], on_listening: Callable[[], None]) -> None:
        """Until the listening connection is lost (see PgDriver.listen)."""
        try:
            await self._driver.listen(CHANNEL, on_message, on_listening)
        except Exception as exc:
            mapped = unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise
