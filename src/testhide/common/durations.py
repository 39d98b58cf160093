"""Human durations such as ``90s``, ``10m`` or ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

import click

_PART = re.compile(r"(\d{1,9})(ms|s|m|h|d)", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Far beyond any lifetime or timeout we accept, far below timedelta's limit.
_MAX_SECONDS = 100 * 365 * 86400


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``-style text; a bare number means seconds. Only ValueError escapes."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        if len(text) > 12 or int(text) > _MAX_SECONDS:
            raise ValueError(f"duration {text[:20]!r} is too long")
        return timedelta(seconds=int(text))
    pos, seconds = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text[:40]!r}: use forms like 90s, 10m, 1h30m")
    if seconds > _MAX_SECONDS:
        raise ValueError(f"duration {text[:20]!r} is too long")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


class Duration(click.ParamType[timedelta, str | timedelta]):
    """A click option type for the forms above."""

    name = "duration"

    def convert(
        self, value: str | timedelta, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        try:
            return parse_duration(value) if isinstance(value, str) else value
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
