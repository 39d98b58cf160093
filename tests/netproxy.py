"""A proxy that a test can cut: open connections are reset and new ones
refused (accepted, then reset at once) until the cut is over. Over TCP on
loopback (an agent's link to the control plane) or a Unix socket (an agent's
link to the Docker daemon, which then looks down to the agent)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class CuttableProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        unix_path: Path | None = None,
        unix_target: Path | None = None,
    ) -> None:
        self._upstream: Callable[[], Awaitable[Streams]] = (
            (lambda: asyncio.open_unix_connection(unix_target))
            if unix_target
            else (lambda: asyncio.open_connection(target_host, target_port))
        )
        self._unix_path = unix_path
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.is_cut = False
        self.connections = 0
        """Connections forwarded so far (not counting refused ones)."""
        self.connected = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @classmethod
    def unix(cls, path: Path, target: Path) -> CuttableProxy:
        return cls("", 0, unix_path=path, unix_target=target)

    async def __aenter__(self) -> CuttableProxy:
        if self._unix_path is not None:
            self._server = await asyncio.start_unix_server(self._accept, self._unix_path)
        else:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._reset_all()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.is_cut = True
        self._reset_all()

    def restore(self) -> None:
        self.is_cut = False

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await self._upstream()
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        self.connections += 1
        async with self.connected:
            self.connected.notify_all()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            _reset(w)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, as a dropped connection looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()
