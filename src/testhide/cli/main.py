"""``testhide``: the engineer's command. Each command parses its options,
talks to the control plane through `cli/wire.py` in the CLI's own model, and
prints (`cli/output.py`); its exit status follows `cli/exitcodes.py`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from testhide import __version__
from testhide.cli import exitcodes
from testhide.cli.config import Login
from testhide.cli.errors import ArtifactRefused, CliError
from testhide.cli.follow import DEFAULT_WINDOW, Reconnect, follow_attempts, stream_log
from testhide.cli.model import ApiKeyLogin, Artifact, Job, JobRequest, PasswordLogin, TestResults
from testhide.cli.output import (
    dumps,
    job_details,
    job_json,
    jobs_table,
    results_json,
    results_summary,
    timestamp,
)
from testhide.common.durations import Duration, format_duration, parse_duration
from testhide.common.sizes import Size

# gRPC and the generated messages (cli/wire.py) are imported by the commands
# that talk to the control plane, not for `testhide --help` or a usage error.

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(exitcodes.CANCELED) from None


def _echo_lines(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


def _notice(line: str) -> None:
    click.echo(line, err=True)


@contextmanager
def _own_failures() -> Iterator[None]:
    """click exits 2 on a usage error and 1 on its other errors, numbers a
    job's own command uses too: every failure of testhide itself exits 125."""
    try:
        yield
    except click.ClickException as exc:
        # An instance attribute on purpose: click's main() reads it, and the
        # exception keeps its own message and usage text.
        exc.exit_code = exitcodes.TOOL_FAILED  # type: ignore[misc]
        raise
    except click.Abort as exc:  # a prompt got Ctrl-C or end of input
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise click.exceptions.Exit(exitcodes.CANCELED) from exc
        raise CliError("aborted: no input") from exc
    except KeyboardInterrupt:
        raise click.exceptions.Exit(exitcodes.CANCELED) from None


class _Testhide(click.Group):
    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _own_failures():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _own_failures():
            return super().invoke(ctx)


def _reconnect_window(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--reconnect-window",
        type=Duration(),
        default=format_duration(DEFAULT_WINDOW),
        envvar="TESTHIDE_RECONNECT_WINDOW",
        show_envvar=True,
        show_default=True,
        help="After losing the control plane, keep reconnecting this long (counted afresh at each loss).",
    )(command)


@click.group(cls=_Testhide)
@click.version_option(__version__, prog_name="testhide", message="%(prog)s %(version)s")
def main() -> None:
    """Run CI jobs on testhide.

    Exit status: the job's own exit code; 124 timed out, 125 testhide itself
    failed (or the job could not be set up), 126 the command could not be
    executed, 127 the command was not found, 130 canceled.
    """


@main.command()
@click.option(
    "--server",
    "servers",
    required=True,
    multiple=True,
    help="HOST:PORT of the control plane's API port; repeat for each replica (tried in order).",
)
@click.option("--api-key", envvar="TESTHIDE_API_KEY", help="An API key (or log in as a user with --user).")
@click.option("--org", default="default", show_default=True, help="Organisation of --user.")
@click.option("--user", help="Log in with a user name and password (prompted, or TESTHIDE_PASSWORD).")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate of the control plane (default: the system's trust store).",
)
def login(
    servers: tuple[str, ...], api_key: str | None, org: str, user: str | None, ca_file: Path | None
) -> None:
    """Log in: the credential buys a session (a 10-minute access token, renewed
    with a rotating refresh token); only the session is stored (mode 0600).
    Every command tries the servers in order and passes over one that does not
    connect."""
    from testhide.cli.wire import log_in

    if bool(api_key) == bool(user):
        raise click.UsageError("log in with either --api-key or --user")
    credential: ApiKeyLogin | PasswordLogin
    if user:
        password = os.environ.get("TESTHIDE_PASSWORD") or click.prompt("password", hide_input=True, err=True)
        credential = PasswordLogin(org=org, user=user, password=password)
    else:
        assert api_key is not None
        credential = ApiKeyLogin(api_key.strip())
    servers = tuple(dict.fromkeys(servers))
    session = _run(log_in(Login(servers, ca_file.read_text() if ca_file else None), credential))
    path = session.save()
    click.echo(f"logged in to {', '.join(servers)}; session stored in {path}", err=True)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--image", required=True, help="Image to run the job in.")
@click.option("--pool", default="default", show_default=True)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--timeout", default="1h", show_default=True, help="e.g. 90s, 10m, 1h.")
@click.option("--workdir", default="/workspace", show_default=True)
@click.option("--cpus", type=float, default=None)
@click.option("--memory", type=Size(), default=None, help="Memory limit, e.g. 512MiB, 2GiB.")
@click.option("--pids", type=int, default=None, help="Maximum number of processes.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Run only on agents offering these.")
@click.option("--secret", "secrets", multiple=True, metavar="NAME", help="Organisation secret as env var.")
@click.option("--runtime", type=click.Choice(["runc", "runsc"]), default=None, help="runsc: under gVisor.")
@click.option(
    "--artifacts", "artifact_globs", multiple=True, metavar="GLOB", help="Files to keep (under /workspace)."
)
@click.option("--junit", "junit_globs", multiple=True, metavar="GLOB", help="JUnit XML reports to parse.")
@click.option("--no-workspace", is_flag=True, help="Do not upload the current directory.")
@click.option(
    "--workspace-cap", type=Size(), default="256MiB", show_default=True, help="Refuse larger workspaces."
)
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="Run again if the job is LOST (its agent vanished mid-run).",
)
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@_reconnect_window
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
    artifact_globs: tuple[str, ...],
    junit_globs: tuple[str, ...],
    no_workspace: bool,
    workspace_cap: int,
    retries: int,
    detach: bool,
    reconnect_window: timedelta,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in IMAGE with the current directory as /workspace, follow
    its output and exit with its exit code."""
    try:
        request = JobRequest(
            image=image,
            command=command,
            pool=pool,
            workdir=workdir,
            timeout=parse_duration(timeout),
            env=dict(_pair("--env", e) for e in env),
            labels=dict(_pair("--label", x) for x in labels),
            cpus=cpus or 0.0,
            memory_bytes=memory or 0,
            pids=pids or 0,
            secrets=secrets,
            runtime=runtime or "",
            artifact_globs=artifact_globs,
            junit_globs=junit_globs,
            retries=retries,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    login_data = Login.load()
    from testhide.cli.wire import connect
    from testhide.cli.workspace import pack  # pathspec: only when a workspace is sent

    archive = None if no_workspace else pack(Path.cwd(), workspace_cap)

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
            finished = await follow_attempts(
                api, job.id, sys.stdout.buffer, sys.stderr.buffer, Reconnect(reconnect_window), _notice
            )
            if not finished.status.exited:
                click.echo(f"job {finished.id} {finished.status.value}: {finished.status_reason}", err=True)
            if junit_globs:
                _echo_lines(results_summary(await api.test_results(finished.id)), err=True)
            return exitcodes.of_job(finished)

    try:
        sys.exit(_run(go()))
    finally:
        if archive is not None:
            archive.close()


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


def _pair(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} takes KEY=VALUE, not {text!r}")
    return key, value


@main.group()
def jobs() -> None:
    """List and inspect jobs."""


@jobs.command("list")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def jobs_list(limit: int, as_json: bool) -> None:
    from testhide.cli.wire import connect

    async def go() -> list[Job]:
        async with connect(Login.load()) as api:
            return await api.list_jobs(limit)

    found = _run(go())
    if as_json:
        click.echo(dumps([job_json(job) for job in found]))
    else:
        _echo_lines(jobs_table(found))


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def jobs_show(job_id: str, as_json: bool) -> None:
    from testhide.cli.wire import connect

    async def go() -> Job:
        async with connect(Login.load()) as api:
            return await api.get(job_id)

    job = _run(go())
    if as_json:
        click.echo(dumps(job_json(job)))
    else:
        _echo_lines(job_details(job))


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@_reconnect_window
def logs(job_id: str, follow: bool, reconnect_window: timedelta) -> None:
    """Print a job's log: stdout to stdout, stderr to stderr."""
    from testhide.cli.wire import connect

    async def go() -> None:
        async with connect(Login.load()) as api:
            finished = await stream_log(
                api,
                job_id,
                follow,
                sys.stdout.buffer,
                sys.stderr.buffer,
                Reconnect(reconnect_window),
                _notice,
            )
        if finished is not None and finished.retried_as:
            _notice(
                f"job {job_id} {finished.status.value}: {finished.status_reason}; "
                f"retried as job {finished.retried_as}"
            )

    _run(go())


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def tests(job_id: str, as_json: bool) -> None:
    """A job's test results: a summary and the failures; exits 1 if a test failed."""
    from testhide.cli.wire import connect

    async def go() -> TestResults:
        async with connect(Login.load()) as api:
            return await api.test_results(job_id)

    results = _run(go())
    if as_json:
        click.echo(dumps(results_json(results)))
    else:
        _echo_lines(results_summary(results))
    if results.failed or results.errors:
        raise click.exceptions.Exit(exitcodes.TESTS_FAILED)


