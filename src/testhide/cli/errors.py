"""Errors of the `testhide` command: each is one line on stderr and exit
status 125 (see `exitcodes`), never a number a job's own command uses.

CliError                   testhide itself failed; not the job
├── NotLoggedIn            no stored session, or a damaged one
├── WorkspaceTooLarge      the workspace is above --workspace-cap
├── ArtifactRefused        an artifact's path leaves the output directory, or its sha256 differs
└── RpcFailed              the control plane refused or failed a call (its status code is kept)
    └── ConnectionFailed   no answer from the control plane (UNAVAILABLE at the transport)
        ├── Unreachable    a call or stream could not be opened
        └── Disconnected   a stream that was open broke off; followers reconnect
"""

from __future__ import annotations

import click

from testhide.cli.exitcodes import TOOL_FAILED


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


class Disconnected(ConnectionFailed):
    what = "lost the connection to the control plane at"
