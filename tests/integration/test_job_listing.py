"""`jobs list` filters by status, label, pool and time and pages: in the store
(SQLite and PostgreSQL, through both PostgreSQL drivers), over the API
(validation, the caller's organisation only) and in the `testhide` command
(the next page's command on stderr, --all, --limit's range)."""

from __future__ import annotations

import json
import shlex
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from testhide.controlplane.jobs.model import JobFilter, JobStatus
from testhide.controlplane.store.base import Store
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, Cli, RunningControlPlane
from tests.integration.test_store import NOW, POSTGRES, PSYCOPG, SQLITE, empty_store, make_job, populate

MICROSECOND = timedelta(microseconds=1)


@pytest.fixture(params=[SQLITE, POSTGRES, PSYCOPG])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        await s.create_pool("acme", "gpu", NOW)
        yield s


async def listed(store: Store, where: JobFilter, limit: int = 50, before: str | None = None) -> list[str]:
    return [j.id for j in await store.list_jobs("acme", limit, before, where)]


async def test_each_filter_and_their_combination(store: Store) -> None:
    jobs = [
        make_job("j1", labels={"arch": "amd64", "os": "linux"}),
        make_job("j2", labels={"arch": "arm64"}, env={"arch": "amd64"}),  # env is not a label
        make_job("j3", pool="gpu", labels={"arch": "amd64"}),
        replace(make_job("j4", labels={"arch": "amd64"}), created_at=NOW + timedelta(hours=1)),
        make_job("j5", org="other", labels={"arch": "amd64"}),
    ]
    for job in jobs:
        await store.create_job(job, b"k")
    await store.set_job_status("acme", "j1", None, JobStatus.CANCELED, NOW)

    assert await listed(store, JobFilter()) == ["j4", "j3", "j2", "j1"]
    assert await listed(store, JobFilter(statuses=frozenset({JobStatus.CANCELED}))) == ["j1"]
    both = frozenset({JobStatus.CANCELED, JobStatus.QUEUED})
    assert await listed(store, JobFilter(statuses=both)) == ["j4", "j3", "j2", "j1"]
    assert await listed(store, JobFilter(statuses=frozenset({JobStatus.FAILED}))) == []
    assert await listed(store, JobFilter(labels=(("arch", "amd64"),))) == ["j4", "j3", "j1"]
    assert await listed(store, JobFilter(labels=(("arch", "amd64"), ("os", "linux")))) == ["j1"]
    assert await listed(store, JobFilter(labels=(("arch", "amd"),))) == []
    assert await listed(store, JobFilter(pool="gpu")) == ["j3"]
    assert await listed(store, JobFilter(pool="default")) == ["j4", "j2", "j1"]
    assert await listed(store, JobFilter(since=NOW + timedelta(minutes=1))) == ["j4"]
    combined = JobFilter(frozenset({JobStatus.QUEUED}), (("arch", "amd64"),), "default", NOW)
    assert await listed(store, combined) == ["j4"]
    assert [j.id for j in await store.list_jobs("other", 50, None, JobFilter(pool="default"))] == ["j5"]


async def test_since_counts_to_the_microsecond_whatever_the_offset(store: Store) -> None:
    at = NOW + timedelta(microseconds=250_000)
    await store.create_job(replace(make_job("j1"), created_at=at), b"k")
    await store.create_job(replace(make_job("j2"), created_at=NOW), b"k")  # a whole second
    assert await listed(store, JobFilter(since=at)) == ["j1"]
    assert await listed(store, JobFilter(since=at + MICROSECOND)) == []
    assert await listed(store, JobFilter(since=NOW)) == ["j2", "j1"]
    assert await listed(store, JobFilter(since=NOW + MICROSECOND)) == ["j1"]
    east = timezone(timedelta(hours=2))
    assert await listed(store, JobFilter(since=at.astimezone(east))) == ["j1"]
    assert await listed(store, JobFilter(since=(at + MICROSECOND).astimezone(east))) == []


@pytest.mark.parametrize(
    "text",
    ["x' OR '1'='1", 'x" OR 1=1 --', "$.labels", "a.b", "%", "_", "\\", "'; DROP TABLE jobs; --", "ü"],
)
async def test_label_keys_and_values_are_data_never_sql_or_json_paths(store: Store, text: str) -> None:
    await store.create_job(make_job("j1", labels={"k": "v"}), b"k")
    await store.create_job(make_job("j2", labels={"k": text, text: "v"}), b"k")
    assert await listed(store, JobFilter(labels=(("k", text),))) == ["j2"]
    assert await listed(store, JobFilter(labels=((text, "v"),))) == ["j2"]
    assert await listed(store, JobFilter(pool=text)) == []
    assert await listed(store, JobFilter()) == ["j2", "j1"]


async def test_pages_of_a_filter_follow_on_without_gaps(store: Store) -> None:
    for i in range(7):
        await store.create_job(make_job(f"j{i}", labels={"even": str(i % 2 == 0)}), b"k")
    even = JobFilter(labels=(("even", "True"),))
    assert await listed(store, even, 2) == ["j6", "j4"]
    assert await listed(store, even, 2, "j4") == ["j2", "j0"]
    assert await listed(store, even, 2, "j0") == []


# over the API ---------------------------------------------------------------------------------


