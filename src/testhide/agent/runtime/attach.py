"""A container's output as Docker's attach socket gives it: multiplexed frames (an 8-byte
header: stream, length) read in large blocks (docker-py's frame iterator reads a frame at a
time and is several times slower), split into chunks by stream."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

from docker.utils.socket import read as socket_read

from testhide.agent.model import LogStream

READ_BLOCK = 1 << 20
_HEADER = struct.Struct(">BxxxL")
_STREAMS = {1: LogStream.STDOUT, 2: LogStream.STDERR}


class Demuxer:
    """Splits Docker's multiplexed attach stream (8-byte headers) into chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[LogStream, bytes]]:
        """Whole frames so far, neighbours of the same stream merged. Parts are
        joined once per run: a block of thousands of one-line frames must not
        be copied once per frame."""
        self._buffer += data
        view = memoryview(self._buffer)
        runs: list[tuple[LogStream, list[bytes]]] = []
        pos = 0
        try:
            while len(view) - pos >= _HEADER.size:
                kind, size = _HEADER.unpack_from(view, pos)
                if len(view) - pos - _HEADER.size < size:
                    break
                start = pos + _HEADER.size
                stream = _STREAMS.get(kind, LogStream.STDOUT)
                if not runs or runs[-1][0] != stream:
                    runs.append((stream, []))
                runs[-1][1].append(bytes(view[start : start + size]))
                pos = start + size
        finally:
            view.release()
        del self._buffer[:pos]
        return [(stream, b"".join(parts)) for stream, parts in runs]


def close_attach_socket(sock: Any) -> None:
    """docker-py hands out a SocketIO over the connection's socket, with the
    HTTP response attached; closing the wrapper alone leaks the socket."""
    for part in (getattr(sock, "_response", None), sock, getattr(sock, "_sock", None)):
        if part is not None:
            with contextlib.suppress(OSError, ValueError):
                part.close()


def read_attached(sock: Any, chunk_read: Callable[[tuple[LogStream, bytes]], None]) -> bool:
    """Every chunk until the container's streams close, then the socket closed; False if the
    connection broke first (the daemon went away)."""
    demuxer = Demuxer()
    try:
        while data := socket_read(sock, READ_BLOCK):
            for chunk in demuxer.feed(data):
                chunk_read(chunk)
    except OSError:
        return False
    finally:
        close_attach_socket(sock)
    return True
