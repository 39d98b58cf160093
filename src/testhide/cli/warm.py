"""The warm command process (`cli/main.py` says why): ``python -m
testhide.cli.warm SOCKET``. It imports what the warm commands need, listens on
SOCKET, and forks a child for each caller of its own user; the child becomes
the caller's command and reports its pid, then its exit status.

Nothing of the command runs in this process: it never connects to a control
plane, reads a session or starts a thread, so each child starts as clean as a
new program (gRPC's core starts in the child, at its first channel). It ends
after `IDLE_S` without a caller, on SIGTERM, when its socket is taken away,
and when the installation it imported has changed (that caller is told
``stale`` and runs the command itself)."""

from __future__ import annotations

import array
import atexit
import contextlib
import fcntl
import importlib
import io
import locale
import marshal
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import IO, Any, NoReturn

import testhide
from testhide.cli.main import IDLE_S, MAX_REQUEST, at_socket, installation, private

WARM_MODULES = (
    "testhide.cli.commands",
    "testhide.cli.run_command",
    "testhide.cli.job_commands",
    "testhide.cli.sessions",
    "testhide.cli.wire",
    "testhide.cli.wire_convert",
    "testhide.cli.workspace",
    "testhide.cli.interrupt",
    "testhide.cli.follow",
    "tenacity",
)
"""What the warm commands import, at once or when they get there."""
_SIGNALS_SET_HERE = (signal.SIGTERM, signal.SIGCHLD)
"""Signals whose handling the warm process changes, back to the default in each child."""


def installation_state() -> list[tuple[str, int, int]]:
    """What must not change under a running warm process, with change time and size: each testhide
    module it has imported (one imported later comes fresh from disk), the directories they are in
    (a file added, removed or replaced, as an upgrade does) and each import path. Read for every
    caller, before the fork: ~0.5 ms (a walk stat-ing every file of the package was ~2.6 ms)."""
    package = os.path.dirname(testhide.__file__)
    files = {
        file
        for module in list(sys.modules.values())
        if (file := getattr(module, "__file__", None)) and file.startswith(package + os.sep)
    }
    state = []
    for path in [*sorted(files | {os.path.dirname(file) for file in files}), *sys.path]:
        with contextlib.suppress(OSError):
            status = os.stat(path or ".")
            state.append((path, status.st_mtime_ns, status.st_size))
    return state


