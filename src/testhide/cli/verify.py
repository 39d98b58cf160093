"""``testhide verify JOB``: prove after the fact what a job did (the checks: cli/verification.py),
from the control plane or from a bundle written by ``--export`` (cli/bundle.py). The checks
import the cryptography library, so they are imported when the command runs, not for
``testhide --help``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from testhide.cli import exitcodes
from testhide.cli.bundle import ArtifactBytes, BundleError, Downloaded, VerifyFailed, read_bundle

# The checks import the cryptography library: imported when the command runs.
if TYPE_CHECKING:
    from testhide.cli.verification import Verified
from testhide.cli.common import notice, run_async
from testhide.cli.completion import complete_job_ids
from testhide.cli.config import Login
from testhide.cli.errors import CliError, RpcFailed

# Downloading ----------------------------------------------------------------------------------


async def download(job_id: str, on_server: Callable[[str], None], in_toto: bool = False) -> Downloaded:
    """Everything verification looks at, from the session's control plane. A stored log batch or
    artifact the server cannot read back (its sealing fails) is a verification failure."""
    from testhide.cli.wire import connect

    async with connect(Login.load()) as api:
        record = await api.job_record(job_id)
        evidence = await api.evidence(job_id, in_toto)
        on_server(api.server)
        try:
            batches = await api.log_batches(job_id)
            artifacts = []
            for artifact in await api.artifacts(job_id):
                data = b"".join([chunk async for chunk in api.download(job_id, artifact.path)])
                artifacts.append(ArtifactBytes(artifact, data))
        except RpcFailed as failure:
            if failure.code == "DATA_LOSS":
                raise VerifyFailed(
                    job_id, f"the control plane cannot read its record back: {failure.details}"
                ) from failure
            raise
    if isinstance(evidence, str):
        return Downloaded(record, None, evidence, tuple(batches), tuple(artifacts))
    return Downloaded(record, evidence, "", tuple(batches), tuple(artifacts))


def _read(bundle: Path, job_id: str) -> Downloaded:
    try:
        downloaded = read_bundle(bundle.read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {bundle}: {exc.strerror or exc}") from exc
    except BundleError as exc:
        raise CliError(f"{bundle}: {exc}") from exc
    if downloaded.record.job.id != job_id:
        raise CliError(f"{bundle} is the bundle of job {downloaded.record.job.id}, not of job {job_id}")
    return downloaded


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc


@click.command()
@click.argument("job_id", shell_complete=complete_job_ids)
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify from this bundle (written by --export), with no contact with any server.",
)
@click.option(
    "--export",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Once the job verifies, write everything checked to this bundle (one JSON file): about "
    "4/3 of the job's stored log and artifacts, as they are base64.",
)
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The CA certificate to trust, PEM (default: the session's, from 'testhide login --ca-file').",
)
@click.option(
    "--in-toto",
    "in_toto",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also fetch the job's SLSA provenance (an in-toto Statement in a DSSE envelope, signed by the "
    "control plane's statement key), check it against the CA and the verified statement, write it here.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the verdict as JSON, as described in README.md (nothing on stdout if it fails).",
)
def verify(
    job_id: str,
    bundle: Path | None,
    export: Path | None,
    ca_file: Path | None,
    in_toto: Path | None,
    as_json: bool,
) -> None:
    """Prove what a job did: its signed statement, its log, its artifacts and its result are
    what the agent that ran it reported, and nothing was changed afterwards. Trusts only the
    CA certificate; exits 0 with a one-line verdict, or 1 naming the first thing that failed.
    What a verified job proves and what it does not: README.md, "Verifying a job"."""
    if bundle is not None and (export is not None or in_toto is not None):
        raise click.UsageError(
            "--bundle verifies a bundle already written, with no server: no --export or --in-toto"
        )
    from testhide.cli.verification import verdict, verdict_json

    server: list[str] = []
    try:
        downloaded, verified = _verify(job_id, bundle, ca_file, in_toto, server.append)
    except VerifyFailed as failure:
        click.echo(f"Error: {failure}", err=True)
        raise click.exceptions.Exit(exitcodes.VERIFY_FAILED) from failure
    if in_toto is not None:
        assert downloaded.evidence is not None
        _write(in_toto, downloaded.evidence.in_toto_envelope)
        notice(f"in-toto provenance written to {in_toto}")
    if export is not None:
        from testhide.cli.bundle import bundle_json

        data = bundle_json(downloaded, server[0])
        _write(export, data)
        notice(f"bundle written to {export} ({len(data)} bytes)")
    if as_json:
        from testhide.cli.output import dumps

        click.echo(dumps(verdict_json(verified)))
    else:
        click.echo(verdict(verified))


def _verify(
    job_id: str,
    bundle: Path | None,
    ca_file: Path | None,
    in_toto: Path | None,
    on_server: Callable[[str], None],
) -> tuple[Downloaded, Verified]:
    """What was checked and what verified, or VerifyFailed."""
    from testhide.cli.verification import anchors, check, in_toto_failure

    roots = anchors(ca_file)
    if bundle is not None:
        downloaded = _read(bundle, job_id)
    else:
        downloaded = run_async(download(job_id, on_server, in_toto is not None))
    verified = check(job_id, downloaded, roots)
    if in_toto is not None:
        assert downloaded.evidence is not None, "check() passed"
        found = in_toto_failure(
            downloaded.evidence.in_toto_envelope,
            downloaded.evidence,
            verified.statement,
            roots,
            datetime.now(UTC),
        )
        if found:
            raise VerifyFailed(job_id, found)
    return downloaded, verified
