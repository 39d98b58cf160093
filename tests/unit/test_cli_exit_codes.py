"""`testhide`'s exit status never says 1 or 2 for its own failures (a job's
command uses those): usage errors and a missing session exit 125, like
`docker run`; a finished job maps to its own code, 124, 126, 127 or 130."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from testhide.cli import exitcodes
from testhide.cli.commands import main
from testhide.cli.model import Job, JobStatus


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    """No session stored: XDG_CONFIG_HOME is an empty directory."""
    return CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path / "config"), "TESTHIDE_API_KEY": None})


@pytest.mark.parametrize(
    "args",
    [
        ["--no-such-option"],
        ["no-such-command"],
        ["run", "--no-such-option", "--image", "busybox", "--", "true"],
        ["run", "--image", "busybox"],  # no command
        ["run", "--", "true"],  # no --image
        ["run", "--image", "busybox", "--env", "NO_EQUALS_SIGN", "--", "true"],
        ["run", "--image", "busybox", "--retries", "99", "--", "true"],
        ["run", "--image", "busybox", "--timeout", "soon", "--", "true"],
        ["logs", "--reconnect-window", "forever", "j1"],
        ["jobs", "show"],  # no job id
        ["login", "--server", "cp:7443"],  # neither --api-key nor --user
    ],
)
def test_usage_errors_exit_125_not_2(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == exitcodes.TOOL_FAILED, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "list"],
        ["jobs", "show", "j1"],
        ["logs", "--follow", "j1"],
        ["tests", "j1"],
        ["cancel", "j1"],
        ["secrets", "list"],
        ["run", "--no-workspace", "--image", "busybox", "--", "true"],
    ],
)
def test_not_logged_in_exits_125(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "not logged in" in result.stderr


def test_a_damaged_session_exits_125(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "config" / "testhide").mkdir(parents=True)
    (tmp_path / "config" / "testhide" / "credentials.json").write_text("{not json")
    result = runner.invoke(main, ["jobs", "list"])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "damaged" in result.stderr


def test_a_password_prompt_without_input_exits_125(runner: CliRunner) -> None:
    result = runner.invoke(main, ["login", "--server", "cp:7443", "--user", "ada"], input="")
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "no terminal to ask for the password" in result.stderr  # not a prompt that reads nothing


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["--version"]])
def test_help_and_version_exit_0(runner: CliRunner, args: list[str]) -> None:
    assert runner.invoke(main, args).exit_code == 0


def job(status: JobStatus, exit_code: int | None = None, reason: str = "") -> Job:
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    return Job(
        id="j1",
        status=status,
        exit_code=exit_code,
        status_reason=reason,
        image="busybox",
        command=("true",),
        pool="default",
        agent_id="a1",
        created_at=now,
        started_at=now,
        finished_at=now,
        log_size=0,
        transitions=(),
        attempt=1,
        retries=0,
        retry_of=None,
        retried_as=None,
    )


NOT_STARTED = (
    "Docker could not start the job container: failed to create shim task: OCI runtime create failed: "
)


@pytest.mark.parametrize(
    ("finished", "expected"),
    [
        (job(JobStatus.SUCCEEDED, 0), 0),
        (job(JobStatus.FAILED, 1), 1),
        (job(JobStatus.FAILED, 2), 2),
        (job(JobStatus.FAILED, 3), 3),
        (job(JobStatus.FAILED, 255), 255),
        (job(JobStatus.TIMED_OUT, 137, "timed out after 0:00:01"), 124),
        (job(JobStatus.CANCELED, 143, "canceled"), 130),
        (job(JobStatus.ERROR, None, "image 'x' is not present on this agent's host"), 125),
        (job(JobStatus.LOST, None, "the agent stopped reporting"), 125),
        (
            job(
                JobStatus.ERROR,
                None,
                NOT_STARTED + 'unable to start container process: exec: "make": '
                "executable file not found in $PATH: unknown",
            ),
            127,
        ),
        (
            job(
                JobStatus.ERROR,
                None,
                NOT_STARTED + 'unable to start container process: exec: "/x/y": stat /x/y: '
                "no such file or directory: unknown",
            ),
            127,
        ),
        (
            job(
                JobStatus.ERROR,
                None,
                NOT_STARTED + 'unable to start container process: exec: "/": permission denied: unknown',
            ),
            126,
        ),
        (
            job(
                JobStatus.ERROR,
                None,
                "Docker could not start the job container: OCI runtime start failed: starting container: "
                'starting root container: starting sandbox: error finding executable "make" in PATH [/bin]: '
                "no such file or directory: unknown",
            ),
            127,
        ),
        (
            job(
                JobStatus.ERROR,
                None,
                "Docker could not start the job container: OCI runtime start failed: starting container: "
                "starting root container: starting sandbox: creating process: failed to load /: "
                "permission denied: unknown",
            ),
            126,
        ),
        # The words alone, without the runtime's failure, are not enough.
        (job(JobStatus.ERROR, None, "could not read the job's workspace: no such file or directory"), 125),
    ],
)
def test_a_finished_job_maps_to_an_exit_status(finished: Job, expected: int) -> None:
    assert exitcodes.of_job(finished) == expected
