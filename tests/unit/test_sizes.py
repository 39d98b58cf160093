"""common/sizes.py: one strict size parser, its formatter and its click type,
and the size options of the three programs that use them."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.common.sizes import MAX_SIZE, GiB, KiB, MiB, Size, TiB, format_size, parse_size

PROPS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("10GiB", 10 * GiB),
        ("4KiB", 4 * KiB),
        ("1TiB", TiB),
        ("4096", 4096),
        ("4096B", 4096),
        ("0", 0),
        ("0B", 0),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5KiB", 512),
        ("  64MiB  ", 64 * MiB),
        ("512mib", 512 * MiB),
        # Docker's one-letter forms are binary, as in `docker run --memory 512m`.
        ("512m", 512 * MiB),
        ("2g", 2 * GiB),
        ("2G", 2 * GiB),
        ("2k", 2 * KiB),
        ("1t", TiB),
        ("8388607TiB", 8388607 * TiB),
        (str(MAX_SIZE), MAX_SIZE),
    ],
)
def test_valid_forms(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "invalid size"),
        ("   ", "invalid size"),
        ("abc", "invalid size"),
        ("MiB", "invalid size"),
        ("10XiB", "units are"),
        ("10 MiB", "invalid size"),
        ("1,5MiB", "invalid size"),
        ("1..5MiB", "invalid size"),
        ("1e3", "invalid size"),
        ("0x10", "invalid size"),
        ("１０MiB", "invalid size"),  # full-width digits  # noqa: RUF001
        ("-5MiB", "cannot be negative"),
        ("-1", "cannot be negative"),
        ("10GB", "ambiguous"),
        ("10MB", "ambiguous"),
        ("10kb", "ambiguous"),
        ("1TB", "ambiguous"),
        ("1.5", "whole number of bytes"),
        ("0.1KiB", "whole number of bytes"),
        ("8388608TiB", "too large"),
        (str(MAX_SIZE + 1), "too large"),
        ("9" * 21, "invalid size"),
        ("1." + "5" * 10 + "GiB", "invalid size"),
    ],
)
def test_invalid_forms_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_size(text)


def test_an_ambiguous_unit_is_answered_with_the_binary_one() -> None:
    with pytest.raises(ValueError, match="write 10GiB or the number of bytes"):
        parse_size("10GB")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512 * MiB, "512MiB"),
        (10 * GiB, "10GiB"),
        (4 * KiB, "4KiB"),
        (TiB, "1TiB"),
        (1000, "1000B"),
        (0, "0B"),
    ],
)
def test_format_size_is_the_shortest_exact_form(size: int, text: str) -> None:
    assert format_size(size) == text


@PROPS
@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_every_size_survives_format_then_parse(size: int) -> None:
    assert parse_size(format_size(size)) == size


@PROPS
@given(st.text(max_size=30))
def test_arbitrary_text_only_ever_raises_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert 0 <= size <= MAX_SIZE


@click.command()
@click.option("--cap", type=Size(min=4 * KiB, max=GiB), default="64KiB")
def _cap(cap: int) -> None:
    click.echo(cap)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        ([], 0, str(64 * KiB)),
        (["--cap", "1MiB"], 0, str(MiB)),
        (["--cap", "4096"], 0, "4096"),
        (["--cap", "1KiB"], 2, "1KiB is below the least allowed, 4KiB"),
        (["--cap", "2GiB"], 2, "2GiB is above the most allowed, 1GiB"),
        (["--cap", "lots"], 2, "Invalid value for '--cap': invalid size 'lots'"),
    ],
)
def test_the_click_type_converts_and_bounds(args: list[str], code: int, says: str) -> None:
    result = CliRunner().invoke(_cap, args)
    assert result.exit_code == code, result.output
    assert says in result.output


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_the_click_type_refuses_what_is_neither_text_nor_bytes(value: object) -> None:
    with pytest.raises(click.BadParameter, match="a size must be"):
        Size().convert(value, None, None)  # type: ignore[arg-type]


def test_an_int_is_a_number_of_bytes() -> None:
    assert Size().convert(4096, None, None) == 4096


# ------------------------------------------------------ the programs' size options


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--memory", "abc", "invalid size 'abc'"),
        ("--memory", "10GB", "ambiguous"),
        ("--memory", "-1g", "cannot be negative"),
        ("--workspace-cap", "lots", "invalid size 'lots'"),
    ],
)
def test_testhide_run_says_what_is_wrong_with_a_size(
    option: str, value: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testhide.cli.commands import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["run", option, value, "--image", "x", "--", "true"])
    assert result.exit_code == 125, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert says in result.output
    assert "invalid literal" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_agent_spool_takes_a_size_and_keeps_its_floor(tmp_path: Path) -> None:
    from testhide.agent.cli import main

    args = ["run", "--data-dir", str(tmp_path), "--print-config"]
    result = CliRunner().invoke(main, [*args, "--spool-max", "1GiB"])
    assert result.exit_code == 0, result.output
    assert 'spool-max = "1GiB"  # flag' in result.output
    result = CliRunner().invoke(main, [*args, "--spool-max", "1MiB"])
    assert result.exit_code == 2
    assert "1MiB is below the least allowed, 4MiB" in result.output


def test_serve_takes_the_largest_request_as_a_size(tmp_path: Path) -> None:
    from testhide.controlplane.cli import main

    args = ["serve", "--data-dir", str(tmp_path), "--print-config"]
    result = CliRunner().invoke(main, [*args, "--max-request-size", "8MiB"])
    assert result.exit_code == 0, result.output
    assert 'max-request-size = "8MiB"  # flag' in result.output
    result = CliRunner().invoke(main, [*args, "--max-request-size", "100MiB"])
    assert result.exit_code == 2
    assert "100MiB is above the most allowed, 64MiB" in result.output
