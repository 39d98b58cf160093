"""common/sdnotify.py: the messages, the socket address, the watchdog interval, and
silence outside systemd. The datagrams themselves are tested against a real socket in
tests/integration/test_systemd.py; here a fake stands in for the send."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from testhide.common.sdnotify import Notifier, socket_address, watchdog_interval


class Sent:
    """A fake send: the datagrams a Notifier would have sent, decoded."""

    def __init__(self, fail: bool = False) -> None:
        self.messages: list[str] = []
        self.arrived = asyncio.Event()
        self._fail = fail

    def __call__(self, address: str, message: bytes) -> None:
        assert address == "/run/systemd/notify"
        if self._fail:
            raise ConnectionRefusedError(111, "Connection refused")
        self.messages.append(message.decode())
        self.arrived.set()


def notifier(sent: Sent, watchdog: timedelta | None = None) -> Notifier:
    return Notifier("/run/systemd/notify", watchdog, send=sent)


def test_the_socket_is_a_path_or_an_abstract_name() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@testhide/notify") == "\0testhide/notify"
    assert socket_address(None) is None
    assert socket_address("") is None
    # systemd 253's sockets for virtual machines, and anything relative, are not spoken: no messages.
    assert socket_address("vsock:2:1234") is None
    assert socket_address("run/notify") is None


def test_outside_systemd_nothing_is_sent() -> None:
    quiet = Notifier.from_environment({"WATCHDOG_USEC": "1000000"}, pid=42)
    assert not quiet.enabled
    assert quiet.watchdog_interval is None  # nowhere to ping
    sent = Sent()
    silent = Notifier(None, timedelta(seconds=1), send=sent)
    silent.ready("serving")
    silent.status("busy")
    silent.stopping()
    with silent.reloading():
        pass
    assert sent.messages == []
    assert silent.watchdog_interval is None


def test_ready_carries_a_status_on_one_line() -> None:
    sent = Sent()
    notifier(sent).ready("serving: API port 7443,\nagent port 7444")
    assert sent.messages == ["READY=1\nSTATUS=serving: API port 7443, agent port 7444"]


def test_stopping_is_sent_once() -> None:
    sent = Sent()
    daemon = notifier(sent)
    daemon.stopping("draining: 2 jobs running")
    daemon.stopping()
    assert sent.messages == ["STOPPING=1\nSTATUS=draining: 2 jobs running"]


def test_a_reload_is_bracketed_and_the_last_status_comes_back() -> None:
    sent = Sent()
    daemon = notifier(sent)
    daemon.ready("connecting to cp1:7444")
    daemon.status("connected to cp1:7444")
    with daemon.reloading():
        assert len(sent.messages) == 3
        assert re.fullmatch(
            r"RELOADING=1\nMONOTONIC_USEC=[0-9]+\nSTATUS=reloading configuration", sent.messages[2]
        )
    assert sent.messages[3] == "READY=1\nSTATUS=connected to cp1:7444"


def test_a_failed_reload_still_ends_with_ready_and_says_so() -> None:
    sent = Sent()
    daemon = notifier(sent)
    daemon.ready("serving")
    with pytest.raises(ValueError, match="bad listen address"), daemon.reloading():
        raise ValueError("bad listen address")
    assert sent.messages[-1] == "READY=1\nSTATUS=reload failed (bad listen address); serving"


def test_a_send_that_fails_is_logged_never_raised() -> None:
    with capture_logs() as logs:
        notifier(Sent(fail=True)).ready("serving")
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]
    assert "READY=1" in logs[0]["message"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, timedelta(seconds=15)),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, timedelta(seconds=15)),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "1000"}, timedelta(microseconds=500)),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_what_systemd_asks(
    environ: dict[str, str], expected: timedelta | None
) -> None:
    assert watchdog_interval(environ, pid=42) == expected


def test_the_watchdog_needs_the_notify_socket_too() -> None:
    environ = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}
    assert Notifier.from_environment(environ, pid=42).watchdog_interval == timedelta(seconds=1)
    assert Notifier.from_environment(environ, pid=43).watchdog_interval is None


async def test_the_watchdog_pings_until_cancelled() -> None:
    sent = Sent()
    pinging = asyncio.create_task(notifier(sent, timedelta(milliseconds=1)).keep_watchdog())
    for _ in range(3):
        await asyncio.wait_for(sent.arrived.wait(), 5)
        sent.arrived.clear()
    pinging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pinging
    assert len(sent.messages) >= 3
    assert set(sent.messages) == {"WATCHDOG=1"}


async def test_without_a_watchdog_the_task_waits_to_be_cancelled() -> None:
    """So a daemon can supervise it like its other tasks, which must never end."""
    sent = Sent()
    waiting = asyncio.create_task(notifier(sent).keep_watchdog())
    done, _ = await asyncio.wait({waiting}, timeout=0.05)
    assert not done
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sent.messages == []
