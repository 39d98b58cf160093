"""Why a control plane that answers TCP did not connect, in one line that says
what to do. gRPC's own words name the mechanism ("Socket closed", "Tls
handshake failed ... CERTIFICATE_VERIFY_FAILED") but not the cause, so after
a connection fails the server is looked at once more, with Python's own TLS:

- its certificate does not verify against the CA of the session (or the
  system's): the engineer needs ``--ca-file``;
- the TLS handshake completes but the server closes the connection without a
  word of HTTP/2, as a server does that requires a client certificate we did
  not send: that is the control plane's agent port (mutual TLS, for agents),
  while the CLI talks to its API port.

Anything else (a refused port, a timeout, a server that speaks) keeps gRPC's
error. Only the server's handshake and first frame are read; nothing is sent
but TLS and the HTTP/2 connection preface."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from testhide.cli.errors import Misconnected, Unreachable
from testhide.common.tls import split_target

PROBE_WITHIN_S = 3.0
# The client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 3.4).
# gRPC's words for a failure before TLS, where there is nothing to find out.
_NOT_TLS = ("connection refused", "deadline", "timeout", "timed out", "dns", "resolve", "unreachable")
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _context(ca_pem: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem) if verify and ca_pem else ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def _untrusted(host: str, port: int, ca_pem: str | None, within: float) -> str | None:
    """Why the server's certificate does not verify, or None if it does (or no handshake happened)."""
    try:
        with (
            socket.create_connection((host, port), timeout=within) as raw,
            _context(ca_pem, verify=True).wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc.reason or "it does not verify")
    except (OSError, ValueError):
        return None


def _wants_client_certificate(host: str, port: int, within: float) -> bool | None:
    """Whether the server completes a TLS handshake and then hangs up without
    speaking HTTP/2: a server that requires a client certificate. None when
    it did not get that far (refused, silent, not TLS): there is no more to learn."""
    try:
        with (
            socket.create_connection((host, port), timeout=within) as raw,
            _context(None, verify=False).wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(_PREFACE)
            return tls.recv(9) == b""
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        return True
    except ssl.SSLError as exc:  # an alert after the handshake: certificate_required
        return "CERTIFICATE" in str(exc.reason or "").upper()
    except (OSError, ValueError):  # refused, timed out, not TLS at all: gRPC's words stand
        return None


def why_not_connected(server: str, ca_pem: str | None, within: float = PROBE_WITHIN_S) -> str | None:
    """The line for a server that did not connect, or None when the reason is not one of ours."""
    try:
        host, port = split_target(server)
    except ValueError:
        return None
    wants = _wants_client_certificate(host, port, within)
    if wants is None:
        return None
    if wants:
        return (
            f"{server} is the control plane's agent port (mutual TLS, for agents): log in at its API "
            f"port instead, the address of 'serve --listen' (by default the agent port is the API port + 1, "
            f"so try {host}:{port - 1})"
        )
    why = _untrusted(host, port, ca_pem, within)
    if why is None:
        return None
    trust = "the CA given at login does not" if ca_pem else "this machine does not"
    return (
        f"the control plane at {server} presented a certificate {trust} trust ({why}); "
        "pass its CA with 'testhide login --ca-file FILE'"
    )


async def diagnosed(failure: Unreachable, server: str, ca_pem: str | None) -> Unreachable:
    """``failure``, or a `Misconnected` naming its cause and fix when one is found."""
    if any(word in failure.reason.lower() for word in _NOT_TLS):
        return failure  # nothing listens, or nothing answers: no need to look again
    why = await _in_daemon_thread(why_not_connected, server, ca_pem)
    return failure if why is None else Misconnected(server, why)


async def _in_daemon_thread(probe: Callable[[str, str | None], str | None], *args: Any) -> str | None:
    """``probe(*args)`` in a daemon thread: a caller that gives up waiting (shell
    completion's deadline) leaves it behind rather than waiting at exit, as it
    would for `asyncio.to_thread`'s executor."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str | None] = loop.create_future()

    def settle(result: str | None) -> None:
        if not answer.done():
            answer.set_result(result)

    def work() -> None:
        try:
            result = probe(*args)
        except Exception:  # a probe that fails tells nothing: gRPC's words stand
            result = None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=work, name="testhide-diagnose", daemon=True).start()
    return await answer
