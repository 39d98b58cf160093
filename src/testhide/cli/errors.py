"""Errors of the `testhide` command: each is one line on stderr and exit
status 125 (see `exitcodes`), never a number a job's own command uses.

CliError                   testhide itself failed; not the job
├── NotLoggedIn            no stored session, or a damaged one
├── WorkspaceTooLarge      the workspace is above --workspace-cap
├── ArtifactRefused        an artifact's path leaves the output directory, or its sha256 differs
└── RpcFailed              the control plane refused or failed a call (its status code is kept)
    └── ConnectionFailed   no answer from the control plane (UNAVAILABLE at the transport)
        ├── Unreachable    a call or stream could not be opened
        │   └── Misconnected   it answered, but not as the API port does: an untrusted
        │                      certificate, or the agent port (`cli/diagnose.py`)
        └── Disconnected   a stream that was open broke off; followers reconnect
"""

from __future__ import annotations

import os
import traceback

import click

from testhide.cli.exitcodes import TOOL_FAILED

_debugging = False


def debugging(on: bool) -> None:
    """``--debug``: gRPC's C core logs again (``testhide/__init__.py`` silences it
    unless GRPC_VERBOSITY says otherwise; it is read when gRPC starts, which is
    after the options are parsed), and `explain` shows tracebacks."""
    global _debugging
    _debugging = on
    if on and os.environ.get("GRPC_VERBOSITY", "NONE").upper() == "NONE":
        os.environ["GRPC_VERBOSITY"] = "INFO"


def explain(error: BaseException) -> None:
    """With ``--debug``, the traceback behind a one-line error, on stderr before it."""
    if _debugging and (error.__cause__ or error.__context__):
        click.echo("".join(traceback.format_exception(error)).rstrip(), err=True)


class CliError(click.ClickException):
    exit_code = TOOL_FAILED


class NotLoggedIn(CliError):
    pass


class WorkspaceTooLarge(CliError):
    pass


class ArtifactRefused(CliError):
    pass


class RpcFailed(CliError):
    """A refused or failed call: the server's message and its status code."""

    def __init__(self, code: str, details: str, hint: str = "") -> None:
        self.code = code
        self.details = details
        self.summary = f"{details or code} ({code.lower()})"
        super().__init__(f"{self.summary}; {hint}" if hint else self.summary)


class ConnectionFailed(RpcFailed):
    what = "cannot reach the control plane at"
    hint = "is the control plane running and reachable?"

    def __init__(self, server: str, details: str) -> None:
        self.server = server
        self.reason = details
        super().__init__("UNAVAILABLE", f"{self.what} {server}: {details}", self.hint)
        self.summary = f"{self.what} {server}: {details}"


class Unreachable(ConnectionFailed):
    pass


class Misconnected(Unreachable):
    """A connection that failed for a reason found and named: the one line says what to do."""

    def __init__(self, server: str, line: str) -> None:
        CliError.__init__(self, line)  # the line alone: no status code, no generic hint
        self.code, self.details, self.server = "UNAVAILABLE", line, server
        self.reason = self.summary = line


class Disconnected(ConnectionFailed):
    what = "lost the connection to the control plane at"
