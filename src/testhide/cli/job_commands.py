"""The engineer's commands about jobs once submitted: ``jobs list|show``, ``logs``, ``tests``,
``artifacts``, ``cancel``, and the organisation's ``secrets``."""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from testhide.cli import exitcodes
from testhide.cli.completion import complete_job_ids
from testhide.cli.config import Login
from testhide.cli.errors import ArtifactRefused, CliError
from testhide.cli.follow import Reconnect, stream_log
from testhide.cli.model import (
    Artifact,
    ArtifactKind,
    Job,
    JobQuery,
    JobStatus,
)
from testhide.cli.output import (
    artifact_json,
    artifact_line,
    dumps,
    job_details,
    job_json,
    jobs_table,
    results_json,
    results_summary,
    secret_json,
    secrets_table,
    timestamp,
)
from testhide.common.since import Since

# gRPC and the generated messages (cli/wire.py) are imported by the commands
# that talk to the control plane, not for `testhide --help` or a usage error.
if TYPE_CHECKING:
    pass
from testhide.cli.common import call, echo_lines, notice, pair, reconnect_window, run_async


@click.group()
def jobs() -> None:
    """List and inspect jobs."""


_STATUSES = [s.value for s in JobStatus if s != JobStatus.UNSPECIFIED]


@jobs.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_STATUSES, case_sensitive=False),
    help="Only jobs in this status (repeatable: any of them).",
)
@click.option(
    "--label", "labels", multiple=True, metavar="K=V", help="Only jobs with this label (repeatable)."
)
@click.option("--pool", default="", help="Only jobs of this pool.")
@click.option(
    "--since", type=Since(), default=None, help="Only jobs created since: 2h, 3d or an RFC 3339 time."
)
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="Jobs per page.")
@click.option("--page-token", default="", help="Start at this page (printed after the previous one).")
@click.option("--all", "all_pages", is_flag=True, help="Follow every page, not just the first.")
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def jobs_list(
    statuses: tuple[str, ...],
    labels: tuple[str, ...],
    pool: str,
    since: datetime | None,
    limit: int,
    page_token: str,
    all_pages: bool,
    as_json: bool,
) -> None:
    """The organisation's jobs, newest first, one page at a time (or --all)."""
    from testhide.cli.wire import connect

    try:
        pairs = dict(pair("--label", x) for x in labels)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    query = JobQuery(tuple(JobStatus(s.upper()) for s in dict.fromkeys(statuses)), pairs, pool, since)

    async def go() -> tuple[list[Job], str]:
        found, token = [], page_token
        async with connect(Login.load()) as api:
            while True:
                page, token = await api.list_jobs(query, limit, token)
                found += page
                if not (all_pages and token):
                    return found, token

    found, next_token = run_async(go())
    if as_json:
        click.echo(dumps([job_json(job) for job in found]))
    else:
        echo_lines(jobs_table(found))
    if next_token:
        notice(f"more jobs: {shlex.join(_next_page(query, limit, as_json, next_token))}")


def _next_page(query: JobQuery, limit: int, as_json: bool, token: str) -> list[str]:
    """The command that lists the page after this one: the same filter, with
    ``--since`` as the time it stood for (a duration would move with the clock)."""
    args = ["testhide", "jobs", "list"]
    args += [a for s in query.statuses for a in ("--status", s.value)]
    args += [a for k, v in query.labels.items() for a in ("--label", f"{k}={v}")]
    args += ["--pool", query.pool] if query.pool else []
    args += ["--since", timestamp(query.since) or ""] if query.since else []
    args += ["--limit", str(limit), *(["--json"] if as_json else []), "--page-token", token]
    return args


@jobs.command("show")
@click.argument("job_id", shell_complete=complete_job_ids)
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def jobs_show(job_id: str, as_json: bool) -> None:
    job = call(lambda api: api.get(job_id))
    if as_json:
        click.echo(dumps(job_json(job)))
    else:
        echo_lines(job_details(job))


