"""agent/runtime/docker.py Demuxer: Docker's multiplexed attach stream."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.agent.model import LogStream
from testhide.agent.runtime.attach import Demuxer

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
OUT, ERR = LogStream.STDOUT, LogStream.STDERR


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def merged(chunks: list[tuple[LogStream, bytes]]) -> list[tuple[LogStream, bytes]]:
    out: list[tuple[LogStream, bytes]] = []
    for stream, data in chunks:
        if out and out[-1][0] == stream:
            out[-1] = (stream, out[-1][1] + data)
        else:
            out.append((stream, data))
    return out


def test_single_frames_tagged() -> None:
    assert Demuxer().feed(frame(1, b"out")) == [(OUT, b"out")]
    assert Demuxer().feed(frame(2, b"err")) == [(ERR, b"err")]


def test_alternating_streams_kept_apart_in_order() -> None:
    data = frame(1, b"a") + frame(2, b"b") + frame(1, b"c")
    assert Demuxer().feed(data) == [(OUT, b"a"), (ERR, b"b"), (OUT, b"c")]


def test_consecutive_same_stream_frames_merge() -> None:
    data = frame(1, b"ab") + frame(1, b"cd") + frame(2, b"e") + frame(2, b"f") + frame(1, b"g")
    assert Demuxer().feed(data) == [(OUT, b"abcd"), (ERR, b"ef"), (OUT, b"g")]


def test_partial_header_and_payload_are_buffered() -> None:
    demuxer = Demuxer()
    data = frame(2, b"hello")
    assert demuxer.feed(data[:3]) == []
    assert demuxer.feed(data[3:8]) == []  # whole header, no payload
    assert demuxer.feed(data[8:10]) == []
    assert demuxer.feed(data[10:] + frame(1, b"x")[:4]) == [(ERR, b"hello")]
    assert demuxer.feed(frame(1, b"x")[4:]) == [(OUT, b"x")]
    assert demuxer.feed(b"") == []


def test_payload_bytes_that_look_like_headers() -> None:
    inner = frame(2, b"fake")
    assert Demuxer().feed(frame(1, inner)) == [(OUT, inner)]


def test_large_frame() -> None:
    payload = bytes(range(256)) * 5000
    assert Demuxer().feed(frame(2, payload)) == [(ERR, payload)]


def test_unknown_stream_is_stdout() -> None:
    assert Demuxer().feed(frame(0, b"stdin?") + frame(3, b"?")) == [(OUT, b"stdin??")]


frames_strategy = st.lists(
    st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=40)), min_size=1, max_size=12
)


@PROPS
@given(frames_strategy, st.data())
def test_any_split_reassembles(frames: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    demuxer, chunks, last = Demuxer(), [], 0
    for cut in [*cuts, len(stream)]:
        out = demuxer.feed(stream[last:cut])
        # Within one feed call, neighbouring chunks never share a stream.
        assert all(a[0] != b[0] for a, b in itertools.pairwise(out))
        assert all(payload for _, payload in out)
        chunks.extend(out)
        last = cut
    expected = merged([(OUT if kind == 1 else ERR, payload) for kind, payload in frames])
    assert merged(chunks) == expected
    assert demuxer.feed(b"") == []  # nothing left over


def test_every_single_split_point() -> None:
    frames = [(1, b"hello "), (1, b"world\n"), (2, b"warning\n"), (1, b"!"), (2, b""), (2, b"x" * 20)]
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    expected = [(OUT, b"hello world\n"), (ERR, b"warning\n"), (OUT, b"!"), (ERR, b"x" * 20)]
    for cut in range(len(stream) + 1):
        demuxer = Demuxer()
        chunks = demuxer.feed(stream[:cut]) + demuxer.feed(stream[cut:])
        assert merged([c for c in chunks if c[1]]) == expected, cut
    # Byte by byte.
    demuxer = Demuxer()
    chunks = [c for i in range(len(stream)) for c in demuxer.feed(stream[i : i + 1])]
    assert merged([c for c in chunks if c[1]]) == expected
