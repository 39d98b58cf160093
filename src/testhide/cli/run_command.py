"""``testhide run``: upload the workspace, submit the job, follow it to its end (saying why
it waits, and what Ctrl-C does) and exit with its exit code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, cast

import click

from testhide.cli import exitcodes
from testhide.cli.config import Login
from testhide.cli.follow import Reconnect, WaitNotices, follow_attempts
from testhide.cli.model import (
    Job,
    JobRequest,
)
from testhide.cli.run_options import fetch_options, services
from testhide.common.durations import parse_duration
from testhide.common.sizes import KiB, Size

# gRPC and the generated messages (cli/wire.py) are imported by the commands
# that talk to the control plane, not for `testhide --help` or a usage error.
if TYPE_CHECKING:
    from testhide.cli.wire import ControlPlaneClient
from testhide.cli.common import echo_lines, notice, pair, reconnect_window, run_async


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--image", required=True, help="Image to run the job in.")
@click.option("--pool", default="default", show_default=True)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--timeout", default="1h", show_default=True, help="e.g. 90s, 10m, 1h.")
@click.option("--workdir", default="/workspace", show_default=True)
@click.option("--cpus", type=float, default=None)
@click.option("--memory", type=Size(unitless_min=KiB), default=None, help="Memory limit, e.g. 512MiB, 2GiB.")
@click.option("--pids", type=int, default=None, help="Maximum number of processes.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Run only on agents offering these.")
@click.option("--secret", "secrets", multiple=True, metavar="NAME", help="Organisation secret as env var.")
@click.option("--runtime", type=click.Choice(["runc", "runsc"]), default=None, help="runsc: under gVisor.")
@click.option(
    "--fetch",
    metavar="'CMD'",
    default=None,
    help="Run CMD (sh -c) first, reaching only the pool's egress list through a proxy; /cache writable.",
)
@click.option(
    "--fetch-secret", "fetch_secrets", multiple=True, metavar="NAME", help="Organisation secret for --fetch."
)
@click.option("--cache", metavar="KEY", default=None, help="Keep /cache under KEY; a hit skips --fetch.")
@click.option(
    "--service",
    "service_images",
    multiple=True,
    metavar="NAME=IMAGE",
    help="A service beside the job, at 127.0.0.1 (repeatable).",
)
@click.option(
    "--service-command",
    "service_commands",
    multiple=True,
    metavar="NAME='CMD ARGS'",
    help="The service's command instead of its image's.",
)
@click.option(
    "--service-env", "service_envs", multiple=True, metavar="NAME:K=V", help="A service's variable."
)
@click.option(
    "--service-tmpfs",
    "service_tmpfs",
    multiple=True,
    metavar="NAME:PATH",
    help="A writable tmpfs for a service.",
)
@click.option(
    "--artifacts", "artifact_globs", multiple=True, metavar="GLOB", help="Files to keep (under /workspace)."
)
@click.option("--junit", "junit_globs", multiple=True, metavar="GLOB", help="JUnit XML reports to parse.")
@click.option("--no-workspace", is_flag=True, help="Do not upload the current directory.")
@click.option(
    "--workspace-cap",
    type=Size(unitless_min=KiB),
    default="256MiB",
    show_default=True,
    help="Refuse larger workspaces.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="Run again if the job is LOST (its agent vanished mid-run).",
)
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@click.option(
    "--detach-on-interrupt",
    is_flag=True,
    help="Ctrl-C detaches from the job at once (by default the first cancels it, a second detaches).",
)
@reconnect_window
@click.argument("command", nargs=-1, required=True)
def run(
    image: str,
    pool: str,
    env: tuple[str, ...],
    timeout: str,
    workdir: str,
    cpus: float | None,
    memory: int | None,
    pids: int | None,
    labels: tuple[str, ...],
    secrets: tuple[str, ...],
    runtime: str | None,
    fetch: str | None,
    fetch_secrets: tuple[str, ...],
    cache: str | None,
    service_images: tuple[str, ...],
    service_commands: tuple[str, ...],
    service_envs: tuple[str, ...],
    service_tmpfs: tuple[str, ...],
    artifact_globs: tuple[str, ...],
    junit_globs: tuple[str, ...],
    no_workspace: bool,
    workspace_cap: int,
    retries: int,
    detach: bool,
    detach_on_interrupt: bool,
    reconnect_window: timedelta,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in IMAGE with the current directory as /workspace, follow
    its output and exit with its exit code. While the job waits, says why.
    Ctrl-C cancels the job and follows it to its end; a second Ctrl-C detaches."""
    fetch_step = fetch_options(fetch, fetch_secrets, cache)
    beside = services(service_images, service_commands, service_envs, service_tmpfs)
    try:
        request = JobRequest(
            image=image,
            command=command,
            pool=pool,
            workdir=workdir,
            timeout=parse_duration(timeout),
            env=dict(pair("--env", e) for e in env),
            labels=dict(pair("--label", x) for x in labels),
            cpus=cpus or 0.0,
            memory_bytes=memory or 0,
            pids=pids or 0,
            secrets=secrets,
            runtime=runtime or "",
            artifact_globs=artifact_globs,
            junit_globs=junit_globs,
            retries=retries,
            fetch=fetch_step.fetch,
            fetch_secrets=fetch_step.fetch_secrets,
            cache=fetch_step.cache,
            services=beside,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    login_data = Login.load()
    from testhide.cli.wire import connect

    archive = None
    if not no_workspace:
        from testhide.cli.workspace import pack  # pathspec: only when a workspace is sent

        archive = pack(Path.cwd(), workspace_cap)

    async def go() -> int:
        async with connect(login_data) as api:
            workspace_id = (
                "" if archive is None else await api.upload_workspace(_chunks_with_progress(archive))
            )
            job = await api.submit(replace(request, workspace_id=workspace_id))
            if detach:
                click.echo(job.id)
                return 0
            click.echo(f"job {job.id} queued", err=True)
            stderr = _LastLine(sys.stderr.buffer)
            finished = await _follow_run(
                api, job.id, Reconnect(reconnect_window), detach_on_interrupt, stderr
            )
            if finished is None:
                return exitcodes.CANCELED  # detached: the job runs on
            if not finished.status.exited or finished.status_reason:
                # The reason once (a FAILED job has one when testhide stopped it: its fetch step
                # failed, a service exited early, out of memory); the agent may have logged it just now.
                said = stderr.said(f"testhide: {finished.status_reason}")
                reason = "" if said else f": {finished.status_reason}"
                click.echo(f"job {finished.id} {finished.status.value}{reason}", err=True)
            if junit_globs:
                from testhide.cli.output import results_summary

                echo_lines(results_summary(await api.test_results(finished.id)), err=True)
            return exitcodes.of_job(finished)

    try:
        sys.exit(run_async(go()))
    finally:
        if archive is not None:
            archive.close()


class _LastLine:
    """The job's stderr (its own and testhide's lines in its log), remembering its last line:
    the agent logs a job that could not be set up as ``testhide: REASON``, and `run` does not
    print the same reason again as the job's last word."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._tail = b""

    def write(self, data: bytes) -> int:
        self._tail = (self._tail + data)[-8192:]
        return self._target.write(data)

    def flush(self) -> None:
        self._target.flush()

    def said(self, line: str) -> bool:
        return self._tail.endswith(line.encode() + b"\n")


async def _follow_run(
    api: ControlPlaneClient,
    job_id: str,
    reconnect: Reconnect,
    detach_on_interrupt: bool,
    stderr: _LastLine,
) -> Job | None:
    """Follow the job to its end, saying why it waits; None if Ctrl-C detached from it."""
    from testhide.cli.interrupt import Interrupts

    notices = WaitNotices(notice)
    notices.job_id = job_id
    interrupts = Interrupts(lambda: notices.job_id, api.cancel, notice, detach_on_interrupt)
    follower = asyncio.ensure_future(
        follow_attempts(
            api, job_id, sys.stdout.buffer, cast(BinaryIO, stderr), reconnect, notice, notices.update
        )
    )
    with interrupts.installed(follower):
        try:
            return await follower
        except asyncio.CancelledError:
            if not interrupts.detached:
                raise
            return None
        finally:
            await interrupts.settle()


UPLOAD_CHUNK = 1024 * 1024
PROGRESS_ABOVE = 8 * 1024 * 1024


async def _chunks_with_progress(archive: IO[bytes]) -> AsyncIterator[bytes]:
    size = archive.seek(0, 2)
    archive.seek(0)
    if size <= PROGRESS_ABOVE:
        while chunk := archive.read(UPLOAD_CHUNK):
            yield chunk
        return
    with click.progressbar(length=size, label="uploading workspace", file=sys.stderr) as bar:
        while chunk := archive.read(UPLOAD_CHUNK):
            yield chunk
            bar.update(len(chunk))
