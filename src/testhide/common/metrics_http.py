"""The metrics port both daemons may open (``--metrics-listen``): Prometheus'
text format on ``/metrics`` and, where the daemon answers one, ``/healthz``.

It is served from threads of its own, so that a scrape never waits for the
event loop to be free and the event loop never waits on a scrape. What only the
event loop may read (sessions, the store) is collected there: the scrape
thread hands the loop a coroutine and waits for its answer, under a timeout
(``LoopCollector``); a loop that does not answer makes ``/healthz`` fail.

Plain HTTP on loopback only, TLS anywhere else (``metrics_tls``). The
certificate is asked for on every connection, so a rotation reaches the next
scrape. The handshake runs in the connection's own thread under a timeout, so a
client that never finishes one holds nothing up, and at most
``MAX_CONNECTIONS`` are served at once; more are closed unanswered. The port
has no authentication of its own: it shows counts and timings, never job
output, names of jobs, or secrets."""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from testhide.common.metrics_tls import CertificateSource, tls_context
from testhide.common.tls import split_target

log = structlog.get_logger("testhide.metrics")

MAX_CONNECTIONS = 16
"""Connections served at once; a scraper needs one."""
CONNECTION_TIMEOUT_S = 10.0
"""For the TLS handshake and for each read and write of a request."""
COLLECT_TIMEOUT_S = 10.0
"""How long a scrape waits for what the event loop collects."""
HEALTH_TIMEOUT_S = 2.0
"""An event loop that does not answer ``/healthz`` within this is reported stalled."""
POLL_INTERVAL_S = 0.1
"""How often the serving thread looks whether it should stop (``stop()`` waits up to this)."""

Health = Callable[[], Awaitable[tuple[bool, Mapping[str, object]]]]
"""Runs on the event loop: (healthy, a few facts for the JSON body)."""


def new_registry() -> CollectorRegistry:
    """A registry of one daemon's own (never the process-wide default: tests run
    several daemons in one process). Counters and histograms made after this
    have no ``_created`` series: a second series per series, which no one reads."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; read as each metric is made
    return CollectorRegistry()


class _Contexts:
    """The TLS context for the certificate its source gives now; the previous one
    while the source cannot be read (a file being replaced)."""

    def __init__(self, source: CertificateSource) -> None:
        self._source = source
        self._served = source()
        self._context = tls_context(self._served)

    def current(self) -> ssl.SSLContext:
        try:
            certificate = self._source()
            if certificate != self._served:
                self._context, self._served = tls_context(certificate), certificate
                log.info("metrics_certificate_reloaded")
        except (OSError, ValueError) as exc:
            log.warning("metrics_certificate_unusable", error=str(exc), note="serving the previous one")
        return self._context


class LoopCollector(Collector):
    """Families that only the event loop may compute, collected there for each
    scrape (on the scrape's thread, never the loop's own)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, families: Callable[[], Awaitable[list[Metric]]]
    ) -> None:
        self._loop = loop
        self._families = families

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(_call(self._families), self._loop)
        try:
            families: list[Metric] = future.result(COLLECT_TIMEOUT_S)
            return families
        except FutureTimeout:
            future.cancel()
            log.warning("metrics_collection_timed_out", timeout_s=COLLECT_TIMEOUT_S)
        except Exception as exc:
            log.warning("metrics_collection_failed", error=repr(exc))
        return []


async def _call(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, contexts: _Contexts | None) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )[0]
        self.address_family = family
        self._contexts = contexts
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((str(address[0]), int(address[1])), _QuietHandler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host's name up (getfqdn): nothing here asks a resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "testhide", self.server_address[1]
        self.setup_environ()

    def get_request(self) -> tuple[Any, Any]:
        connection, address = self.socket.accept()
        connection.settimeout(CONNECTION_TIMEOUT_S)
        if self._contexts is None:
            return connection, address
        try:
            # The handshake runs in the connection's thread (finish_request), not this accepting one.
            context = self._contexts.current()
            return context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False), address
        except BaseException:
            connection.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed unanswered
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed handshake, a client gone or too slow: its problem, not the daemon's.
        log.debug("metrics_connection_failed", client=str(client_address))


def _application(
    registry: CollectorRegistry, health: Health | None, loop: asyncio.AbstractEventLoop
) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def respond(start_response: Callable[..., Any], status: str, body: bytes, kind: str) -> list[bytes]:
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]  # untyped in the client
        if path == "/healthz" and health is not None:
            future = asyncio.run_coroutine_threadsafe(_call(health), loop)
            try:
                healthy, facts = future.result(HEALTH_TIMEOUT_S)
            except FutureTimeout:
                future.cancel()
                healthy, facts = False, {"status": "event_loop_stalled"}
            except Exception as exc:  # a stopped loop, or a failing check
                healthy, facts = False, {"status": "stopped", "error": type(exc).__name__}
            body = json.dumps(facts, separators=(",", ":")).encode() + b"\n"
            status = "200 OK" if healthy else "503 Service Unavailable"
            return respond(start_response, status, body, "application/json")
        paths = "/metrics, /healthz" if health is not None else "/metrics"
        return respond(start_response, "404 Not Found", f"served here: {paths}\n".encode(), "text/plain")

    return application


class MetricsListener:
    """``start()`` binds and serves from a thread; ``stop()`` stops (idempotent)."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        certificate: CertificateSource | None,
        health: Health | None = None,
    ) -> None:
        self.listen = listen
        self.port = 0
        self.tls = certificate is not None
        self._registry = registry
        self._certificate = certificate
        self._health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> int:
        """The port bound. OSError when the address cannot be bound or the
        certificate not used (ssl.SSLError)."""
        host, port = split_target(self.listen)
        contexts = _Contexts(self._certificate) if self._certificate is not None else None
        server = _Server(host, port, contexts)
        server.set_app(_application(self._registry, self._health, asyncio.get_running_loop()))
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(POLL_INTERVAL_S,), name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics_listening", address=f"{host}:{self.port}", tls=self.tls)
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)  # waits for serve_forever's next poll
        server.server_close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
