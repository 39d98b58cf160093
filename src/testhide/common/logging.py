"""structlog set-up shared by the daemons: key=value or JSON, secrets redacted.

The level and the format can change while a daemon runs (SIGHUP): loggers are
cached on first use with the processors of their time, so the level filter and
the renderer are processors that read the current choice at every event."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Exact keys, not substrings: `token_id` and `secret_name` name a credential without being one, and
# an operator needs them in the log; the value of `token` or `secret` must never get there.
SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "enrollment_token",
        "api_key",
        "password",
        "secret",
        "secret_value",
        "private_key",
        "authorization",
        "master_key",
        "key_pem",
    }
)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the values of credential fields, matched by exact (case-insensitive) key."""
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "[redacted]"
    return event


LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels ``--log-level`` takes."""

_LEVEL_OF_METHOD = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Output:
    """What ``configure`` chose last; read by the processors below at every event."""

    level = logging.INFO
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False)


def _below_level(_: Any, method_name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _LEVEL_OF_METHOD.get(method_name, logging.CRITICAL) < _Output.level:
        raise structlog.DropEvent
    return event


def _render(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> Any:
    return _Output.renderer(logger, method_name, event)


def configure(level: str = "info", json_output: bool = False) -> None:
    """Log at ``level`` (one of LEVELS) and above to stderr; call again to change either."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    _Output.level = logging.getLevelNamesMapping()[level.upper()]
    _Output.renderer = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            _below_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
