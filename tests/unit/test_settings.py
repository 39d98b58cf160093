"""common/settings.py: every option of a daemon's command from a TOML file, a
TESTHIDE_* variable or a flag, in that order of precedence; --print-config;
log options before and after the subcommand; what SIGHUP's reload does."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
import structlog
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.common.durations import Duration
from testhide.common.logging import configure
from testhide.common.settings import Reloader, SecretOption, SettingsCommand, log_options
from testhide.common.sizes import MiB, Size

PROPS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
SEEN: dict[str, Any] = {}


@click.group()
@log_options("T_")
def group(log_format: str, log_level: str) -> None:
    pass


@group.command(cls=SettingsCommand, envvar_prefix="T_")
@click.option("--listen", default="127.0.0.1:7443", show_default=True)
@click.option("--jobs", type=click.IntRange(1, 64), default=1)
@click.option("--ratio", type=float, default=0.5)
@click.option("--lease", type=Duration(), default="60s")
@click.option("--spool-max", type=Size(min=4 * MiB), default="512MiB")
@click.option("--dev", is_flag=True)
@click.option("--label", "labels", multiple=True)
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="LEGACY_DATA_DIR")
@click.option("--token", cls=SecretOption)
@click.option("--password", default=None)
@log_options("T_")
def run(**params: Any) -> None:
    SEEN.clear()
    SEEN.update(params)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    SEEN.clear()
    return CliRunner().invoke(group, list(args), env=env)


def ran(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return dict(SEEN)


def toml(tmp_path: Path, text: str, name: str = "settings.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- precedence


def test_defaults_when_nothing_is_given() -> None:
    params = ran("run")
    assert params["listen"] == "127.0.0.1:7443"
    assert params["lease"] == timedelta(seconds=60)
    assert params["spool_max"] == 512 * MiB
    assert params["labels"] == ()
    assert params["dev"] is False


def test_file_then_variable_then_flag(tmp_path: Path) -> None:
    config = toml(tmp_path, 'listen = "file:1"\njobs = 2\nlease = "5m"\n')
    assert ran("run", "--config", config)["listen"] == "file:1"
    env = {"T_LISTEN": "env:1", "T_JOBS": "3"}
    params = ran("run", "--config", config, env=env)
    assert (params["listen"], params["jobs"], params["lease"]) == ("env:1", 3, timedelta(minutes=5))
    params = ran("run", "--config", config, "--listen", "flag:1", env=env)
    assert (params["listen"], params["jobs"]) == ("flag:1", 3)


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config = toml(tmp_path, 'listen = "file:1"\n')
    assert ran("run", env={"T_CONFIG": config})["listen"] == "file:1"


def test_keys_take_dashes_or_underscores(tmp_path: Path) -> None:
    params = ran("run", "--config", toml(tmp_path, 'spool-max = "1GiB"\ndata_dir = "/srv/a"\n'))
    assert params["spool_max"] == 1024 * MiB
    assert params["data_dir"] == Path("/srv/a")


def test_every_type_from_a_file(tmp_path: Path) -> None:
    config = toml(
        tmp_path,
        'ratio = 2\nlease = 90\ndev = true\nlabel = ["gpu=yes", "os=linux"]\nspool-max = 8388608\n'
        'log-level = "DEBUG"\n',
    )
    params = ran("run", "--config", config)
    assert params["ratio"] == 2.0
    assert params["lease"] == timedelta(seconds=90)
    assert params["dev"] is True
    assert params["labels"] == ("gpu=yes", "os=linux")
    assert params["spool_max"] == 8 * MiB
    assert params["log_level"] == "debug"


def test_every_option_has_a_variable_shown_in_help_and_old_names_stay() -> None:
    result = invoke("run", "--help")
    for name in (
        "T_LISTEN",
        "T_JOBS",
        "T_SPOOL_MAX",
        "T_LABEL",
        "T_LOG_LEVEL",
        "T_CONFIG",
        "LEGACY_DATA_DIR",
    ):
        assert name in result.output
    assert "T_DATA_DIR" not in result.output
    assert ran("run", env={"LEGACY_DATA_DIR": "/legacy"})["data_dir"] == Path("/legacy")
    assert ran("run", env={"T_LABEL": "a=1 b=2", "T_DEV": "1"})["labels"] == ("a=1", "b=2")


# --------------------------------------------------------- mistakes in a file


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("lisen = 'x'\nbogus = 1\n", "unknown settings bogus, lisen"),
        ("config = 'other.toml'\n", "unknown setting config"),
        ("print-config = true\n", "unknown setting print-config"),
        ("[run]\nlisten = 'x'\n", "unknown setting run"),
        ("jobs = 'two'\n", "jobs must be an integer, not a string"),
        ("jobs = 1.5\n", "jobs must be an integer, not a number"),
        ("jobs = true\n", "jobs must be an integer, not a boolean"),
        ("jobs = 100\n", "jobs: 100 is not in the range 1<=x<=64"),
        ("listen = 7443\n", "listen must be a string, not an integer"),
        ("listen = ['a']\n", "listen must be a string, not a list"),
        ("label = 'gpu=yes'\n", "label must be a list, each item a string"),
        ("label = [1]\n", "label must be a list, each item a string"),
        ("dev = 'yes'\n", "dev must be true or false, not a string"),
        ("lease = true\n", "lease must be a duration"),
        ("lease = '5x'\n", "lease: invalid duration '5x'"),
        ("lease = -5\n", "lease: invalid duration '-5'"),
        ("spool-max = '10GB'\n", "spool-max: size '10GB' is ambiguous"),
        ("spool-max = 1.5\n", "spool-max must be a size"),
        ("spool-max = '1MiB'\n", "spool-max: 1MiB is below the least allowed, 4MiB"),
        ("log-level = 'loud'\n", "log-level: 'loud' is not one of 'debug', 'info', 'warning'"),
        ("listen = 1979-05-27\n", "listen must be a string, not a date or time"),
        ("listen = 'a'\nlisten_ = 1\n", "unknown setting listen_"),
        ("spool-max = '8MiB'\nspool_max = '8MiB'\n", "spool-max is given twice"),
        ("listen = 'unterminated\n", "is not a valid TOML file"),
    ],
)
def test_a_bad_file_is_a_usage_error_naming_key_and_file(tmp_path: Path, text: str, says: str) -> None:
    config = toml(tmp_path, text, "bad.toml")
    result = invoke("run", "--config", config)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if "not a valid TOML" not in says:
        assert f"{config}:" in result.output


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("run", "--config", str(tmp_path / "nowhere.toml"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_a_file_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'listen = "caf\xe9"\n')
    result = invoke("run", "--config", str(path))
    assert result.exit_code == 2
    assert "is not a valid TOML file" in result.output


# ------------------------------------------------------------------ print-config


def test_print_config_shows_each_setting_and_where_it_came_from(tmp_path: Path) -> None:
    config = toml(tmp_path, 'jobs = 4\nlease = "250ms"\n')
    result = invoke(
        "run", "--config", config, "--listen", "0.0.0.0:1", "--print-config", env={"T_SPOOL_MAX": "1GiB"}
    )
    assert result.exit_code == 0, result.output
    assert SEEN == {}, "--print-config must not run the command"
    lines = result.output.splitlines()
    assert 'listen = "0.0.0.0:1"  # flag' in lines
    assert 'spool-max = "1GiB"  # T_SPOOL_MAX' in lines
    assert f"jobs = 4  # {config}" in lines
    assert f'lease = "250ms"  # {config}' in lines
    assert "ratio = 0.5  # default" in lines
    assert "# data-dir: not set  (default)" in lines
    assert "label = []  # default" in lines


def test_printed_settings_load_back_as_the_same_settings(tmp_path: Path) -> None:
    args = ["--listen", "h:1", "--jobs", "3", "--lease", "1h30m", "--spool-max", "6MiB", "--dev"]
    args += [
        "--label",
        'a="quoted"\\',
        "--label",
        "b=tab\there",
        "--data-dir",
        "/srv/ü",
        "--log-level",
        "error",
    ]
    printed = invoke("run", *args, "--print-config")
    assert printed.exit_code == 0, printed.output
    direct = ran("run", *args)
    again = ran("run", "--config", toml(tmp_path, printed.output))
    assert again == direct


@PROPS
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_text_survives_print_and_load(text: str) -> None:
    printed = invoke("run", "--listen", text, "--print-config").output
    assert tomllib.loads(printed)["listen"] == text


def test_secrets_are_never_printed() -> None:
    result = invoke("run", "--token", "tok-s3cr3t", "--print-config", env={"T_PASSWORD": "pw-s3cr3t"})
    assert result.exit_code == 0, result.output
    assert "s3cr3t" not in result.output
    assert "# token: set, not shown (secret)  (flag)" in result.output
    assert "# password: set, not shown (secret)  (T_PASSWORD)" in result.output
    assert "token" not in tomllib.loads(result.output)


# ------------------------------------------------- log options on group and command


@pytest.mark.parametrize(
    ("args", "env", "level"),
    [
        (["run"], {}, "info"),
        (["--log-level", "debug", "run"], {}, "debug"),
        (["run", "--log-level", "debug"], {}, "debug"),
        (["--log-level", "debug", "run", "--log-level", "error"], {}, "error"),
        (["--log-level", "debug", "run"], {"T_LOG_LEVEL": "error"}, "debug"),
        (["run"], {"T_LOG_LEVEL": "error"}, "error"),
        (["--log-level", "WARNING", "run"], {}, "warning"),
    ],
)
def test_log_level_before_or_after_the_subcommand(args: list[str], env: dict[str, str], level: str) -> None:
    assert ran(*args, env=env)["log_level"] == level


def test_a_group_flag_beats_the_file(tmp_path: Path) -> None:
    config = toml(tmp_path, 'log-level = "error"\nlog-format = "json"\n')
    params = ran("--log-level", "debug", "run", "--config", config)
    assert (params["log_level"], params["log_format"]) == ("debug", "json")
    printed = invoke("--log-level", "debug", "run", "--config", config, "--print-config").output
    assert 'log-level = "debug"  # flag' in printed.splitlines()


@pytest.mark.parametrize("args", [["--log-level", "foo", "run"], ["run", "--log-level", "foo"]])
def test_an_unknown_level_is_a_usage_error_listing_the_levels(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "'foo' is not one of 'debug', 'info', 'warning', 'error', 'critical'" in result.output


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("testhide.controlplane.cli", ["--log-level", "foo", "serve", "--data-dir", "x"]),
        ("testhide.controlplane.cli", ["serve", "--data-dir", "x", "--log-level", "foo"]),
        ("testhide.controlplane.cli", ["--log-format", "xml", "audit", "--help"]),
        ("testhide.agent.cli", ["--log-level", "foo", "run", "--data-dir", "x"]),
        ("testhide.agent.cli", ["run", "--data-dir", "x", "--log-format", "xml"]),
    ],
)
def test_the_daemons_refuse_an_unknown_log_option_without_a_traceback(module: str, args: list[str]) -> None:
    import importlib

    main = importlib.import_module(module).main
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "is not one of" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_serve_prints_its_settings_with_their_variables(tmp_path: Path) -> None:
    from testhide.controlplane.cli import main

    config = toml(tmp_path, f'data-dir = "{tmp_path}"\njob-lease = "30s"\nlog_format = "json"\n')
    result = CliRunner().invoke(
        main, ["--log-level", "debug", "serve", "--print-config"], env={"TESTHIDE_CONFIG": config}
    )
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)
    assert printed["data-dir"] == str(tmp_path)
    assert printed["job-lease"] == "30s"
    assert printed["listen"] == "127.0.0.1:7443"
    assert (printed["log-level"], printed["log-format"]) == ("debug", "json")
    assert "TESTHIDE_PASSWORD_QUEUE" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_agent_run_takes_its_variables_under_its_own_prefix(tmp_path: Path) -> None:
    from testhide.agent.cli import main

    env = {"TESTHIDE_AGENT_DATA_DIR": str(tmp_path), "TESTHIDE_AGENT_MAX_JOBS": "3"}
    result = CliRunner().invoke(main, ["run", "--print-config"], env=env)
    assert result.exit_code == 0, result.output
    assert "max-jobs = 3  # TESTHIDE_AGENT_MAX_JOBS" in result.output.splitlines()


# ------------------------------------------------------------------------ reload


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    structlog.reset_defaults()  # no logger cached by an earlier configure() escapes the capture
    with structlog.testing.capture_logs() as captured:
        yield captured
    structlog.reset_defaults()


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """The log settings a reload applied (applying them for real would end the capture of logs)."""
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        "testhide.common.settings.configure", lambda level, json_output: calls.append((level, json_output))
    )
    return calls


def test_reload_reads_the_file_again(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], applied: list[tuple[str, bool]]
) -> None:
    config = toml(tmp_path, 'log-level = "info"\njobs = 2\n')
    reloader = Reloader(run.make_context("run", ["--config", config]))
    Path(config).write_text('log-level = "debug"\njobs = 3\nlisten = "h:1"\nlog-format = "json"\n')
    fresh = reloader.reload()
    assert fresh is not None
    assert applied == [("debug", True)]
    assert (fresh["log_level"], fresh["jobs"], fresh["listen"]) == ("debug", 3, "h:1")
    restart = next(e for e in logs if e["event"] == "config_change_needs_restart")
    assert restart["settings"] == ["listen", "jobs"]
    reloaded = next(e for e in logs if e["event"] == "config_reloaded")
    assert (reloaded["config_file"], reloaded["new_level"], reloaded["new_format"]) == (
        config,
        "debug",
        "json",
    )


def test_a_reload_keeps_flags_over_the_file(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], applied: list[tuple[str, bool]]
) -> None:
    config = toml(tmp_path, 'log-level = "info"\n')
    reloader = Reloader(run.make_context("run", ["--config", config, "--log-level", "error"]))
    Path(config).write_text('log-level = "debug"\n')
    fresh = reloader.reload()
    assert fresh is not None
    assert fresh["log_level"] == "error"
    assert applied == [("error", False)]
    assert not [e for e in logs if e["event"] == "config_change_needs_restart"]


@pytest.mark.parametrize("text", ["jobs = 'x'\n", "nonsense = 1\n", "= broken\n", None])
def test_a_bad_file_on_reload_is_logged_and_changes_nothing(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], applied: list[tuple[str, bool]], text: str | None
) -> None:
    config = toml(tmp_path, 'log-level = "info"\n')
    reloader = Reloader(run.make_context("run", ["--config", config]))
    if text is None:
        Path(config).unlink()
    else:
        Path(config).write_text(text)
    assert reloader.reload() is None
    [failed] = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failed["log_level"] == "error"
    assert config in failed["error"]
    assert not [e for e in logs if e["event"] == "config_reloaded"]
    assert applied == []


def test_a_changed_level_reaches_loggers_already_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", json_output=True)
    try:
        logger = structlog.get_logger("t")
        logger.info("hidden_at_warning")
        logger.warning("shown_at_warning")
        configure("debug", json_output=True)
        logger.debug("shown_at_debug")
        configure("info", json_output=False)
        logger.info("shown_as_console")
    finally:
        structlog.reset_defaults()
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines[:2]] == ["shown_at_warning", "shown_at_debug"]
    assert len(lines) == 3
    assert "shown_as_console" in lines[2]
    assert not lines[2].startswith("{")


def test_configure_refuses_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="use one of debug, info, warning, error, critical"):
        configure("loud")


# ------------------------------------------------ SIGHUP on the agent: its credentials


async def test_the_agent_adopts_a_later_certificate_and_nothing_else(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    from testhide.agent.config import AgentConfig
    from testhide.agent.credentials import Credentials, new_key_and_csr
    from testhide.agent.daemon import Agent
    from testhide.agent.runtime.fake import FakeRuntime
    from testhide.common.identity import AgentIdentity
    from testhide.controlplane.ca.authority import CertificateAuthority

    ca = CertificateAuthority.create("testhide.local")
    now = datetime.now(UTC)

    def issued(agent_id: str, at: datetime) -> Credentials:
        key_pem, csr_pem = new_key_and_csr()
        identity = AgentIdentity("testhide.local", "default", "default", agent_id)
        cert = ca.issue_agent(csr_pem, identity, timedelta(hours=1), at)
        return Credentials(
            agent_id, ("cp:7443",), ("cp:7444",), key_pem, cert.certificate_pem, ca.certificate_pem
        )

    def checked() -> MutableMapping[str, Any]:
        logs.clear()
        agent.check_credentials()
        [event] = logs
        return event

    first = issued("a1", now)
    first.save(tmp_path)
    agent = Agent(AgentConfig(data_dir=tmp_path), FakeRuntime())
    same = checked()
    assert (same["event"], same["agent_id"], same["newer"]) == ("credentials_checked", "a1", False)

    later = issued("a1", now + timedelta(minutes=30))
    later.save(tmp_path)
    assert checked()["newer"] is True
    assert agent.credentials.certificate_pem == later.certificate_pem

    first.save(tmp_path)  # an older certificate back on disk (a restored backup) is not taken
    assert checked()["newer"] is False
    assert agent.credentials.certificate_pem == later.certificate_pem

    issued("a2", now + timedelta(hours=1)).save(tmp_path)
    assert checked()["event"] == "credentials_of_another_agent"
    assert agent.agent_id == "a1"

    (tmp_path / "agent.key").chmod(0o644)
    unreadable = checked()
    assert unreadable["event"] == "credentials_unreadable"
    assert "chmod 600" in unreadable["error"]
    assert agent.credentials.certificate_pem == later.certificate_pem
