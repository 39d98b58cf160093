"""One-line errors that name the cause and the fix, without a server: sizes
that say which forms they take, a workspace cap shown in a unit that never
rounds to 0, a runtime's refusal of a job's command in the engineer's words
(and the exit status it still maps to), and a stored profile's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from testhide.agent.runtime.oci import command_refusal
from testhide.cli import exitcodes
from testhide.cli.commands import main
from testhide.cli.config import Login, check_profile, profile_path, use_profile
from testhide.cli.errors import WorkspaceTooLarge
from testhide.cli.model import JobStatus
from testhide.cli.workspace import pack
from testhide.common.sizes import GiB, KiB, MiB, describe_size
from tests.unit.test_cli_exit_codes import job

RUNC_NOT_FOUND = (
    "failed to create task for container: failed to create shim task: OCI runtime create failed: "
    'runc create failed: unable to start container process: exec: "nosuch": executable file not '
    "found in $PATH: unknown"
)
RUNSC_NOT_FOUND = (
    "failed to create task for container: OCI runtime start failed: starting container: "
    'error finding executable "nosuch" in PATH [/bin]: no such file or directory: unknown'
)
RUNC_DENIED = (
    "OCI runtime create failed: runc create failed: unable to start container process: "
    'exec: "/": permission denied: unknown'
)


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    return CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path / "config"), "TESTHIDE_API_KEY": None})


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_a_size_that_is_not_one_names_the_forms(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "--memory", "abc", "--image", "x", "--", "true"])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert error_lines(result.output) == [
        "Error: Invalid value for '--memory': invalid size 'abc': "
        "use forms like 512MiB, 10GiB, 4KiB or a number of bytes"
    ]
    assert "invalid literal" not in result.output


@pytest.mark.parametrize("option", ["--workspace-cap", "--memory"])
def test_a_small_number_without_a_unit_asks_for_the_unit(runner: CliRunner, option: str) -> None:
    result = runner.invoke(main, ["run", option, "10", "--image", "x", "--", "true"])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert error_lines(result.output) == [
        f"Error: Invalid value for '{option}': '10' without a unit is 10 bytes; "
        "write the unit, e.g. 10MiB or 10GiB (or 10B for bytes)"
    ]


def test_bytes_spelled_out_or_large_enough_are_taken(runner: CliRunner) -> None:
    # Not a usage error: it gets as far as the missing session.
    for value in ("10B", "4096", "10MiB"):
        result = runner.invoke(main, ["run", "--workspace-cap", value, "--image", "x", "--", "true"])
        assert "not logged in" in result.output, (value, result.output)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 bytes"), (1, "1 byte"), (10, "10 bytes"), (1023, "1023 bytes"), (KiB, "1 KiB"),
     (1536, "1.5 KiB"), (256 * MiB, "256 MiB"), (3 * GiB // 2, "1.5 GiB")],
)  # fmt: skip
def test_sizes_for_people_are_never_rounded_to_zero(size: int, text: str) -> None:
    assert describe_size(size) == text


def test_the_workspace_cap_is_shown_in_a_readable_unit(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_bytes(b"x" * 100)
    with pytest.raises(WorkspaceTooLarge) as refused:
        pack(tmp_path, cap=10)
    assert "the workspace holds 100 bytes, above the 10 bytes cap" in refused.value.message


@pytest.mark.parametrize(
    ("explanation", "reason", "status"),
    [
        (RUNC_NOT_FOUND, "command 'nosuch' not found in image busybox:1", exitcodes.NOT_FOUND),
        (RUNSC_NOT_FOUND, "command 'nosuch' not found in image busybox:1", exitcodes.NOT_FOUND),
        (RUNC_DENIED, "command 'nosuch' cannot be executed in image busybox:1: permission denied", 126),
    ],
)
def test_a_runtime_refusing_the_command_is_one_readable_reason(
    explanation: str, reason: str, status: int
) -> None:
    assert command_refusal(explanation, ("nosuch", "arg"), "busybox:1") == reason
    assert exitcodes.of_job(job(JobStatus.ERROR, reason=reason)) == status


def test_other_runtime_failures_keep_their_words() -> None:
    assert command_refusal("OCI runtime create failed: cgroup limits: unknown", ("sh",), "x") is None
    assert command_refusal("no space left on device", ("sh",), "x") is None


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_a_profile_name_is_a_plain_file_name(name: str) -> None:
    with pytest.raises(ValueError, match="is not a profile name"):
        check_profile(name)


def test_profiles_have_their_own_files_and_default_is_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert profile_path("default") == tmp_path / "testhide" / "credentials.json"
    assert profile_path("ci.prod") == tmp_path / "testhide" / "profiles" / "ci.prod.json"
    saved = Login(("cp:1",), None, refresh_token="r", refresh_expires_at=5.0, profile="ci.prod").save()
    assert saved == profile_path("ci.prod")
    assert "profile" not in saved.read_text()
    use_profile("ci.prod")
    try:
        assert Login.load().refresh_expires_at == 5.0
        assert Login.load().profile == "ci.prod"
    finally:
        use_profile("default")
