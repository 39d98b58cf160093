"""``--since``: a duration back from now (``2h``, ``3d``) or an RFC 3339 time (UTC unless it
has an offset), for the commands of both the CLI and the control plane."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from testhide.common.durations import parse_duration


class Since(click.ParamType[datetime, str | datetime]):
    name = "since"

    def convert(
        self, value: str | datetime, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.now(UTC) - parse_duration(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is neither a duration (2h, 3d) nor an RFC 3339 time", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
