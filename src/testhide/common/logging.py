"""structlog set-up shared by the daemons: key=value or JSON, secrets redacted."""

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


def configure(level: str = "info", json_output: bool = False) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
