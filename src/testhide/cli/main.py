"""``testhide``, the program: each command that only talks to the control
plane starts warm when it can.

A command imports Python's asyncio, gRPC, protobuf, click and the CLI before
it can send anything: 0.1-0.3 s, most of `testhide run -- true` beside
Docker's own work. As Mercurial's chg and the Gradle daemon do, a warm process
of the user's (`cli/warm.py`) has imported all of it once and forks a child
for each command. The child takes this process's standard streams (passed
over the socket), working directory, environment, umask and arguments, and
runs the command as this process would have; this process only passes its
signals on (Ctrl-C still cancels a job; Ctrl-Z stops the child with it) and
exits with the child's status.

Started warm are only the commands that never ask at a terminal
(`WARM_COMMANDS`): the child has no controlling terminal, so a password prompt
could not hide what is typed. Every other command, and a warm command when no
warm process answers, runs in this process as before; such a warm command, and
`login`, start a warm process for the next command. The warm process serves
only its own user (SO_PEERCRED) through a socket in a directory only that user
can enter, ends after `IDLE_S` without a command, and ends at once when the
installation it imported changes. ``TESTHIDE_CLI_WARM=off`` turns it off.

This module imports only what the warm path needs, and the cheapest way (the
C modules under socket and signal, marshal): its own start is the command's
start."""

from __future__ import annotations

import os
import sys

import testhide

TYPE_CHECKING = False  # typing itself is not imported here: ~3-8 ms of every command

if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Mapping

WARM_COMMANDS = frozenset({"run", "logs", "jobs", "tests", "artifacts", "cancel", "whoami"})
"""Commands that only talk to the control plane and print: none asks at a terminal."""
IDLE_S = 600.0
"""A warm process ends after this long without a command."""
SWITCH = "TESTHIDE_CLI_WARM"
MAX_REQUEST = 1 << 20
"""Largest request (arguments, environment, working directory) a warm process reads."""
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def _parsed(argv: list[str]) -> tuple[str | None, bool]:
    """The command ``argv`` names, and whether ``--debug`` came before it."""
    index, debug = 0, False
    while index < len(argv):
        word = argv[index]
        if word == "--debug":
            debug, index = True, index + 1
        elif word.startswith("--profile="):
            index += 1
        elif word == "--profile":
            index += 2
        else:
            return word, debug
    return None, debug


def warm_command(argv: list[str]) -> str | None:
    """The command ``argv`` names if it may start warm (global options skipped)."""
    command, _ = _parsed(argv)
    return command if command in WARM_COMMANDS else None


def installation() -> dict[str, str]:
    """What a warm process must share with the caller: the same interpreter and testhide."""
    return {"executable": sys.executable, "package": os.path.dirname(os.path.abspath(testhide.__file__))}


def socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """The warm process's socket for this user and installation, in a directory of the user's
    own: under $XDG_RUNTIME_DIR, else the config dir."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        directory = os.path.join(runtime, "testhide", "warm")
    else:
        config = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        directory = os.path.join(config, "testhide", "warm")
    import zlib

    install = installation()
    key = zlib.crc32(f"{install['executable']}\0{install['package']}".encode())
    return os.path.join(directory, f"{key:08x}.sock")


def private(status: os.stat_result) -> bool:
    """A directory of this user's that nobody else can enter (ssh checks its control path so)."""
    import stat  # imported by os already

    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o077


def at_socket(path: str, act: Callable[[str], None]) -> bool:
    """``act`` (a socket's connect or bind) on ``path`` through the directory it is in, once
    that directory, opened without following a link, is found private; False if it is not.
    The directory's file descriptor is the one checked and the one the path goes through
    (/proc/self/fd/N/NAME): nothing can swap it in between, and a path of any length fits
    the 108 bytes a socket's address holds."""
    directory, name = os.path.split(path)
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not private(os.fstat(fd)):
            return False
        act(f"/proc/self/fd/{fd}/{name}")
        return True
    finally:
        os.close(fd)


def _streams() -> list[list[object]]:
    """How Python made this process's standard streams, for the child to make its own so."""
    import io

    return [
        [
            stream.encoding,
            stream.errors,
            stream.line_buffering,
            getattr(stream, "write_through", False),
            isinstance(stream.buffer, io.BufferedIOBase),  # not so with python -u, PYTHONUNBUFFERED
        ]
        for stream in (sys.stdin, sys.stdout, sys.stderr)
    ]


