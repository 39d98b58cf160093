"""Request budgets and failed-authentication spikes in the PostgreSQL store,
shared by every replica (``auth/limits.py`` has the in-process versions that
a SQLite control plane uses, and the callers of these).

A token bucket is one row per key: a take is one statement, an upsert that
refills the bucket from the time it was last touched, takes a token if there
is a whole one, and says whether it did. The time is the database's
(``now()``), never a replica's, so replicas whose clocks disagree share one
budget. Of two takes from one bucket, the later waits for the earlier's row
lock and refills from what it left; ``now()`` is when a statement's
transaction began, so a take that waited for the lock may run with a time
before the bucket's: elapsed time is never negative and ``updated_at`` never
goes back, so a bucket hands out at most ``burst + rate * elapsed`` tokens,
whatever the interleaving. The table is UNLOGGED: a take costs no WAL flush,
and after a crash or on a promoted standby the buckets start full, which is
what a bucket idle for ``burst / rate`` seconds would be anyway.

A spike is counted per subject (``ip:…``, ``account:…``) in one row: the
latest failures within the window (at most ``threshold`` of them, as the
in-process detector keeps them) and when its alert was last raised. The
upsert that adds a failure also decides, under the row lock, whether this
failure raises the window's alert, and marks it with a token of its own: the
replica whose token the row returns is the one that raised it, so the alert
is raised once across replicas.

Rows idle for an hour are pruned by ``prune_limits``, which the shared rate
limiters call now and then."""

from __future__ import annotations

import secrets
from datetime import timedelta

from testhide.controlplane.store.pg_common import PgConnection, PgParts

LIMITS_IDLE = timedelta(hours=1)
"""A bucket or spike row untouched this long is pruned: a bucket refills within
``burst / rate`` seconds, a spike window is shorter than this."""

# The statements are put together from these constant fragments (no input: S608 does not apply).
# The bucket's tokens refilled to now ($2: tokens per second, $3: burst). Each
# use is evaluated against the row as it was before this statement.
_REFILLED = (
    "LEAST($3::float8, b.tokens + $2::float8 * GREATEST(0, EXTRACT(EPOCH FROM now() - b.updated_at)::float8))"
)
_TAKE = (
    "INSERT INTO rate_buckets AS b (key, tokens, updated_at, denied)"  # noqa: S608
    " VALUES ($1, GREATEST($3::float8 - 1, 0), now(), $3::float8 < 1)"
    " ON CONFLICT (key) DO UPDATE SET"
    f" tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} END,"
    f" denied = {_REFILLED} < 1,"
    " updated_at = GREATEST(b.updated_at, now())"
    " RETURNING denied, tokens"
)

# $2: threshold, $3: window in seconds, $4: this call's alert token.
_SINCE = "now() - make_interval(secs => $3::float8)"
_RECENT = (
    "(SELECT array_agg(t ORDER BY t) FROM"  # noqa: S608
    f" (SELECT t FROM unnest(s.failures || now()) AS u(t) WHERE t >= {_SINCE}"
    " ORDER BY t DESC LIMIT $2::int) AS recent)"
)
_SPIKE = (
    f"(SELECT count(*) FROM unnest(s.failures) AS u(t) WHERE t >= {_SINCE}) + 1 >= $2::int"  # noqa: S608
    f" AND (s.alerted_at IS NULL OR s.alerted_at <= {_SINCE})"
)
_FAILURE = (
    "INSERT INTO auth_spikes AS s (subject, failures, alerted_at, alert, last_at)"  # noqa: S608
    " VALUES ($1, ARRAY[now()], CASE WHEN $2::int <= 1 THEN now() END,"
    " CASE WHEN $2::int <= 1 THEN $4 ELSE '' END, now())"
    " ON CONFLICT (subject) DO UPDATE SET"
    f" failures = {_RECENT},"
    f" alerted_at = CASE WHEN {_SPIKE} THEN now() ELSE s.alerted_at END,"
    f" alert = CASE WHEN {_SPIKE} THEN $4 ELSE s.alert END,"
    " last_at = GREATEST(s.last_at, now())"
    " RETURNING s.alert = $4 AS alerted, cardinality(s.failures) AS failures"
)


class PgLimits(PgParts):
    async def take_rate_token(self, key: str, rate_per_s: float, burst: int) -> float:
        """Takes a token from ``key``'s bucket: 0 when it did, else the seconds until
        one will be there. One statement (its own transaction)."""
        row = await self._read(lambda c: c.fetchrow(_TAKE, key, rate_per_s, burst))
        assert row is not None  # an upsert returns its row
        if not row["denied"]:
            return 0.0
        return max((1 - float(row["tokens"])) / rate_per_s, 1e-3)

    async def count_auth_failure(self, subject: str, threshold: int, window_s: float) -> tuple[bool, int]:
        """One failed authentication of ``subject``: whether it raises the alert
        (``threshold`` failures within ``window_s``, the last alert of the subject
        a whole window ago; true for one call across replicas) and how many
        failures the window holds now, counted up to ``threshold``."""
        token = secrets.token_hex(8)
        row = await self._read(lambda c: c.fetchrow(_FAILURE, subject, threshold, window_s, token))
        assert row is not None  # an upsert returns its row
        return bool(row["alerted"]), int(row["failures"])

    async def prune_limits(self, idle: timedelta = LIMITS_IDLE) -> int:
        """Forgets the buckets and spike counts untouched for ``idle``; how many."""
        seconds = idle.total_seconds()

        async def run(c: PgConnection) -> int:
            buckets = await c.execute(
                "DELETE FROM rate_buckets WHERE updated_at < now() - make_interval(secs => $1::float8)",
                seconds,
            )
            spikes = await c.execute(
                "DELETE FROM auth_spikes WHERE last_at < now() - make_interval(secs => $1::float8)", seconds
            )
            return buckets + spikes

        return await self._read(run)
