"""`testhide` with a fetch step, services and pools' egress lists, as an engineer and an
organisation's administrator run it against a real control plane: a fetch step on a pool
that allows no egress is refused in the control plane's words, the egress list set with
`admin pools set` is what `pools list --json` shows, the job's fetch step and services
come back in `jobs show`, and `logs --service` says which services a job has when the one
asked for left no output."""

from __future__ import annotations

import json

import pytest

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane
from tests.json_schema import assert_matches_example


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


async def submitted(cli: Cli, *options: str) -> str:
    result = await cli("run", "--detach", "--no-workspace", "--image", JOB_IMAGE, *options, "--", "true")
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


async def egress_of(cli: Cli, pool: str) -> list[str]:
    result = await cli("pools", "list", "--json")
    assert result.returncode == 0, result.stderr
    pools = json.loads(result.stdout)
    assert_matches_example("testhide pools list", pools)
    return next(p["egress_allow"] for p in pools if p["name"] == pool)


async def test_a_fetch_step_on_a_pool_without_egress_is_refused(cp: RunningControlPlane, cli: Cli) -> None:
    result = await cli("run", "--no-workspace", "--image", JOB_IMAGE, "--fetch", "wget x", "--", "true")
    assert result.returncode == 125, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(
        "Error: pool default allows no egress, so the fetch step has nowhere to fetch from"
    )
    assert "testhide admin pools set" in line
    assert line.endswith("(failed_precondition)")
    listed = json.loads((await cli("jobs", "list", "--json")).stdout)
    assert listed == []  # refused before a job was made


async def test_the_egress_list_an_administrator_sets_is_the_pools(cp: RunningControlPlane, cli: Cli) -> None:
    assert await egress_of(cli, "default") == []
    result = await cli(
        "admin", "pools", "set", "default", "--egress-allow", "Mirror.Test", "--egress-allow", "10.0.0.7:8080"
    )
    assert result.returncode == 0, result.stderr
    assert "egress mirror.test, 10.0.0.7:8080" in one_line(result.stderr)
    assert await egress_of(cli, "default") == ["mirror.test", "10.0.0.7:8080"]
    table = (await cli("pools", "list")).stdout.decode().splitlines()
    assert table[0].split()[-1] == "EGRESS"
    assert next(line for line in table if line.startswith("default ")).endswith(" mirror.test 10.0.0.7:8080")

    # Now a fetch step is taken, and comes back with its secrets by name, its cache and the services.
    secret = await cli("secrets", "set", "MIRROR_TOKEN", stdin=b"t0ken\n")
    assert secret.returncode == 0, secret.stderr
    job_id = await submitted(
        cli,
        *("--fetch", "wget -O /cache/x http://mirror.test/x", "--fetch-secret", "MIRROR_TOKEN"),
        *("--cache", "mirror-1", "--service", "db=testhide/busybox:1"),
        *("--service-command", "db=httpd -f -p 8080", "--service-env", "db:MODE=test"),
        *("--service-tmpfs", "db:/var/run/db"),
    )
    shown = json.loads((await cli("jobs", "show", job_id, "--json")).stdout)
    assert_matches_example("testhide jobs show", shown)
    spec = shown["spec"]
    assert (spec["fetch"], spec["fetch_secrets"], spec["cache"]) == (
        "wget -O /cache/x http://mirror.test/x",
        ["MIRROR_TOKEN"],
        "mirror-1",
    )
    assert spec["services"] == [
        {
            "name": "db",
            "image": "testhide/busybox:1",
            "command": ["httpd", "-f", "-p", "8080"],
            "env": {"MODE": "test"},
            "tmpfs": ["/var/run/db"],
        }
    ]
    assert shown["fetch"] is None  # no agent has run it
    details = (await cli("jobs", "show", job_id)).stdout.decode().splitlines()
    assert "fetch:      wget -O /cache/x http://mirror.test/x  (secrets: MIRROR_TOKEN)" in details
    assert "cache:      mirror-1" in details
    assert "  db: testhide/busybox:1, command httpd -f -p 8080, env MODE=test, tmpfs /var/run/db" in details
    assert "fetch step: - (not run yet)" in details

    cleared = await cli("admin", "pools", "set", "default", "--no-egress")
    assert cleared.returncode == 0, cleared.stderr
    assert "egress none" in one_line(cleared.stderr)
    assert await egress_of(cli, "default") == []


async def test_logs_of_a_service_a_job_does_not_have_names_its_services(
    cp: RunningControlPlane, cli: Cli
) -> None:
    plain = await submitted(cli)
    result = await cli("logs", plain, "--service", "db")
    assert result.returncode == 125
    assert result.stdout == b""
    assert one_line(result.stderr) == f"Error: job {plain} has no output of service db (it has no services)"

    with_services = await submitted(
        cli, "--service", "db=testhide/busybox:1", "--service", "web=testhide/busybox:1"
    )
    result = await cli("logs", with_services, "--service", "cache")
    assert result.returncode == 125
    assert one_line(result.stderr) == (
        f"Error: job {with_services} has no output of service cache (its services: db, web)"
    )
    # The job has not run: its services left no output yet either.
    result = await cli("logs", with_services, "--service", "db")
    assert one_line(result.stderr) == (
        f"Error: job {with_services} has no output of service db (its services: db, web)"
    )
    unknown = await cli("logs", "j0000000000000000000000000", "--service", "db")
    assert unknown.returncode == 125
    assert "not found" in one_line(unknown.stderr)


@pytest.mark.docker
async def test_a_services_output_is_printed_and_listed(docker_agent: Agent, cli: Cli) -> None:
    """The agent keeps what the service wrote; `logs --service` prints it, `artifacts` lists it."""
    script = "echo hello from web; echo to stderr >&2; exec sleep 60"
    run = await cli(
        "run",
        *("--no-workspace", "--image", JOB_IMAGE, "--service", f"web={JOB_IMAGE}"),
        *("--service-command", f"web=sh -c '{script}'"),
        *("--", "sh", "-c", "sleep 1"),
    )
    assert run.returncode == 0, run.stderr
    job_id = run.stderr.decode().split()[1]
    printed = await cli("logs", job_id, "--service", "web")
    assert printed.returncode == 0, printed.stderr
    assert b"hello from web\n" in printed.stdout
    assert b"to stderr\n" in printed.stdout
    listed = json.loads((await cli("artifacts", job_id, "--list", "--json")).stdout)
    assert_matches_example("testhide artifacts --list", listed)
    assert [(a["path"], a["kind"]) for a in listed] == [("services/web.log", "SERVICE_LOG")]
    human = (await cli("artifacts", job_id, "--list")).stdout.decode()
    assert human.startswith("services/web.log ")
    assert human.rstrip().endswith("(service log)")
