"""``testhide``: the engineer's command."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click
import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from testhide.cli.client import JobsApi, connect, connect_secrets, log_in
from testhide.cli.config import Login
from testhide.common.durations import parse_duration
from testhide.protos.v1 import auth_pb2, jobs_pb2

T = TypeVar("T")

# Exit codes when a job ended without a process exit code, after timeout(1)
# and docker run's conventions.
EXIT_TIMED_OUT = 124
EXIT_INFRASTRUCTURE = 125
EXIT_CANCELED = 130
_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


def status_name(value: int) -> str:
    return jobs_pb2.JobStatus.Name(value).removeprefix("JOB_STATUS_")


def parse_memory(text: str) -> int:
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def job_as_dict(job: jobs_pb2.Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": status_name(job.status),
        "exit_code": job.exit_code if job.HasField("exit_code") else None,
        "status_reason": job.status_reason,
        "image": job.spec.image,
        "command": list(job.spec.command),
        "pool": job.spec.pool,
        "agent_id": job.agent_id,
        "created_at": job.created_at.ToJsonString() if job.HasField("created_at") else None,
        "started_at": job.started_at.ToJsonString() if job.HasField("started_at") else None,
        "finished_at": job.finished_at.ToJsonString() if job.HasField("finished_at") else None,
        "log_size": job.log_size,
        "transitions": [
            {"status": status_name(t.status), "at": t.at.ToJsonString(), "reason": t.reason}
            for t in job.transitions
        ],
    }


def exit_code_of(job: jobs_pb2.Job) -> int:
    if job.HasField("exit_code") and job.status in (
        jobs_pb2.JOB_STATUS_SUCCEEDED,
        jobs_pb2.JOB_STATUS_FAILED,
    ):
        return job.exit_code
    return {jobs_pb2.JOB_STATUS_TIMED_OUT: EXIT_TIMED_OUT, jobs_pb2.JOB_STATUS_CANCELED: EXIT_CANCELED}.get(
        job.status, EXIT_INFRASTRUCTURE
    )


def _reconnectable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


async def stream_log(
    api: JobsApi, job_id: str, follow: bool, out: BinaryIO, err: BinaryIO
) -> jobs_pb2.Job | None:
    """Write the log to out/err as it arrives, resuming from the last byte
    after a lost connection. With ``follow``, returns the finished job."""
    offset = 0
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(_reconnectable),
        reraise=True,
        wait=wait_random_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(300),
    ):
        with attempt:
            async for item in api.follow(job_id, offset, follow):
                if item.HasField("finished"):
                    return item.finished
                chunk = item.chunk
                target = out if chunk.stream == jobs_pb2.LOG_STREAM_STDOUT else err
                target.write(chunk.data)
                target.flush()
                offset = chunk.offset + len(chunk.data)
    return None


async def follow_attempts(api: JobsApi, job_id: str, out: BinaryIO, err: BinaryIO) -> jobs_pb2.Job:
    """Follow a job to its end and, when it was LOST and retried, its retries."""
    while True:
        finished = await stream_log(api, job_id, True, out, err)
        assert finished is not None
        if finished.status != jobs_pb2.JOB_STATUS_LOST or not finished.retried_as:
            return finished
        click.echo(
            f"job {job_id} LOST: {finished.status_reason}; retrying as job {finished.retried_as} "
            f"(attempt {finished.attempt + 1} of {finished.spec.retries + 1})",
            err=True,
        )
        job_id = finished.retried_as


@click.group()
def main() -> None:
    """Run CI jobs on testhide."""


@main.command()
@click.option("--server", required=True, help="HOST:PORT of the control plane's API port.")
@click.option("--api-key", envvar="TESTHIDE_API_KEY", help="An API key (or log in as a user with --user).")
@click.option("--org", default="default", show_default=True, help="Organisation of --user.")
@click.option("--user", help="Log in with a user name and password (prompted, or TESTHIDE_PASSWORD).")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate of the control plane (default: the system's trust store).",
)
def login(server: str, api_key: str | None, org: str, user: str | None, ca_file: Path | None) -> None:
    """Log in: the credential buys a session (a 10-minute access token, renewed
    with a rotating refresh token); only the session is stored (mode 0600)."""
    if bool(api_key) == bool(user):
        raise click.UsageError("log in with either --api-key or --user")
    if user:
        password = os.environ.get("TESTHIDE_PASSWORD") or click.prompt("password", hide_input=True, err=True)
        request = auth_pb2.LoginRequest(
            password=auth_pb2.PasswordLogin(org=org, user=user, password=password)
        )
    else:
        assert api_key is not None
        request = auth_pb2.LoginRequest(api_key=api_key.strip())
    session = _run(log_in(Login(server, ca_file.read_text() if ca_file else None), request))
    path = session.save()
    click.echo(f"logged in to {server}; session stored in {path}", err=True)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--image", required=True, help="Image to run the job in.")
@click.option("--pool", default="default", show_default=True)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--timeout", default="1h", show_default=True, help="e.g. 90s, 10m, 1h.")
@click.option("--workdir", default="/workspace", show_default=True)
@click.option("--cpus", type=float, default=None)
@click.option("--memory", default=None, help="e.g. 512m, 2g.")
@click.option("--pids", type=int, default=None, help="Maximum number of processes.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Run only on agents offering these.")
@click.option("--secret", "secrets", multiple=True, metavar="NAME", help="Organisation secret as env var.")
@click.option("--runtime", type=click.Choice(["runc", "runsc"]), default=None, help="runsc: under gVisor.")
@click.option(
    "--artifacts", "artifact_globs", multiple=True, metavar="GLOB", help="Files to keep (under /workspace)."
)
@click.option("--junit", "junit_globs", multiple=True, metavar="GLOB", help="JUnit XML reports to parse.")
@click.option("--no-workspace", is_flag=True, help="Do not upload the current directory.")
@click.option("--workspace-cap", default="256m", show_default=True, help="Refuse larger workspaces.")
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="Run again if the job is LOST (its agent vanished mid-run).",
)
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@click.argument("command", nargs=-1, required=True)
def run(
    image: str,
    pool: str,
    env: tuple[str, ...],
    timeout: str,
    workdir: str,
    cpus: float | None,
    memory: str | None,
    pids: int | None,
    labels: tuple[str, ...],
    secrets: tuple[str, ...],
    runtime: str | None,
    artifact_globs: tuple[str, ...],
    junit_globs: tuple[str, ...],
    no_workspace: bool,
    workspace_cap: str,
    retries: int,
    detach: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in IMAGE with the current directory as /workspace, follow
    its output and exit with its exit code."""
    try:
        spec = jobs_pb2.JobSpec(
            image=image,
            command=list(command),
            pool=pool,
            workdir=workdir,
            env=dict(_pair("--env", e) for e in env),
            labels=dict(_pair("--label", x) for x in labels),
            resources=jobs_pb2.Resources(
                cpus=cpus or 0, memory_bytes=parse_memory(memory) if memory else 0, pids=pids or 0
            ),
            secrets=list(secrets),
            runtime=runtime or "",
            artifact_globs=list(artifact_globs),
            junit_globs=list(junit_globs),
            retries=retries,
        )
        spec.timeout.FromTimedelta(parse_duration(timeout))
        cap = parse_memory(workspace_cap)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    login_data = Login.load()
    from testhide.cli.workspace import pack  # imported only when a workspace is sent

    archive = None if no_workspace else pack(Path.cwd(), cap)

    async def go() -> int:
        async with connect(login_data) as api:
            if archive is not None:
                uploaded = await api.upload_workspace(_chunks_with_progress(archive))
                spec.workspace_id = uploaded.workspace_id
            job = await api.submit(spec)
            if detach:
                click.echo(job.id)
                return 0
            click.echo(f"job {job.id} queued", err=True)
            finished = await follow_attempts(api, job.id, sys.stdout.buffer, sys.stderr.buffer)
            if finished.status not in (jobs_pb2.JOB_STATUS_SUCCEEDED, jobs_pb2.JOB_STATUS_FAILED):
                click.echo(
                    f"job {finished.id} {status_name(finished.status)}: {finished.status_reason}", err=True
                )
            if junit_globs:
                print_test_summary(await api.test_results(finished.id), err=True)
            return exit_code_of(finished)

    try:
        sys.exit(_run(go()))
    finally:
        if archive is not None:
            archive.close()