def _request(argv: list[str]) -> bytes:
    """The request in marshal's format: built in, so nothing to import (json and its regular
    expressions are ~6 ms). The warm process reads it only from its own user (SO_PEERCRED)."""
    import marshal

    return marshal.dumps(
        {
            **installation(),
            "argv0": sys.argv[0],
            "argv": argv,
            "cwd": os.getcwd(),
            "environ": dict(os.environ),
            "umask": _umask(),
            "streams": _streams(),
        }
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_warm(path: str, argv: list[str]) -> int | None:
    """The command's exit status, run by the warm process at ``path``; None when no warm
    process took it (nothing of the command ran: it may run here).

    The C modules under socket and signal are used as they are: the public modules wrap their
    constants in enums, and importing enum is ~7 ms of a command that takes ~50."""
    import _signal  # type: ignore[import-not-found]  # signal's C module, which has no stubs
    import _socket

    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:  # a closed standard stream cannot be passed on
        return None
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    child: list[int] = []
    pending: list[int] = []
    forwarded: list[int] = []

    def to_child(signum: int) -> None:
        try:  # noqa: SIM105 - contextlib is not imported here
            os.kill(child[0], signum)
        except ProcessLookupError:  # it has just ended; its status is on the way
            pass

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        if child:
            to_child(signum)
        else:
            pending.append(signum)

    def suspend(signum: int, frame: object) -> None:
        """Ctrl-Z: the command stops with this process, and goes on with it (fg, bg)."""
        if child:
            to_child(_signal.SIGSTOP)
        _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTSTP)  # stopped here until SIGCONT
        _signal.signal(_signal.SIGTSTP, suspend)
        if child:
            to_child(_signal.SIGCONT)

    previous = {}
    replies = _Lines(connection)
    try:
        if not at_socket(path, connection.connect):
            return None
        for name in FORWARDED_SIGNALS:
            signum = getattr(_signal, name)
            previous[signum] = _signal.signal(signum, forward)
        previous[_signal.SIGTSTP] = _signal.signal(_signal.SIGTSTP, suspend)
        _send(connection, _request(argv))
        first = replies.next()
        if len(first) == 2 and first[0] == b"pid":
            child.append(int(first[1]))
            if _parsed(argv)[1]:
                sys.stderr.write(f"testhide: started warm, as process {child[0]} of {path}\n")
            for signum in pending:
                to_child(signum)
            last = replies.next()
    except OSError:
        last = []
    finally:
        connection.close()
        for signum, handler in previous.items():
            _signal.signal(signum, handler)
    if not child:  # stale, refused or gone before it began: nothing ran, it may run here
        for signum in pending:
            os.kill(os.getpid(), signum)
        return None
    if len(last) == 2 and last[0] == b"exit":
        return int(last[1])
    if forwarded:  # the command ended by a signal this process passed on: end by it too
        _signal.signal(forwarded[-1], _signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[-1])
    sys.stderr.write("testhide: the warm command process ended without an exit status\n")
    return 125


class _Lines:
    """The warm process's replies, a line at a time, split in words; [] at the end."""

    def __init__(self, connection: _socket.socket) -> None:
        self._connection = connection
        self._buffer = b""

    def next(self) -> list[bytes]:
        while b"\n" not in self._buffer:
            chunk = self._connection.recv(256)
            if not chunk:
                return []
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.split()


def _send(connection: _socket.socket, request: bytes) -> None:
    """The request's length with the three standard streams, then the request."""
    import _socket

    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # an array of C ints
    connection.sendmsg([len(request).to_bytes(4, "big")], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    connection.sendall(request)


def start_warm(path: str) -> None:
    """Start the warm process at ``path`` in its own session, for the next command."""
    import subprocess

    # -P: the working directory is not put on its import path (a file there named like a module
    # must never be imported), and it runs from / (it holds no directory of the caller's).
    subprocess.Popen(  # this interpreter, its own module
        [sys.executable, "-P", "-m", "testhide.cli.warm", path],
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def main() -> None:
    argv = sys.argv[1:]
    command, _ = _parsed(argv)
    if os.environ.get(SWITCH, "on") != "off" and command in WARM_COMMANDS | {"login"}:
        path = socket_path()
        status = run_warm(path, argv) if command in WARM_COMMANDS else None
        if status is not None:
            sys.stderr.flush()  # a notice of run_warm's; the command wrote to the streams itself
            os._exit(status)  # nothing here to tear down: the interpreter's own teardown is ~5-10 ms
        start_warm(path)  # for the next command (it leaves at once if one runs)
    import atexit
    import gc

    # Everything the command imported (gRPC, protobuf, click) lives until the exit, where
    # Python's last collection would walk it all once more, ~15 ms of each command: frozen
    # objects are left to the process's end.
    atexit.register(gc.freeze)
    from testhide.cli.commands import main as commands

    # As the installed `testhide` is named, for usage lines and shell completion alike.
    commands(prog_name="testhide")


if __name__ == "__main__":
    main()
