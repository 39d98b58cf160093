"""systemd's service notifications (``sd_notify``): a ``Type=notify`` unit learns
when a daemon is ready, reloading or stopping, and can watch that it is alive.

Written against the documented wire format (sd_notify(3), "Notes") rather than
taken from a library, because it is a few lines: each message is one datagram of
newline-separated ``KEY=VALUE`` assignments, sent to the ``AF_UNIX`` socket that
``$NOTIFY_SOCKET`` names: a file-system path, or a name in the abstract namespace
when it starts with ``@`` (the ``@`` stands for a leading NUL byte). A binding
(python-systemd needs libsystemd and a C build) would cost more than it saves.

Outside systemd ``$NOTIFY_SOCKET`` is unset, and then nothing here does anything.

The watchdog: with ``WatchdogSec=`` systemd passes ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``, the process it means). ``keep_watchdog()`` then sends
``WATCHDOG=1`` every half of that interval, as sd_watchdog_enabled(3) advises. It
runs as a task on the daemon's own event loop on purpose: a loop that is stuck (a
blocking call, a deadlock) stops the pings, and systemd restarts the daemon.

Sending never raises and never waits: a daemon must not stop because its
supervisor's socket went away, nor stall its event loop on a receiver that does not
read (libsystemd would block). A datagram that finds the queue full is dropped and
logged; systemd reads its socket all the time, so that takes a stuck PID 1."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import structlog

log = structlog.get_logger("testhide.sdnotify")


def send_datagram(address: str, message: bytes) -> None:
    """One datagram to the ``AF_UNIX`` socket at ``address`` (a path, or ``"\\0name"``),
    without waiting: ``BlockingIOError`` when the receiver's queue is full."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.sendto(message, address)


def socket_address(notify_socket: str | None) -> str | None:
    """The address ``$NOTIFY_SOCKET`` names, or None: unset, empty, or a kind we
    do not speak (systemd 253's ``vsock:`` for virtual machines)."""
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    log.warning("systemd_notify_socket_unsupported", notify_socket=notify_socket)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> timedelta | None:
    """How often to ping: half of ``$WATCHDOG_USEC``, if it is set for ``pid``
    (``$WATCHDOG_PID`` unset, or equal to it), else None."""
    usec, meant_for = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    try:
        interval = int(usec)
        if meant_for and int(meant_for) != pid:
            return None  # inherited from a parent the watchdog watches
    except ValueError:
        log.warning("systemd_watchdog_ignored", watchdog_usec=usec, watchdog_pid=meant_for)
        return None
    if interval <= 0:
        return None
    return timedelta(microseconds=interval / 2)


def _status_line(text: str) -> str:
    # One assignment per line: a newline inside STATUS= would start a new one.
    return " ".join(text.split())


class Notifier:
    """Tells systemd about this daemon's state; every method does nothing when
    ``address`` is None (not started by systemd, or not as ``Type=notify``)."""

    def __init__(
        self,
        address: str | None,
        watchdog: timedelta | None = None,
        send: Callable[[str, bytes], None] = send_datagram,
    ) -> None:
        self.address = address
        self.watchdog_interval = watchdog if address is not None else None
        """Half of ``WatchdogSec=``, or None when systemd does not watch this process."""
        self._send = send
        self._status = ""
        self._stopping = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        return cls(
            socket_address(env.get("NOTIFY_SOCKET")),
            watchdog_interval(env, os.getpid() if pid is None else pid),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments in one datagram (``notify(READY="1")``)."""
        if self.address is None:
            return
        message = "\n".join(f"{key}={_status_line(value)}" for key, value in assignments.items())
        try:
            self._send(self.address, message.encode())
        except OSError as exc:
            log.warning("systemd_notify_failed", message=message, error=str(exc))

    def ready(self, status: str) -> None:
        """Startup is complete: ``systemctl start`` returns, units ordered after this one start."""
        self._status = status
        self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """Free text for ``systemctl status`` (shown again after a reload)."""
        self._status = text
        self.notify(STATUS=text)

    def stopping(self, status: str = "stopping") -> None:
        """Shutdown has begun (sent once, however often it is called)."""
        if not self._stopping:
            self._stopping = True
            self.notify(STOPPING="1", STATUS=status)

    @contextmanager
    def reloading(self) -> Iterator[None]:
        """Around a reload (SIGHUP): ``RELOADING=1`` before, ``READY=1`` after,
        also when the reload failed (the daemon serves on as it was; the status
        says so, and the exception propagates)."""
        # MONOTONIC_USEC tells this reload from an earlier one (systemd 253's Type=notify-reload needs it).
        self.notify(
            RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000), STATUS="reloading configuration"
        )
        try:
            yield
        except Exception as exc:
            self.notify(READY="1", STATUS=f"reload failed ({exc}); {self._status}")
            raise
        self.notify(READY="1", STATUS=self._status)

    async def keep_watchdog(self) -> None:
        """Ping the watchdog every ``watchdog_interval`` until cancelled; without a
        watchdog, just wait to be cancelled (so it can be supervised like any task)."""
        interval = self.watchdog_interval
        if interval is None:
            await asyncio.get_running_loop().create_future()
            return
        while True:
            self.notify(WATCHDOG="1")
            await asyncio.sleep(interval.total_seconds())