@click.command()
@click.argument("job_id", shell_complete=complete_job_ids)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@click.option(
    "--service",
    metavar="NAME",
    default=None,
    help="Print this service's output instead (once the job ended).",
)
@reconnect_window
def logs(job_id: str, follow: bool, service: str | None, reconnect_window: timedelta) -> None:
    """Print a job's log: stdout to stdout, stderr to stderr. With --service, a service's
    output (both streams, as it ran), kept when the job ended."""
    from testhide.cli.wire import connect

    if service is not None:
        if follow:
            raise click.UsageError(
                "--follow does not apply to --service: a service's output is kept when the job ends"
            )
        run_async(_service_log(job_id, service))
        return

    async def go() -> None:
        async with connect(Login.load()) as api:
            finished = await stream_log(
                api,
                job_id,
                follow,
                sys.stdout.buffer,
                sys.stderr.buffer,
                Reconnect(reconnect_window),
                notice,
            )
        if finished is not None and finished.retried_as:
            notice(
                f"job {job_id} {finished.status.value}: {finished.status_reason}; "
                f"retried as job {finished.retried_as}"
            )

    run_async(go())


async def _service_log(job_id: str, service: str) -> None:
    """Write the service's output to stdout as it downloads; its sha256 is checked at the end."""
    from testhide.cli.wire import connect
    from testhide.cli.wire_convert import service_log_path

    path = service_log_path(service)
    async with connect(Login.load()) as api:
        found = {a.path: a for a in await api.artifacts(job_id) if a.kind == ArtifactKind.SERVICE_LOG}
        if path not in found:
            names = ", ".join(s.name for s in (await api.get(job_id)).spec.services)
            its = f"its services: {names}" if names else "it has no services"
            raise CliError(f"job {job_id} has no output of service {service} ({its})")
        digest = hashlib.sha256()
        async for data in api.download(job_id, path):
            digest.update(data)
            await asyncio.to_thread(_write_out, data)
    if digest.hexdigest() != found[path].sha256:
        raise ArtifactRefused(f"the output of service {service} does not match its sha256")


def _write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@click.command()
@click.argument("job_id", shell_complete=complete_job_ids)
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def tests(job_id: str, as_json: bool) -> None:
    """A job's test results: a summary and the failures; exits 1 if a test failed."""
    results = call(lambda api: api.test_results(job_id))
    if as_json:
        click.echo(dumps(results_json(results)))
    else:
        echo_lines(results_summary(results))
    if results.failed or results.errors:
        raise click.exceptions.Exit(exitcodes.TESTS_FAILED)


@click.command()
@click.argument("job_id", shell_complete=complete_job_ids)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write the artifacts into.",
)
@click.option("--list", "list_only", is_flag=True, help="List the artifacts; download nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON, as described in README.md.")
def artifacts(job_id: str, output: Path, list_only: bool, as_json: bool) -> None:
    """Download a job's artifacts and verify their sha256 (or only --list them)."""
    from testhide.cli.wire import connect

    async def go() -> list[Artifact]:
        async with connect(Login.load()) as api:
            found = await api.artifacts(job_id)
            for artifact in [] if list_only else found:
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

    found = run_async(go())
    if as_json:
        click.echo(dumps([artifact_json(a) for a in found]))
    else:
        echo_lines([artifact_line(a) for a in found])


def safe_join(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or relative.startswith("/"):
        raise ArtifactRefused(f"refusing artifact path {relative!r}: it leaves {root}")
    return target


@click.group()
def secrets() -> None:
    """Organisation secrets (values are write-only)."""


@secrets.command("set")
@click.argument("name")
def secrets_set(name: str) -> None:
    """Set NAME to the value read from standard input."""
    value = sys.stdin.buffer.read()
    if value.endswith(b"\n") and value.count(b"\n") == 1:
        value = value[:-1]  # `echo value | testhide secrets set NAME`

    call(lambda api: api.set_secret(name, value))
    click.echo(f"secret {name} set", err=True)


@secrets.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON, as described in README.md.")
def secrets_list(as_json: bool) -> None:
    """The organisation's secrets (names only), when each was set and last used."""
    found = call(lambda api: api.secrets())
    if as_json:
        click.echo(dumps([secret_json(s) for s in found]))
    else:
        echo_lines(secrets_table(found))


@secrets.command("delete")
@click.argument("name")
def secrets_delete(name: str) -> None:
    call(lambda api: api.delete_secret(name))
    click.echo(f"secret {name} deleted", err=True)


@click.command()
@click.argument("job_id", shell_complete=complete_job_ids)
def cancel(job_id: str) -> None:
    """Cancel a job: SIGTERM, a grace period, then SIGKILL."""
    job = call(lambda api: api.cancel(job_id))
    click.echo(f"job {job.id}: {job.status.value}", err=True)