def serve(path: str, idle_s: float = IDLE_S) -> None:
    """Serve callers at ``path`` until idle, stale, gone or told to stop."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not private(os.lstat(directory)):
        return
    lock = open(f"{path}.lock", "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return  # another warm process has it
    with lock:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")  # which process serves the socket, for whoever asks
        lock.flush()
        for module in WARM_MODULES:
            importlib.import_module(module)
        _serve(path, idle_s, lock)


def _serve(path: str, idle_s: float, lock: IO[str]) -> None:
    state = installation_state()
    with _listening(path) as (listener, bound), _signalled(signal.SIGTERM) as stop:
        print("ready", flush=True)  # to whoever started this process and waits for it
        while True:
            ready, _, _ = select.select([listener.fileno(), stop], [], [], idle_s)
            if not ready or stop in ready:
                return  # idle, or told to stop
            connection, _ = listener.accept()
            if _uid(connection) != os.getuid():
                connection.close()
                continue
            if installation_state() != state or not _same_file(path, bound):
                with contextlib.suppress(OSError):
                    connection.sendall(b"stale\n")
                connection.close()
                return
            if os.fork() == 0:
                signal.set_wakeup_fd(-1)
                for fd in (listener.fileno(), stop, lock.fileno()):
                    os.close(fd)
                _child(connection)
            connection.close()


@contextlib.contextmanager
def _listening(path: str) -> Iterator[tuple[socket.socket, os.stat_result]]:
    """A socket only this user can connect to, at ``path``; removed at the end if still ours."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    mask = os.umask(0o177)
    try:
        if not at_socket(path, listener.bind):
            raise SystemExit(0)  # the directory is no longer private
    finally:
        os.umask(mask)
    listener.listen(64)
    bound = os.stat(path)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    try:
        yield listener, bound
    finally:
        signal.signal(signal.SIGCHLD, previous)
        listener.close()
        if _same_file(path, bound):
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def _signalled(signum: int) -> Iterator[int]:
    """A descriptor that becomes readable once ``signum`` arrives (signal.set_wakeup_fd).
    Not an exception raised from a handler: a signal arriving during os.fork() runs its
    handler inside the fork's own callbacks, where an exception is printed and lost."""
    readable, writable = os.pipe()
    os.set_blocking(writable, False)
    previous_fd = signal.set_wakeup_fd(writable)
    previous = signal.signal(signum, lambda signum, frame: None)  # the wakeup fd tells
    try:
        yield readable
    finally:
        signal.signal(signum, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(readable)
        os.close(writable)


def _same_file(path: str, bound: os.stat_result) -> bool:
    """Whether ``path`` is still the socket this process bound (not removed, not taken over)."""
    try:
        status = os.stat(path)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (bound.st_dev, bound.st_ino)


def _uid(connection: socket.socket) -> int:
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def _child(connection: socket.socket) -> NoReturn:
    """Become the caller's command; never returns. A failure before the command began (the
    caller's working directory gone, say) ends this child silently: the caller has no pid
    yet, so it runs the command itself and meets the failure as a program of its own would."""
    status = 125
    try:
        status = _command(connection)
    except BaseException:  # noqa: S110 - see above; after the pid, the command reports
        pass
    finally:
        os._exit(status)


def _receive(connection: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    fds = array.array("i")
    header, ancillary, _flags, _ = connection.recvmsg(4, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    size = int.from_bytes(header, "big") if len(header) == 4 else 0
    if len(fds) != 3 or not 0 < size <= MAX_REQUEST:
        return None
    body = bytearray()
    while len(body) < size:
        chunk = connection.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return marshal.loads(body), list(fds)  # noqa: S302 - from this user only (SO_PEERCRED)


def _command(connection: socket.socket) -> int:
    received = _receive(connection)
    if received is None:
        return 125
    request, fds = received
    if {key: request.get(key) for key in installation()} != installation():
        connection.sendall(b"stale\n")  # another installation whose socket name is the same
        return 125
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["environ"])
    time.tzset()
    with contextlib.suppress(locale.Error):  # as Python sets it at its start, from the environment
        locale.setlocale(locale.LC_CTYPE, "")
    for signum in _SIGNALS_SET_HERE:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _standard_streams(request["streams"])
    sys.argv = [request["argv0"], *request["argv"]]
    connection.sendall(f"pid {os.getpid()}\n".encode())
    threading.Thread(target=_end_with_caller, args=(connection,), daemon=True).start()
    try:
        status = _run(request["argv"])
    except BaseException:  # what Python does with an exception nothing caught
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError):
        connection.sendall(f"exit {status}\n".encode())
    return status


def _standard_streams(streams: list[list[Any]]) -> None:
    """sys.stdin, stdout and stderr on the caller's streams, made as Python made the caller's."""
    made = []
    for fd, (encoding, errors, line_buffering, write_through, buffered) in enumerate(streams):
        raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        buffer: Any = raw
        if buffered:
            buffer = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        made.append(
            io.TextIOWrapper(
                buffer,
                encoding=encoding,
                errors=errors,
                newline="\n",
                line_buffering=line_buffering,
                write_through=write_through,
            )
        )
    sys.stdin, sys.stdout, sys.stderr = made


def _end_with_caller(connection: socket.socket) -> None:
    """The caller is gone (killed, its terminal closed): so is its command."""
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    os._exit(125)


def _run(argv: list[str]) -> int:
    from testhide.cli.commands import main

    try:
        main(args=argv, prog_name="testhide")
    except SystemExit as exit_:
        code = exit_.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    serve(sys.argv[1])
