"""What the operator's commands share: running a coroutine with domain errors
shown as messages, and the data-dir option."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from testhide.controlplane.errors import ControlPlaneError

T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    envvar="TESTHIDE_DATA_DIR",
    help="The control plane's data directory.",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from exc
