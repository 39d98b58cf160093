"""The warm CLI (cli/main.py, cli/warm.py): a command run by the user's warm
process behaves as one run in its own process (the job's log on stdout, its
status as the exit status, the caller's working directory and environment,
Ctrl-C cancels the job), and a warm process serves only its own user through
a private directory, ends with a caller that was killed, and gives way when the
installation changes, when told to stop, or when idle. Real control plane,
agent, Docker and CLI processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from testhide.agent.daemon import Agent
from testhide.cli import warm
from testhide.cli.main import at_socket, warm_command
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane, ended_process, eventually, unavailable
from tests.integration.test_job_explain import job_id_of, shown, started_run, status_becomes


@pytest.fixture
async def warm_cli(cp: RunningControlPlane, tmp_path: Path) -> AsyncIterator[Cli]:
    """A logged-in CLI whose commands start warm once its warm process runs."""
    client = Cli(tmp_path / "config", warm=True)
    try:
        result = await client.login(cp)  # not a warm command: it starts the warm process
        assert result.returncode == 0, result.stderr
        await eventually(client.warm_answers, 60, "the warm process")
        yield client
    finally:
        await client.stop_warm()


def warm_line(stderr: bytes, cli: Cli) -> str:
    """The line `--debug` writes when a command started warm; "" if it did not."""
    said = [line for line in stderr.decode().splitlines() if line.startswith("testhide: started warm")]
    assert len(said) <= 1, said
    if said:
        assert said[0].endswith(f"of {cli.warm_socket}"), said
    return said[0] if said else ""


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def the_running_command(warm: Cli) -> int:
    """The one command the warm process runs (the commands before it, which have already
    reported their status to their callers, end within moments)."""
    warm_pid = warm.warm_pid()
    assert warm_pid is not None

    def alone() -> list[int]:
        children = children_of(warm_pid)
        return children if len(children) == 1 else []

    [command] = await eventually(alone, 30, "one command left")
    return int(command)


@pytest.mark.docker
async def test_a_warm_run_is_the_run_of_its_own_process(
    docker_agent: Agent, warm_cli: Cli, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "greeting.txt").write_text("from the caller's directory\n")
    warm_cli.env["GREETING_SOURCE"] = "the caller's environment"
    script = 'cat greeting.txt; echo "to stderr" >&2; exit 3'
    command = ("run", "--image", JOB_IMAGE, "--", "sh", "-c", script)
    ran = await warm_cli("--debug", *command, cwd=workspace)
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout == b"from the caller's directory\n"
    assert b"to stderr\n" in ran.stderr
    assert warm_line(ran.stderr, warm_cli)

    cold = Cli(tmp_path / "config")  # the same session, each command in its own process
    alone = await cold("--debug", *command, cwd=workspace)
    assert (alone.returncode, alone.stdout) == (ran.returncode, ran.stdout)
    assert not warm_line(alone.stderr, cold)

    # The caller's environment: a profile named there (none is stored under that name).
    warm_cli.env["TESTHIDE_PROFILE"] = "elsewhere"
    other = await warm_cli("--debug", "jobs", "list")
    assert other.returncode == 125
    assert b"not logged in" in other.stderr
    assert warm_line(other.stderr, warm_cli)


@pytest.mark.docker
async def test_ctrl_c_on_a_warm_run_cancels_the_job(docker_agent: Agent, warm_cli: Cli) -> None:
    runner, job_id = await started_run(warm_cli)
    await the_running_command(warm_cli)  # the command runs there, not in `runner`
    runner.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 130, err
    assert f"testhide: canceling job {job_id} (press Ctrl-C again to detach)" in err.decode()
    assert f"job {job_id} CANCELED: canceled by user" in err.decode()
    assert (await shown(warm_cli, job_id))["status"] == "CANCELED"


def state_of(pid: int) -> str:
    """The process's state letter (R, S, T stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def sleeping_run(cli: Cli, **group: Any) -> tuple[asyncio.subprocess.Process, str]:
    """A warm `run` of a job that prints "started" and sleeps, once the job is running."""
    job = ("--image", JOB_IMAGE, "--", "sh", "-c", "echo started; sleep 300")
    runner = await cli.start("run", *job, **group)
    async with reaped(runner, only_on_failure=True):
        job_id = await job_id_of(runner)
        assert runner.stdout is not None
        assert await asyncio.wait_for(runner.stdout.readline(), 60) == b"started\n"
        await status_becomes(cli, job_id, "RUNNING")
    return runner, job_id