@main.command()
@click.argument("job_id")
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write the artifacts into.",
)
def artifacts(job_id: str, output: Path) -> None:
    """Download a job's artifacts and verify their sha256."""
    from testhide.cli.wire import connect

    async def go() -> list[Artifact]:
        async with connect(Login.load()) as api:
            found = await api.artifacts(job_id)
            for artifact in found:
                target = safe_join(output, artifact.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                partial = target.with_name(target.name + ".partial")
                handle = await asyncio.to_thread(open, partial, "wb")
                try:
                    async for data in api.download(job_id, artifact.path):
                        digest.update(data)
                        await asyncio.to_thread(handle.write, data)
                finally:
                    handle.close()
                if digest.hexdigest() != artifact.sha256:
                    partial.unlink()
                    raise ArtifactRefused(f"{artifact.path}: sha256 mismatch; nothing written")
                partial.replace(target)
            return found

    for artifact in _run(go()):
        click.echo(f"{artifact.path}  {artifact.size} bytes  sha256:{artifact.sha256}")


def safe_join(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or relative.startswith("/"):
        raise ArtifactRefused(f"refusing artifact path {relative!r}: it leaves {root}")
    return target


@main.group()
def secrets() -> None:
    """Organisation secrets (values are write-only)."""


@secrets.command("set")
@click.argument("name")
def secrets_set(name: str) -> None:
    """Set NAME to the value read from standard input."""
    from testhide.cli.wire import connect

    value = sys.stdin.buffer.read()
    if value.endswith(b"\n") and value.count(b"\n") == 1:
        value = value[:-1]  # `echo value | testhide secrets set NAME`

    async def go() -> None:
        async with connect(Login.load()) as api:
            await api.set_secret(name, value)

    _run(go())
    click.echo(f"secret {name} set", err=True)


@secrets.command("list")
def secrets_list() -> None:
    from testhide.cli.wire import connect

    async def go() -> list[tuple[str, str]]:
        async with connect(Login.load()) as api:
            return [(s.name, timestamp(s.updated_at) or "-") for s in await api.secrets()]

    for name, updated_at in _run(go()):
        click.echo(f"{name:<40} {updated_at}")


@secrets.command("delete")
@click.argument("name")
def secrets_delete(name: str) -> None:
    from testhide.cli.wire import connect

    async def go() -> None:
        async with connect(Login.load()) as api:
            await api.delete_secret(name)

    _run(go())
    click.echo(f"secret {name} deleted", err=True)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: SIGTERM, a grace period, then SIGKILL."""
    from testhide.cli.wire import connect

    async def go() -> Job:
        async with connect(Login.load()) as api:
            return await api.cancel(job_id)

    job = _run(go())
    click.echo(f"job {job.id}: {job.status.value}", err=True)


if __name__ == "__main__":
    main()
