"""`testhide run`'s fetch step and services, `logs --service` and pools' egress lists,
without a server: each malformed option is one usage error naming the form it takes (before
anything is uploaded), the options reach the contract's messages and come back, and
`jobs show` prints the fetch step as it ran."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp

from testhide.cli import exitcodes
from testhide.cli.admin import egress_entry
from testhide.cli.commands import main
from testhide.cli.model import ArtifactKind, JobRequest, Service
from testhide.cli.output import artifact_json, artifact_line, job_details, job_json, pool_json, pools_table
from testhide.cli.run_options import fetch_options, services
from testhide.cli.wire_admin_agents import pool_from_pb
from testhide.cli.wire_convert import artifact_from_pb, job_from_pb, job_spec_from_pb, spec_to_pb
from testhide.protos.v1 import jobs_pb2
from tests.json_schema import assert_matches_example

AT = datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    return CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path / "config"), "TESTHIDE_API_KEY": None})


def run_with(runner: CliRunner, *options: str) -> tuple[int, list[str]]:
    result = runner.invoke(main, ["run", "--image", "x", "--no-workspace", *options, "--", "true"])
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            ["--fetch", " "],
            "Invalid value for '--fetch': takes a shell command (run with sh -c), not an empty one",
        ),
        (
            ["--fetch", "true", "--fetch-secret", ""],
            "'--fetch-secret': takes the NAME of an organisation secret",
        ),
        (
            ["--fetch", "true", "--cache", ""],
            "Invalid value for '--cache': takes a KEY (no surrounding spaces)",
        ),
        (
            ["--fetch-secret", "TOKEN"],
            "'--fetch-secret': gives a secret to the fetch step: give the step with --fetch",
        ),
        (["--cache", "k"], "'--cache': keeps what the fetch step fills: give the step with --fetch 'CMD'"),
        (["--service", "db"], "Invalid value for '--service': takes NAME=IMAGE (NAME: lower-case letters"),
        (["--service", "=postgres"], "'--service': takes NAME=IMAGE"),
        (["--service", "db="], "'--service': takes NAME=IMAGE"),
        (["--service", "Db=postgres"], "not 'Db=postgres'"),
        (["--service", "1db=postgres"], "not '1db=postgres'"),
        (["--service", f"{'d' * 32}=postgres"], "at most 31"),
        (["--service", "db=a", "--service", "db=b"], "'--service': names service 'db' twice"),
        (["--service-command", "db=x"], "names service 'db', which is not one of --service (no --service"),
        (
            ["--service", "db=p", "--service", "web=n", "--service-command", "cache=x"],
            "'--service-command': names service 'cache', which is not one of --service "
            "(the services given: db, web)",
        ),
        (["--service", "db=p", "--service-command", "db"], "'--service-command': takes NAME='CMD ARGS'"),
        (["--service", "db=p", "--service-command", "db="], "not an empty command for 'db'"),
        (["--service", "db=p", "--service-command", "db='unclosed"], "No closing quotation"),
        (["--service", "db=p", "--service-command", "db=a", "--service-command", "db=b"], "a command twice"),
        (["--service", "db=p", "--service-env", "db=K=V"], "'--service-env': takes NAME:K=V, not 'db=K=V'"),
        (["--service", "db=p", "--service-env", "db:K"], "'--service-env': takes NAME:K=V, not 'db:K'"),
        (["--service", "db=p", "--service-env", "db:=V"], "'--service-env': takes NAME:K=V"),
        (["--service", "db=p", "--service-env", "web:K=V"], "names service 'web', which is not one"),
        (
            ["--service", "db=p", "--service-tmpfs", "db:data"],
            "'--service-tmpfs': takes NAME:PATH (an absolute",
        ),
        (["--service", "db=p", "--service-tmpfs", "/data"], "'--service-tmpfs': takes NAME:PATH"),
    ],
)
def test_each_malformed_option_is_a_usage_error_naming_its_form(
    runner: CliRunner, options: list[str], error: str
) -> None:
    code, errors = run_with(runner, *options)
    assert code == exitcodes.TOOL_FAILED
    assert len(errors) == 1, errors
    assert error in errors[0], errors[0]


def test_well_formed_options_pass_to_the_login(runner: CliRunner) -> None:
    """Parsed without complaint, they reach the next step: no session stored here."""
    code, errors = run_with(
        runner,
        *("--fetch", "pip download -d /cache x", "--fetch-secret", "T", "--cache", "pip-v1"),
        *("--service", "db=postgres:16", "--service-command", "db=postgres -c 'fsync=off'"),
        *("--service-env", "db:PASSWORD=a=b", "--service-tmpfs", "db:/var/lib/data"),
    )
    assert code == exitcodes.TOOL_FAILED
    assert errors == [  # not a usage error: the options were taken
        "Error: not logged in: run 'testhide login --server HOST:PORT --api-key-stdin (or --user NAME)'"
    ]


def test_services_gather_what_the_other_options_give_them_by_name() -> None:
    found = services(
        ("db=postgres:16", "web=nginx"),
        ("db=postgres -c 'fsync=off'",),
        ("db:A=1", "db:B=x=y", "web:C="),
        ("db:/data", "db:/run", "db:/data"),
    )
    assert found == (
        Service(
            "db", "postgres:16", ("postgres", "-c", "fsync=off"), {"A": "1", "B": "x=y"}, ("/data", "/run")
        ),
        Service("web", "nginx", (), {"C": ""}, ()),
    )
    assert services((), (), (), ()) == ()
    step = fetch_options("make deps", ("T", "U", "T"), "k")
    assert (step.fetch, step.fetch_secrets, step.cache) == ("make deps", ("T", "U"), "k")
    assert fetch_options(None, (), None).fetch == ""


def test_the_spec_goes_out_and_comes_back() -> None:
    request = JobRequest(
        image="x",
        command=("true",),
        fetch="make deps",
        fetch_secrets=("T",),
        cache="deps-1",
        services=(
            Service("db", "postgres:16", ("postgres",), {"A": "1"}, ("/data",)),
            Service("web", "nginx"),
        ),
    )
    message = spec_to_pb(request)
    assert (message.fetch, list(message.fetch_secrets), message.cache) == ("make deps", ["T"], "deps-1")
    assert [s.name for s in message.services] == ["db", "web"]
    assert (list(message.services[0].command), dict(message.services[0].env)) == (["postgres"], {"A": "1"})
    back = job_spec_from_pb(message)
    assert (back.fetch, back.fetch_secrets, back.cache, back.services) == (
        "make deps",
        ("T",),
        "deps-1",
        request.services,
    )
    plain = job_spec_from_pb(spec_to_pb(JobRequest(image="x", command=("true",))))
    assert (plain.fetch, plain.fetch_secrets, plain.cache, plain.services) == ("", (), "", ())


def stamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def fetched_job(requests: list[jobs_pb2.EgressRequest]) -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(
        image="busybox",
        command=["true"],
        pool="default",
        fetch="wget http://mirror.test/x",
        fetch_secrets=["MIRROR_TOKEN"],
        cache="mirror-1",
        services=[
            jobs_pb2.ServiceSpec(name="db", image="postgres:16", env={"PGUSER": "ci"}, tmpfs=["/data"])
        ],
    )
    fetch = jobs_pb2.FetchStep(cache="miss", exit_code=0, requests=requests)
    fetch.duration.FromTimedelta(timedelta(seconds=1, milliseconds=200))
    return jobs_pb2.Job(
        id="j1", spec=spec, status=jobs_pb2.JOB_STATUS_RUNNING, created_at=stamp(AT), attempt=1, fetch=fetch
    )


REQUESTS = [
    jobs_pb2.EgressRequest(
        at=stamp(AT),
        method="CONNECT",
        host="mirror.test",
        port=443,
        allowed=True,
        http_status=200,
        bytes_sent=517,
        bytes_received=4096,
    ),
    jobs_pb2.EgressRequest(at=stamp(AT), method="GET", host="elsewhere.test", port=80, http_status=403),
    jobs_pb2.EgressRequest(at=stamp(AT), method="CONNECT", host="silent.test", port=443),
]


def test_the_fetch_step_in_json() -> None:
    shown = job_json(job_from_pb(fetched_job(REQUESTS)))
    assert_matches_example("testhide jobs show", shown)
    assert shown["fetch"] == {
        "cache": "miss",
        "running": False,
        "exit_code": 0,
        "duration_s": 1.2,
        "requests": [
            {
                "at": "2030-01-02T03:04:05.250000Z",
                "method": "CONNECT",
                "host": "mirror.test",
                "port": 443,
                "allowed": True,
                "http_status": 200,
                "sent_bytes": 517,
                "received_bytes": 4096,
            },
            {
                "at": "2030-01-02T03:04:05.250000Z",
                "method": "GET",
                "host": "elsewhere.test",
                "port": 80,
                "allowed": False,
                "http_status": 403,
                "sent_bytes": 0,
                "received_bytes": 0,
            },
            {
                "at": "2030-01-02T03:04:05.250000Z",
                "method": "CONNECT",
                "host": "silent.test",
                "port": 443,
                "allowed": False,
                "http_status": None,
                "sent_bytes": 0,
                "received_bytes": 0,
            },
        ],
        "isolation": None,  # not reported (an older agent)
    }
    spec = shown["spec"]
    assert (spec["fetch"], spec["fetch_secrets"], spec["cache"]) == (
        "wget http://mirror.test/x",
        ["MIRROR_TOKEN"],
        "mirror-1",
    )
    assert spec["services"] == [
        {"name": "db", "image": "postgres:16", "command": [], "env": {"PGUSER": "ci"}, "tmpfs": ["/data"]}
    ]
    plain_job = jobs_pb2.Job(
        id="j2", spec=jobs_pb2.JobSpec(image="b", command=["true"]), created_at=stamp(AT)
    )
    plain = job_json(job_from_pb(plain_job))
    assert (plain["fetch"], plain["spec"]["fetch"], plain["spec"]["cache"]) == (None, None, None)
    assert (plain["spec"]["fetch_secrets"], plain["spec"]["services"]) == ([], [])
    assert_matches_example("testhide jobs show", plain)


def test_jobs_show_prints_the_fetch_step_and_the_services() -> None:
    lines = job_details(job_from_pb(fetched_job(REQUESTS)))
    assert "fetch:      wget http://mirror.test/x  (secrets: MIRROR_TOKEN)" in lines
    assert "cache:      mirror-1" in lines
    assert "  db: postgres:16, command (the image default), env PGUSER=ci, tmpfs /data" in lines
    start = lines.index("fetch step:")
    assert lines[start + 1] == "  cache miss (not in the cache: fetched, then kept), exit code 0, 1.2s"
    assert lines[start + 2].split() == [
        "TIME",
        "METHOD",
        "HOST:PORT",
        "VERDICT",
        "STATUS",
        "SENT",
        "RECEIVED",
    ]
    assert lines[start + 3].split() == [
        "2030-01-02T03:04:05.250000Z",
        "CONNECT",
        "mirror.test:443",
        "allowed",
        "200",
        "517",
        "4096",
    ]
    assert lines[start + 4].split()[1:] == ["GET", "elsewhere.test:80", "REFUSED", "403", "0", "0"]
    assert lines[start + 5].split()[3:5] == ["REFUSED", "-"]
    assert lines[start + 6] == "isolation:"

    no_requests = job_details(job_from_pb(fetched_job([])))
    assert no_requests[no_requests.index("fetch step:") + 2] == "  no requests through the egress proxy"
    not_yet = fetched_job([])
    not_yet.ClearField("fetch")
    assert "fetch step: - (not run yet)" in job_details(job_from_pb(not_yet))
    running = fetched_job([])
    running.fetch.running = True  # its container's facts came as it started; its end not yet
    lines = job_details(job_from_pb(running))
    assert (
        lines[lines.index("fetch step:") + 1]
        == "  running (cache miss: not in the cache: fetched, then kept)"
    )
    running.status = jobs_pb2.JOB_STATUS_ERROR  # e.g. stopped for its isolation, mid-step
    lines = job_details(job_from_pb(running))
    assert lines[lines.index("fetch step:") + 1] == (
        "  stopped with the job before its end (cache miss: not in the cache: fetched, then kept)"
    )
    plain = job_details(
        job_from_pb(jobs_pb2.Job(id="j2", spec=jobs_pb2.JobSpec(image="b", command=["true"])))
    )
    assert "fetch:      -" in plain
    assert "services:   -" in plain
    assert not [line for line in plain if line.startswith(("cache:", "fetch step"))]


def test_a_service_log_is_an_artifact_of_its_own_kind() -> None:
    def kind(path: str) -> ArtifactKind:
        return artifact_from_pb(jobs_pb2.Artifact(path=path, size=3, sha256="ab")).kind

    assert kind("services/db.log") == ArtifactKind.SERVICE_LOG
    for path in ("services/db.txt", "services/a/b.log", "services/.log", "out/services/db.log", "db.log"):
        assert kind(path) == ArtifactKind.FILE, path
    log = artifact_from_pb(jobs_pb2.Artifact(path="services/db.log", size=3, sha256="ab"))
    assert artifact_json(log) == {"path": "services/db.log", "size": 3, "sha256": "ab", "kind": "SERVICE_LOG"}
    assert_matches_example("testhide artifacts --list", [artifact_json(log)])
    assert artifact_line(log).endswith("(service log)")


def test_a_pools_egress_list_is_shown() -> None:
    pool = pool_from_pb(
        jobs_pb2.Pool(
            name="ci",
            pull_policy="never",
            egress_allow=["pypi.org", "mirror.test:8080"],
            created_at=stamp(AT),
        )
    )
    assert pool_json(pool)["egress_allow"] == ["pypi.org", "mirror.test:8080"]
    assert_matches_example("testhide pools list", [pool_json(pool)])
    header, row = pools_table([pool])
    assert header.split()[-1] == "EGRESS"
    assert row.endswith(" pypi.org mirror.test:8080")
    assert pools_table([pool_from_pb(jobs_pb2.Pool(name="ci"))])[1].endswith(" none")


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("pypi.org", "pypi.org"),
        ("PyPI.org:443", "pypi.org:443"),
        ("10.0.0.7:8080", "10.0.0.7:8080"),
        (".Example.org", ".example.org"),
    ],
)
def test_an_egress_entry_is_a_host_and_maybe_a_port(text: str, entry: str) -> None:
    assert egress_entry(text) == entry


@pytest.mark.parametrize(
    "text",
    ["", "https://pypi.org", "pypi.org/simple", "pypi.org:", "pypi.org:0", "pypi.org:65536", "pypi.org:x",
     "::1", "*.pypi.org", "-a.org", "a..org", " pypi.org", "a.org:080", "a.org:99999", "..a.org"],
)  # fmt: skip
def test_a_malformed_egress_entry_is_a_usage_error(runner: CliRunner, text: str) -> None:
    result = runner.invoke(main, ["admin", "pools", "set", "ci", "--egress-allow", text])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "Error: Invalid value for '--egress-allow': takes HOST or HOST:PORT" in result.output


def test_usage_errors_of_logs_service_and_pools_set(runner: CliRunner) -> None:
    result = runner.invoke(main, ["logs", "j1", "--service", "db", "--follow"])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "Error: --follow does not apply to --service: a service's output is kept when the job ends" in (
        result.output
    )
    result = runner.invoke(main, ["admin", "pools", "set", "ci", "--egress-allow", "a.org", "--no-egress"])
    assert result.exit_code == exitcodes.TOOL_FAILED
    assert "Error: give either --egress-allow (the new list) or --no-egress (none), not both" in result.output