@contextlib.asynccontextmanager
async def reaped(runner: asyncio.subprocess.Process, only_on_failure: bool = False) -> AsyncIterator[None]:
    """``runner`` killed and waited for if it is still running at the end (or only after a
    failure): a process left behind fails a later test of the worker with ResourceWarnings."""
    try:
        yield
    except BaseException:
        await _kill(runner)
        raise
    if not only_on_failure:
        await _kill(runner)


async def _kill(runner: asyncio.subprocess.Process) -> None:
    if runner.returncode is None:
        runner.kill()
        await runner.communicate()


async def ends_canceled(runner: asyncio.subprocess.Process, cli: Cli, job_id: str) -> None:
    """Ctrl-C on the caller: the job is canceled and the caller exits 130."""
    runner.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 130, err
    assert (await shown(cli, job_id))["status"] == "CANCELED"


@pytest.mark.docker
async def test_ctrl_z_stops_the_warm_command_with_its_caller(docker_agent: Agent, warm_cli: Cli) -> None:
    """As at a terminal: the caller in a process group of its own, which a shell with job control
    stops and continues (fg, bg)."""
    runner, job_id = await sleeping_run(warm_cli, process_group=0)
    async with reaped(runner):
        command = await the_running_command(warm_cli)
        runner.send_signal(signal.SIGTSTP)
        await eventually(lambda: state_of(command) == state_of(runner.pid) == "T", 30, "both stopped")
        runner.send_signal(signal.SIGCONT)
        await eventually(lambda: "T" not in (state_of(command), state_of(runner.pid)), 30, "both going on")
        await ends_canceled(runner, warm_cli, job_id)  # the command still answers Ctrl-C


@pytest.mark.docker
async def test_ctrl_z_where_nothing_can_stop_leaves_the_command_going(
    docker_agent: Agent, warm_cli: Cli
) -> None:
    """The caller in a process group no shell controls (a session of its own): the kernel drops
    its SIGTSTP, so it does not stop, and neither may its command stay stopped."""
    runner, job_id = await sleeping_run(warm_cli, start_new_session=True)
    async with reaped(runner):
        runner.send_signal(signal.SIGTSTP)
        await ends_canceled(runner, warm_cli, job_id)  # a stopped command would never take the SIGINT


@pytest.mark.docker
async def test_the_command_of_a_killed_caller_ends_and_its_job_runs_on(
    docker_agent: Agent, warm_cli: Cli
) -> None:
    runner, job_id = await started_run(warm_cli)
    command = await the_running_command(warm_cli)
    with ended_process(command) as ended:
        runner.kill()  # no signal to pass on: as a killed `testhide run` leaves its job
        await asyncio.wait_for(ended, 30)
    assert (await shown(warm_cli, job_id))["status"] == "RUNNING"
    assert (await warm_cli("cancel", job_id)).returncode == 0


async def test_only_a_private_directory_is_used(warm_cli: Cli) -> None:
    directory = warm_cli.warm_socket.parent
    assert directory.stat().st_mode & 0o777 == 0o700
    assert warm_cli.warm_socket.stat().st_mode & 0o777 == 0o600
    assert warm_line((await warm_cli("--debug", "whoami")).stderr, warm_cli)
    directory.chmod(0o755)  # another user could reach the socket now: not used
    try:
        result = await warm_cli("--debug", "whoami")
        assert result.returncode == 0, result.stderr
        assert not warm_line(result.stderr, warm_cli)
    finally:
        directory.chmod(0o700)


async def test_another_user_is_not_served(warm_cli: Cli) -> None:
    """Even where the directory lets another user reach the socket."""
    if os.geteuid() != 0:
        unavailable("connecting as another user (nobody) needs root")
    warm_cli.warm_socket.parent.chmod(0o711)
    warm_cli.warm_socket.chmod(0o666)
    # A whole request, as a caller of this installation sends it (`whoami`, the stranger's streams).
    # The directories above (pytest's) are closed to other users: the stranger holds the socket's
    # directory open from before it became one, and connects through that.
    probe = (
        "import os, socket, sys\n"
        "from testhide.cli import main\n"
        "request = main._request(['whoami'])\n"
        "directory = os.open(os.path.dirname(sys.argv[1]), os.O_PATH)\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(f'/proc/self/fd/{directory}/{os.path.basename(sys.argv[1])}')\n"
        "try:\n    main._send(s, request); reply = s.recv(64)\n"
        "except (BrokenPipeError, ConnectionResetError):\n    reply = b''  # closed on it\n"
        "print(repr(reply))\n"
    )
    stranger = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        probe,
        str(warm_cli.warm_socket),
        env=warm_cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(stranger.communicate(), 30)
    assert stranger.returncode == 0, err
    assert out == b"b''\n"  # connected, and closed without a word
    warm_pid = warm_cli.warm_pid()
    assert warm_pid is not None
    assert children_of(warm_pid) == []