UPLOAD_CHUNK = 1024 * 1024
PROGRESS_ABOVE = 8 * 1024 * 1024


async def _chunks_with_progress(archive: BinaryIO) -> AsyncIterator[bytes]:
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


def print_test_summary(results: jobs_pb2.TestResults, err: bool = False) -> None:
    click.echo(
        f"tests: {results.total} total, {results.passed} passed, {results.failed} failed, "
        f"{results.errors} errors, {results.skipped} skipped",
        err=err,
    )
    for case in results.cases:
        if case.status in (jobs_pb2.TEST_STATUS_FAILED, jobs_pb2.TEST_STATUS_ERROR):
            where = ".".join(p for p in (case.classname, case.name) if p)
            click.echo(
                f"  {jobs_pb2.TestStatus.Name(case.status).removeprefix('TEST_STATUS_')} {where}: "
                f"{case.message.splitlines()[0] if case.message else ''}",
                err=err,
            )
    for path in results.rejected_reports:
        click.echo(f"  report refused: {path}", err=err)


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
@click.option("--json", "as_json", is_flag=True)
def jobs_list(limit: int, as_json: bool) -> None:
    async def go() -> list[jobs_pb2.Job]:
        async with connect(Login.load()) as api:
            return list((await api.list(page_size=limit)).jobs)

    found = _run(go())
    if as_json:
        click.echo(json.dumps([job_as_dict(j) for j in found], indent=2))
        return
    click.echo(f"{'ID':<30} {'STATUS':<10} {'EXIT':>4}  {'CREATED':<20} {'IMAGE':<24} COMMAND")
    for job in found:
        d = job_as_dict(job)
        exit_code = "" if d["exit_code"] is None else str(d["exit_code"])
        click.echo(
            f"{d['id']:<30} {d['status']:<10} {exit_code:>4}  {(d['created_at'] or '')[:19]:<20} "
            f"{d['image'][:24]:<24} {' '.join(' '.join(d['command']).split())[:60]}"
        )


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def jobs_show(job_id: str, as_json: bool) -> None:
    async def go() -> jobs_pb2.Job:
        async with connect(Login.load()) as api:
            return await api.get(job_id)

    d = job_as_dict(_run(go()))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for key in (
        "id",
        "status",
        "exit_code",
        "status_reason",
        "image",
        "command",
        "pool",
        "agent_id",
        "created_at",
        "started_at",
        "finished_at",
    ):
        click.echo(f"{key + ':':<15} {d[key] if d[key] not in (None, '') else '-'}")
    for t in d["transitions"]:
        click.echo(f"  {t['at']}  {t['status']:<10} {t['reason']}")


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, follow: bool) -> None:
    """Print a job's log: stdout to stdout, stderr to stderr."""

    async def go() -> None:
        async with connect(Login.load()) as api:
            finished = await stream_log(api, job_id, follow, sys.stdout.buffer, sys.stderr.buffer)
        if finished is not None and finished.retried_as:
            click.echo(
                f"job {job_id} {status_name(finished.status)}: {finished.status_reason}; "
                f"retried as job {finished.retried_as}",
                err=True,
            )

    _run(go())


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def tests(job_id: str, as_json: bool) -> None:
    """A job's test results: a summary and the failures."""

    async def go() -> jobs_pb2.TestResults:
        async with connect(Login.load()) as api:
            return await api.test_results(job_id)

    results = _run(go())
    if as_json:
        from google.protobuf.json_format import MessageToDict

        click.echo(json.dumps(MessageToDict(results, always_print_fields_with_no_presence=True), indent=2))
    else:
        print_test_summary(results)
    if results.failed or results.errors:
        raise click.exceptions.Exit(1)


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

    async def go() -> list[jobs_pb2.Artifact]:
        async with connect(Login.load()) as api:
            found = await api.artifacts(job_id)
            for artifact in found:
                target = safe_join(output, artifact.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                partial = target.with_name(target.name + ".partial")
                with open(partial, "wb") as handle:
                    async for chunk in api.download(job_id, artifact.path):
                        digest.update(chunk.data)
                        handle.write(chunk.data)
                if digest.hexdigest() != artifact.sha256:
                    partial.unlink()
                    raise click.ClickException(f"{artifact.path}: sha256 mismatch; nothing written")
                partial.replace(target)
            return found

    for artifact in _run(go()):
        click.echo(f"{artifact.path}  {artifact.size} bytes  sha256:{artifact.sha256}")


def safe_join(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or relative.startswith("/"):
        raise click.ClickException(f"refusing artifact path {relative!r}: it leaves {root}")
    return target


@main.group()
def secrets() -> None:
    """Organisation secrets (values are write-only)."""


@secrets.command("set")
@click.argument("name")
def secrets_set(name: str) -> None:
    """Set NAME to the value read from standard input."""
    value = sys.stdin.buffer.read()
    if value.endswith(b"\n") and value.count(b"\n") == 1:
        value = value[:-1]  # `echo value | testhide secrets set NAME`

    async def go() -> None:
        async with connect_secrets(Login.load()) as api:
            await api.set(name, value)

    _run(go())
    click.echo(f"secret {name} set", err=True)


@secrets.command("list")
def secrets_list() -> None:
    async def go() -> list[jobs_pb2.Secret]:
        async with connect_secrets(Login.load()) as api:
            return await api.list()

    for secret in _run(go()):
        click.echo(f"{secret.name:<40} {secret.updated_at.ToJsonString()}")


@secrets.command("delete")
@click.argument("name")
def secrets_delete(name: str) -> None:
    async def go() -> None:
        async with connect_secrets(Login.load()) as api:
            await api.delete(name)

    _run(go())
    click.echo(f"secret {name} deleted", err=True)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: SIGTERM, a grace period, then SIGKILL."""

    async def go() -> jobs_pb2.Job:
        async with connect(Login.load()) as api:
            return await api.cancel(job_id)

    job = _run(go())
    click.echo(f"job {job.id}: {status_name(job.status)}", err=True)


if __name__ == "__main__":
    main()
