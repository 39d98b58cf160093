"""Sizes written the same way everywhere: ``512MiB``, ``10GiB``, ``4KiB``, or a
plain number of bytes.

One strict parser for every size option of the three programs. Binary units
only (``KiB``, ``MiB``, ``GiB``, ``TiB``; ``B`` for bytes); Docker's one-letter
forms (``k``, ``m``, ``g``, ``t``) mean the same binary units, as they do in
``docker run --memory 512m``. ``10GB`` is refused rather than guessed at: people
mean 10^9 or 2^30 by it, and a memory limit 7% off is a job killed for nothing.
A fraction is accepted when it comes to whole bytes (``1.5GiB``, not ``0.1KiB``);
negatives, spaces inside, anything else, and more than 2^63 - 1 bytes (the wire's
int64) are refused."""

from __future__ import annotations

import re
from fractions import Fraction

import click

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
MAX_SIZE = 2**63 - 1

_SIZE = re.compile(r"(\d{1,20})(?:\.(\d{1,9}))?([a-z]*)", re.ASCII | re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
}
_AMBIGUOUS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}
_NAMES = (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def parse_size(text: str) -> int:
    """Bytes in ``text`` (forms above); only ValueError escapes."""
    text = text.strip()
    shown = text[:40]
    if text.startswith("-"):
        raise ValueError(f"invalid size {shown!r}: a size cannot be negative")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {shown!r}: use forms like 512MiB, 10GiB, 4KiB or a number of bytes")
    whole, fraction, unit = match.groups()
    if unit.lower() in _AMBIGUOUS:
        number = text[: len(text) - len(unit)]
        raise ValueError(
            f"size {shown!r} is ambiguous (10^n or 2^n bytes?): "
            f"write {number}{_AMBIGUOUS[unit.lower()]} or the number of bytes"
        )
    if unit.lower() not in _UNITS:
        raise ValueError(f"invalid size {shown!r}: units are B, KiB, MiB, GiB, TiB")
    exact = (int(whole) + Fraction(int(fraction or 0), 10 ** len(fraction or ""))) * _UNITS[unit.lower()]
    if exact.denominator != 1:
        raise ValueError(f"size {shown!r} is not a whole number of bytes")
    if exact > MAX_SIZE:
        raise ValueError(f"size {shown!r} is too large")
    return int(exact)


def format_size(size: int) -> str:
    """The shortest exact form: ``format_size(512 * MiB) == "512MiB"``, ``"1000B"``."""
    for name, unit in _NAMES:
        if size and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


def describe_size(size: int) -> str:
    """For people: ``10 bytes``, ``256 MiB``, ``1.5 GiB``; never rounded to 0."""
    if size < KiB:
        return f"{size} byte{'' if size == 1 else 's'}"
    for name, unit in _NAMES:
        if size >= unit:
            exact = size % unit == 0
            return f"{size // unit} {name}" if exact else f"{size / unit:.1f} {name}"
    raise AssertionError("unreachable: size >= KiB")


class Size(click.ParamType[int, str | int]):
    """A click option type for the forms above, within optional bounds. An int
    (from a TOML file, or a default) is a number of bytes.

    ``unitless_min``: text without a unit below this many bytes is refused, for
    an option where ``10`` is surely not meant as 10 bytes (``--workspace-cap 10``)."""

    name = "size"

    def __init__(self, min: int = 0, max: int = MAX_SIZE, unitless_min: int = 0) -> None:
        self.min, self.max, self.unitless_min = min, max, unitless_min

    def convert(self, value: str | int, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            self.fail(f"a size must be text like 512MiB or a number of bytes, not {value!r}", param, ctx)
        try:
            size = parse_size(value) if isinstance(value, str) else value
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if isinstance(value, str) and value.strip().isdigit() and size < self.unitless_min:
            self.fail(
                f"{value.strip()!r} without a unit is {describe_size(size)}; write the unit, "
                f"e.g. {value.strip()}MiB or {value.strip()}GiB (or {value.strip()}B for bytes)",
                param,
                ctx,
            )
        if size < self.min:
            self.fail(f"{format_size(size)} is below the least allowed, {format_size(self.min)}", param, ctx)
        if size > self.max:
            self.fail(f"{format_size(size)} is above the most allowed, {format_size(self.max)}", param, ctx)
        return size