async def test_a_changed_installation_makes_the_warm_process_give_way(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    extra = tmp_path / "on-the-path"
    extra.mkdir()
    cli = Cli(tmp_path / "config", warm=True)
    cli.env["PYTHONPATH"] = f"{cli.env['PYTHONPATH']}:{extra}"
    try:
        assert (await cli.login(cp)).returncode == 0
        await eventually(cli.warm_answers, 60, "the warm process")
        first = cli.warm_pid()
        assert first is not None
        assert warm_line((await cli("--debug", "whoami")).stderr, cli)
        (extra / "upgraded.py").write_text("")  # an import path changed under it
        with ended_process(first) as ended:
            result = await cli("--debug", "whoami")
            assert result.returncode == 0, result.stderr
            assert not warm_line(result.stderr, cli)  # run by its own process instead
            await asyncio.wait_for(ended, 30)
        await eventually(cli.warm_answers, 60, "a new warm process")
        assert cli.warm_pid() not in (None, first)
        assert warm_line((await cli("--debug", "whoami")).stderr, cli)
    finally:
        await cli.stop_warm()


async def test_the_warm_process_imports_nothing_from_the_callers_directory(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    """It is started from the caller's directory, which may hold a file named like a module it
    imports (tenacity): not on its import path, and it does not keep that directory."""
    workspace = tmp_path / "project"
    workspace.mkdir()
    marker = tmp_path / "imported"
    (workspace / "tenacity.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cli = Cli(tmp_path / "config", cwd=workspace, warm=True)
    try:
        assert (await cli.login(cp)).returncode == 0
        await eventually(cli.warm_answers, 60, "the warm process")
        warm_pid = cli.warm_pid()
        assert warm_pid is not None
        assert os.readlink(f"/proc/{warm_pid}/cwd") == "/"
        assert not marker.exists()
        assert warm_line((await cli("--debug", "whoami")).stderr, cli)
    finally:
        await cli.stop_warm()


async def test_sigterm_stops_the_warm_process_and_removes_its_socket(warm_cli: Cli) -> None:
    await warm_cli.stop_warm()
    assert not warm_cli.warm_socket.exists()
    assert warm_cli.warm_pid() is None


async def test_off_starts_no_warm_process(cp: RunningControlPlane, tmp_path: Path) -> None:
    cli = Cli(tmp_path / "config")  # TESTHIDE_CLI_WARM=off
    assert (await cli.login(cp)).returncode == 0
    result = await cli("--debug", "whoami")
    assert result.returncode == 0, result.stderr
    assert not warm_line(result.stderr, cli)
    assert not cli.warm_socket.parent.exists()


def test_an_idle_warm_process_ends_and_removes_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "warm" / "idle.sock"
    before = signal.getsignal(signal.SIGCHLD), signal.getsignal(signal.SIGTERM)
    warm.serve(str(path), idle_s=0.2)
    assert not path.exists()
    assert (signal.getsignal(signal.SIGCHLD), signal.getsignal(signal.SIGTERM)) == before
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_a_second_warm_process_for_the_same_socket_leaves_at_once(tmp_path: Path) -> None:
    path = tmp_path / "warm" / "taken.sock"
    path.parent.mkdir(mode=0o700)
    command = [sys.executable, "-m", "testhide.cli.warm", str(path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as first:
        try:
            assert first.stdout is not None
            assert first.stdout.readline() == "ready\n"
            second = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            assert (second.returncode, second.stdout) == (0, "")
            with socket.socket(socket.AF_UNIX) as probe:
                assert at_socket(str(path), probe.connect)  # the first one's
        finally:
            first.terminate()
            first.wait(30)
    assert not path.exists()


def flood(path: Path, busy: threading.Event, done: threading.Event) -> None:
    """Connections to ``path``, one after another, until ``done``; ``busy`` after 50."""
    for count in itertools.count():
        if done.is_set():
            return
        with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
            at_socket(str(path), probe.connect)
        if count == 50:
            busy.set()


@pytest.mark.slow
def test_sigterm_stops_a_warm_process_that_callers_keep_busy(tmp_path: Path) -> None:
    """A SIGTERM that lands while the warm process forks a child still stops it (its handler
    then runs inside the fork's own callbacks, where an exception raised by it was lost: the
    process served on). Eight processes, each stopped under a flood of connections."""
    for attempt in range(8):
        path = tmp_path / f"warm-{attempt}" / "busy.sock"
        path.parent.mkdir(mode=0o700)
        command = [sys.executable, "-m", "testhide.cli.warm", str(path)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as warm_process:
            assert warm_process.stdout is not None
            assert warm_process.stdout.readline() == "ready\n"
            busy, done = threading.Event(), threading.Event()
            flooding = threading.Thread(target=flood, args=(path, busy, done))
            flooding.start()
            try:
                assert busy.wait(30)
                warm_process.terminate()
                assert warm_process.wait(30) == 0
            finally:
                done.set()
                flooding.join()
                warm_process.kill()


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "--", "true"], "run"),
        (["--debug", "--profile", "ci", "logs", "-f", "j"], "logs"),
        (["--profile=ci", "jobs", "list"], "jobs"),
        (["login", "--user", "ada"], None),  # asks for a password
        (["mfa", "enable"], None),
        (["--profile", "run"], None),  # "run" is the profile's name
        (["--version"], None),
        ([], None),
    ],
)
def test_which_commands_start_warm(argv: list[str], command: str | None) -> None:
    assert warm_command(argv) == command


async def test_a_warm_detached_run_prints_its_job(warm_cli: Cli) -> None:
    """`run --detach` into a pool no agent serves: the warm command submits, prints the id, exits 0."""
    assert (await warm_cli("admin", "pools", "create", "parked")).returncode == 0
    ran = await warm_cli("--debug", "run", "--detach", "--pool", "parked", "--image", JOB_IMAGE, "--", "true")
    assert ran.returncode == 0, ran.stderr
    assert warm_line(ran.stderr, warm_cli)
    assert (await shown(warm_cli, ran.stdout.decode().strip()))["status"] == "QUEUED"