async def submit(
    stub: jobs_pb2_grpc.JobsAsyncStub, metadata: tuple[tuple[str, str], ...], **spec: object
) -> str:
    request = jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(image=JOB_IMAGE, command=["true"], **spec))  # type: ignore[arg-type]
    return (await stub.Submit(request, metadata=metadata, timeout=30)).job.id


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"page_size": 501}, "page_size must be between 0 and 500"),
        ({"page_size": -1}, "page_size"),
        ({"statuses": [jobs_pb2.JOB_STATUS_UNSPECIFIED]}, "unknown job status 0"),
        ({"statuses": [99]}, "unknown job status 99"),
        ({"labels": {"no spaces": "x"}}, "label"),
        ({"labels": {"k": "\x00"}}, "label k"),
        ({"pool": "Not A Pool"}, "pool"),
        ({"page_token": "x" * 30}, "page_token"),
    ],
)
async def test_a_bad_listing_request_is_invalid_argument(
    cp: RunningControlPlane, request_fields: dict[str, object], message: str
) -> None:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub, metadata = jobs_pb2_grpc.JobsStub(channel), await cp.bearer()
        request = jobs_pb2.ListJobsRequest(**request_fields)  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(request, metadata=metadata, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


async def test_a_since_out_of_range_is_invalid_argument(cp: RunningControlPlane) -> None:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        request = jobs_pb2.ListJobsRequest()
        request.since.seconds = 2**62
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(request, metadata=await cp.bearer(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "since" in (caught.value.details() or "")


async def test_the_api_filters_and_pages(cp: RunningControlPlane) -> None:
    assert cp.daemon._store is not None
    await cp.daemon._store.create_pool("default", "gpu", datetime.now(UTC))
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub, metadata = jobs_pb2_grpc.JobsStub(channel), await cp.bearer()
        first = await submit(stub, metadata, labels={"team": "a"})
        second = await submit(stub, metadata, labels={"team": "b"}, pool="gpu")
        third = await submit(stub, metadata, labels={"team": "a"})

        async def ids(**fields: object) -> tuple[list[str], str]:
            request = jobs_pb2.ListJobsRequest(**fields)  # type: ignore[arg-type]
            response = await stub.List(request, metadata=metadata, timeout=30)
            return [j.id for j in response.jobs], response.next_page_token

        assert await ids() == ([third, second, first], "")
        assert await ids(labels={"team": "a"}) == ([third, first], "")
        assert await ids(pool="gpu") == ([second], "")
        assert await ids(statuses=[jobs_pb2.JOB_STATUS_QUEUED, jobs_pb2.JOB_STATUS_FAILED]) == (
            [third, second, first],
            "",
        )
        assert await ids(statuses=[jobs_pb2.JOB_STATUS_SUCCEEDED]) == ([], "")
        assert await ids(page_size=1, labels={"team": "a"}) == ([third], third)
        assert await ids(page_size=1, labels={"team": "a"}, page_token=third) == ([first], "")
        later = jobs_pb2.ListJobsRequest()
        later.since.FromDatetime(datetime.now(UTC) + timedelta(minutes=1))
        assert await ids(since=later.since) == ([], "")


# the command ----------------------------------------------------------------------------------


async def test_jobs_list_filters_and_prints_the_next_pages_command(cp: RunningControlPlane, cli: Cli) -> None:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        stub, metadata = jobs_pb2_grpc.JobsStub(channel), await cp.bearer()
        submitted = [await submit(stub, metadata, labels={"n": str(i % 2)}) for i in range(5)]
    newest_first = submitted[::-1]

    first = await cli("jobs", "list", "--label", "n=0", "--since", "1h", "--limit", "2", "--json")
    assert first.returncode == 0, first.stderr
    assert [j["id"] for j in json.loads(first.stdout)] == [submitted[4], submitted[2]]
    hint = first.stderr.decode().strip()
    assert hint.startswith("more jobs: testhide jobs list --label n=0 --since 20"), hint
    assert hint.endswith(f"--limit 2 --json --page-token {submitted[2]}"), hint
    command = shlex.split(hint.removeprefix("more jobs: "))
    assert command[0] == "testhide"
    rest = await cli(*command[1:])
    assert rest.returncode == 0, rest.stderr
    assert [j["id"] for j in json.loads(rest.stdout)] == [submitted[0]]
    assert rest.stderr == b""  # the last page

    every = await cli("jobs", "list", "--all", "--limit", "2", "--json", "--status", "queued")
    assert [j["id"] for j in json.loads(every.stdout)] == newest_first
    assert every.stderr == b""
    table = await cli("jobs", "list", "--limit", "3", "--pool", "default")
    assert len(table.stdout.decode().splitlines()) == 1 + 3
    assert b"--page-token" in table.stderr
    assert b"--json" not in table.stderr
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert json.loads((await cli("jobs", "list", "--since", future, "--json")).stdout) == []
    assert json.loads((await cli("jobs", "list", "--status", "FAILED", "--json")).stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "0 is not in the range 1<=x<=500"),
        (["--limit", "501"], "501 is not in the range 1<=x<=500"),
        (["--status", "DONE"], "'DONE' is not one of"),
        (["--label", "novalue"], "--label takes KEY=VALUE"),
        (["--since", "yesterday"], "neither a duration (2h, 3d) nor an RFC 3339 time"),
    ],
)
async def test_jobs_list_refuses_bad_options_in_one_line(cli: Cli, args: list[str], message: str) -> None:
    result = await cli("jobs", "list", *args)
    assert result.returncode == 125
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr
