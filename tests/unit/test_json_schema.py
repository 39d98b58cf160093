"""The one set of JSON examples (tests/json_examples.py) follows the convention,
every `--json` of the three programs has an example, the outputs built here
without a server match theirs, and the shape check catches what it must."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from testhide.cli.model import Artifact, Secret
from testhide.cli.output import artifact_json, job_json, results_json, secret_json
from testhide.cli.wire_convert import job_from_pb, results_from_pb
from testhide.protos.v1 import jobs_pb2
from tests.json_examples import EXAMPLES, Example
from tests.json_schema import (
    assert_matches_example,
    convention_problems,
    join,
    readme_table,
    shape_problems,
)

REPO = Path(__file__).resolve().parents[2]
AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def paths(document: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, document
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths(value, join(path, key))
    elif isinstance(document, list):
        for item in document:
            yield from paths(item, f"{path}[]")


# the examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_every_example_follows_the_convention(command: str) -> None:
    example = EXAMPLES[command]
    assert convention_problems(example.document, example.maps) == []
    assert shape_problems(example, example.document) == []


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_every_example_documents_its_types(command: str) -> None:
    """No null (its type would be unknown; nullable paths say where null may come)
    and no empty array or map (its elements' shape would be unknown)."""
    example = EXAMPLES[command]
    found = dict(paths(example.document))
    assert [p for p, v in found.items() if v is None] == []
    assert [p for p, v in found.items() if v in ([], {})] == []
    assert example.nullable <= found.keys(), "a nullable path the example does not have"
    assert all(isinstance(found.get(p), dict) for p in example.maps), "a map path that is not an object"


@pytest.mark.parametrize("command", [c for c, e in EXAMPLES.items() if e.like])
def test_an_array_of_another_outputs_objects_is_that_output(command: str) -> None:
    example = EXAMPLES[command]
    like = EXAMPLES[example.like]
    prefix = "" if isinstance(like.document, list) else "[]."
    assert example.document == (like.document if prefix == "" else [like.document])
    assert example.nullable == frozenset(prefix + p if p[:2] != "[]" else p for p in like.nullable)
    assert example.maps == frozenset(prefix + p if p[:2] != "[]" else p for p in like.maps)


def test_every_json_option_of_the_three_programs_has_an_example() -> None:
    from testhide.agent.cli import main as agent
    from testhide.cli.commands import main as cli
    from testhide.controlplane.cli import main as controlplane

    def with_json(command: click.Command, name: str) -> Iterator[str]:
        if isinstance(command, click.Group):
            for sub_name, sub in command.commands.items():
                yield from with_json(sub, f"{name} {sub_name}")
        elif any("--json" in getattr(p, "opts", ()) for p in command.params):
            yield name

    commands = [
        *with_json(cli, "testhide"),
        *with_json(agent, "testhide-agent"),
        *with_json(controlplane, "testhide-controlplane"),
    ]
    assert "testhide jobs show" in commands
    # `artifacts --json` prints the list that `--list` shows.
    named = {"testhide artifacts": "testhide artifacts --list"}
    assert [c for c in commands if named.get(c, c) not in EXAMPLES] == []


def test_the_readme_shows_every_example() -> None:
    """README.md's "JSON output" table is `python -m tests.json_schema`'s output."""
    assert readme_table() in (REPO / "README.md").read_text(), (
        "README.md's JSON output table differs from the examples: paste `python -m tests.json_schema`"
    )


# outputs built without a server -------------------------------------------------------------


def stamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def full_job() -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(
        image="busybox",
        command=["sh", "-c", "exit 3"],
        env={"CI": "1"},
        pool="default",
        labels={"arch": "amd64"},
        secrets=["TOKEN"],
        artifact_globs=["dist/**"],
        junit_globs=["r/*.xml"],
        resources=jobs_pb2.Resources(cpus=2, memory_bytes=2**30, pids=64),
    )
    spec.timeout.FromSeconds(60)
    return jobs_pb2.Job(
        id="j0190a3b4c5d6e7f8a9b0c1d2",
        spec=spec,
        status=jobs_pb2.JOB_STATUS_FAILED,
        exit_code=3,
        created_at=stamp(AT),
        started_at=stamp(AT + timedelta(seconds=1)),
        finished_at=stamp(AT + timedelta(seconds=2)),
        agent_id="a1",
        agent=jobs_pb2.JobAgent(id="a1", name="n", host="h", version="1", pool="default"),
        isolation=jobs_pb2.Isolation(
            runtime="runc", network_mode="none", interfaces=["lo"], cap_drop=["ALL"]
        ),
        transitions=[jobs_pb2.StatusTransition(status=jobs_pb2.JOB_STATUS_QUEUED, at=stamp(AT))],
        attempt=1,
    )


def test_a_job_as_jobs_show_and_jobs_list_print_it() -> None:
    shown = job_json(job_from_pb(full_job()))
    assert_matches_example("testhide jobs show", shown)
    assert_matches_example("testhide jobs list", [shown])
    queued = jobs_pb2.Job(
        id="j1",
        spec=jobs_pb2.JobSpec(image="b", command=["true"]),
        status=jobs_pb2.JOB_STATUS_QUEUED,
        created_at=stamp(AT),
    )
    assert_matches_example("testhide jobs show", job_json(job_from_pb(queued)))


def test_test_results_secrets_and_artifacts_as_printed() -> None:
    case = jobs_pb2.TestCase(name="t", duration_s=1, status=jobs_pb2.TEST_STATUS_PASSED)
    assert_matches_example(
        "testhide tests", results_json(results_from_pb(jobs_pb2.TestResults(cases=[case])))
    )
    assert_matches_example(
        "testhide secrets list",
        [secret_json(Secret("A", AT)), secret_json(Secret("B", AT, AT, "j0190a3b4c5d6e7f8a9b0c1d2"))],
    )
    assert_matches_example("testhide artifacts --list", [artifact_json(Artifact("a/b", 3, "ab" * 32))])


def test_the_doctors_and_migrate_store_as_printed() -> None:
    from testhide.common.findings import fail, ok, render, warn
    from testhide.controlplane.commands.migrate_store import Migration, Target

    printed = json.loads(
        render([ok("a", "fine"), warn("b", "hm", "do x"), fail("c", "bad", "do y")], True, False)
    )
    for command in ("testhide-agent doctor", "testhide-controlplane doctor"):  # both print through render
        assert_matches_example(command, printed)
    migration = Migration("/d", Target("h", 5432, "db"), {"jobs": 1, "secrets": 0}, 3, 1.5)
    assert_matches_example("testhide-controlplane migrate-store", migration.as_json())


# what the check catches -------------------------------------------------------------------------

SECRETS = EXAMPLES["testhide secrets list"]
JOB = EXAMPLES["testhide jobs show"]


def changed(document: Any, path: list[Any], value: Any) -> Any:
    document = copy.deepcopy(document)
    *parents, last = path
    target = document
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (["status"], "JOB_STATUS_FAILED", "carries its enum type's prefix"),
        (["transitions", 0, "status"], "JOB_STATUS_QUEUED", "transitions[].status: 'JOB_STATUS_QUEUED'"),
        (["created_at"], "2030-01-02T03:04:05+00:00", "created_at: '2030-01-02T03:04:05+00:00' is not"),
        (["created_at"], "2030-01-02T03:04:05Z", "is not an RFC 3339 UTC time"),
        (["transitions", 0, "at"], "2030-01-02 03:04:05", "transitions[].at"),
        (
            ["status_reason"],
            "2030-01-02T03:04:05.000000Z",
            "a time in a field whose name does not end in _at",
        ),
        (["spec", "timeout_s"], "1h", "spec.timeout_s: a duration in seconds must be a number"),
        (["log_size"], 1, None),
        (["spec", "memory_bytes"], 1.5, "a size in bytes must be an integer"),
        (["command"], "python3 -m pytest", "command: string, but the example has array"),
        (["exit_code"], None, None),
        (["status_reason"], None, "status_reason: null, but the example has string and no null"),
        (["spec", "pool"], None, "spec.pool: null"),
        (["isolation"], None, None),
        (["isolation", "pids_limit"], "2048", "isolation.pids_limit: string, but the example has number"),
        (["spec", "env"], {"ANY_NAME": "x", "OTHER": "y"}, None),
        (["spec", "env"], {"ANY_NAME": 1}, "spec.env.*: number, but the example has string"),
        (["agent", "id"], KeyError, "agent.id: missing"),
        (["agent", "extra"], "x", "agent.extra: not in the example"),
        (["transitions", 0], {"status": "QUEUED", "at": AT.isoformat()}, "transitions[].reason: missing"),
        (["state"], "Connected", "state: a state is a lower-case word"),
        (["retried_as"], 7, "retried_as: number, but the example has string"),
        (["agent_id"], 7, "agent_id: an id must be a string"),
    ],
)
def test_the_check_catches_what_breaks_the_schema(path: list[Any], value: Any, problem: str | None) -> None:
    document = changed(JOB.document, path, value)
    if problem is None:
        assert_matches_example("testhide jobs show", document)
        return
    with pytest.raises(AssertionError, match=re.escape(problem)):
        assert_matches_example("testhide jobs show", document)


def test_every_element_of_an_array_is_checked() -> None:
    good = SECRETS.document[0]
    assert_matches_example("testhide secrets list", [good, {**good, "last_used_at": None}])
    with pytest.raises(AssertionError, match=r"\[\]\.updated_at: null"):
        assert_matches_example("testhide secrets list", [good, {**good, "updated_at": None}])
    with pytest.raises(AssertionError, match=r"\(the document\): object, but the example has array"):
        assert_matches_example("testhide secrets list", good)
    assert_matches_example("testhide secrets list", [])


def test_lists_are_arrays_and_keys_snake_case() -> None:
    example = Example({"scopes": ["a"], "name": "x"})
    assert convention_problems({"scopes": "a b", "name": "x"}) == [
        "scopes: several values must be an array, not 'a b'"
    ]
    assert shape_problems(example, {"scopes": [], "name": "x"}) == []
    assert convention_problems({"lastUsedAt": None}) == ["lastUsedAt: its name is not snake_case"]
