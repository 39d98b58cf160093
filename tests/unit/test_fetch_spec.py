"""The fetch step, caches and services as the control plane takes them: what a job
may ask (jobs/validation.py), what a pool's egress list may hold (jobs/egress.py,
operations/agents.py), what Submit refuses and what an assignment carries
(jobs/service.py), and what an agent's report of a fetch step becomes (rpc/convert.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from testhide.controlplane.errors import FailedPrecondition, InvalidArgument
from testhide.controlplane.jobs.egress import MAX_EGRESS_ENTRIES, egress_entry, egress_list
from testhide.controlplane.jobs.model import (
    MAX_FETCH_REQUESTS,
    EgressRequest,
    FetchStep,
    JobSpec,
    JobStatus,
    PoolPolicy,
    ServiceSpec,
)
from testhide.controlplane.jobs.validation import MAX_FETCH_BYTES, validate_spec
from testhide.controlplane.operations.agents import PolicyChange, _changed
from testhide.controlplane.rpc.convert import fetch_from_pb, fetch_to_pb, spec_from_pb, spec_to_pb
from testhide.controlplane.store.sqlite_common import (
    _fetch_from_json,
    _fetch_to_json,
    _spec_from_json,
    _spec_to_json,
)
from testhide.protos.v1 import jobs_pb2
from tests.unit.test_job_service import World

GOOD = JobSpec(image="busybox:1.36", command=("make", "test"))
DB = ServiceSpec(name="db", image="postgres:16", command=("postgres",), env={"A": "1"}, tmpfs=("/var/run",))
FULL = dataclasses.replace(
    GOOD,
    fetch="pip download -d /cache -r req.txt",
    fetch_secrets=("PYPI_TOKEN",),
    cache="deps-1",
    services=(DB,),
)
AT = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


def spec(**changes: Any) -> JobSpec:
    return dataclasses.replace(GOOD, **changes)


def service(**changes: Any) -> JobSpec:
    return spec(services=(dataclasses.replace(DB, **changes),))


def test_a_job_with_a_fetch_step_a_cache_and_services_is_valid() -> None:
    assert validate_spec(FULL) is FULL
    eight = tuple(ServiceSpec(name=f"s{i}", image="redis:7") for i in range(8))
    validate_spec(spec(services=eight, fetch="x" * MAX_FETCH_BYTES))
    validate_spec(service(name="a" + "-" * 30, command=(), env={}, tmpfs=tuple(f"/t{i}" for i in range(8))))
    validate_spec(spec(fetch="true", cache="A.b_c-9" + "x" * 121))


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (spec(fetch="x" * (MAX_FETCH_BYTES + 1)), "fetch must be at most 8192 bytes, without NUL"),
        (spec(fetch="wget\x00"), "fetch must be at most 8192 bytes, without NUL"),
        (spec(fetch="true", fetch_secrets=("lower",)), "fetch secret name 'lower' is invalid"),
        (spec(fetch="true", fetch_secrets=("T", "T")), "fetch_secrets must be distinct"),
        (spec(fetch="true", fetch_secrets=tuple(f"S{i}" for i in range(257))), "at most 256"),
        (spec(fetch="true", env={"T": "1"}, fetch_secrets=("T",)), "T is both an environment variable"),
        (spec(fetch_secrets=("T",)), "fetch_secrets needs fetch"),
        (spec(fetch="true", cache="a/b"), "cache key 'a/b' must be 1-128 of letters"),
        (spec(fetch="true", cache="x" * 129), "cache key 'x+'... \\(129 characters\\) must be"),
        (spec(cache="deps"), "--cache needs --fetch: the fetch step is what fills the cache"),
        (
            spec(fetch="true", cache="job.j1"),
            "cache key 'job.j1' must not start with 'job.': those are the agent's",
        ),
        (spec(services=tuple(ServiceSpec(f"s{i}", "redis") for i in range(9))), "at most 8 services, not 9"),
        (service(name="Db"), "service name 'Db' must be 1-31 lowercase"),
        (service(name="1db"), "service name '1db' must be"),
        (service(name="a" * 32), "service name 'a+' must be"),
        (spec(services=(DB, DB)), "service db is named twice"),
        (service(image=""), "service db: an image is required"),
        (service(image="UPPER/case"), "service db: image 'UPPER/case' is not a valid image reference"),
        (service(command=("a\x00",)), "service db: command arguments must not contain NUL"),
        (service(command=("x" * 200_000,)), "service db: command is too long"),
        (service(env={f"V{i}": "" for i in range(257)}), "service db: at most 256 environment variables"),
        (service(env={"1X": ""}), "service db: environment variable name '1X' is invalid"),
        (service(env={"X": "\x00"}), "service db: environment variable X is too long or contains NUL"),
        (service(tmpfs=tuple(f"/t{i}" for i in range(9))), "service db: at most 8 tmpfs paths"),
        (service(tmpfs=("/t", "/t")), "at most 8 tmpfs paths, each once"),
        (service(tmpfs=("/",)), "service db: tmpfs must not be /"),
        (service(tmpfs=("relative",)), "tmpfs 'relative' must be an absolute path"),
        (service(tmpfs=("/a/../b",)), "tmpfs '/a/../b' must be an absolute path without '.' or '..'"),
        (service(tmpfs=("/a/./b",)), "must be an absolute path"),
        (service(tmpfs=("/a//b",)), "must be an absolute path"),
        (service(tmpfs=("/a/",)), "must be an absolute path"),
        (service(tmpfs=("/a:rw",)), "must be an absolute path"),
        (service(tmpfs=("/proc",)), "tmpfs '/proc' must not be under /proc, /sys or /dev"),
        (service(tmpfs=("/sys/fs",)), "must not be under /proc, /sys or /dev"),
        (service(tmpfs=("/dev/shm",)), "must not be under /proc, /sys or /dev"),
    ],
)
def test_each_refusal_names_its_field_and_rule(changed: JobSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as refused:
        validate_spec(changed)
    assert "\n" not in str(refused.value)


def test_paths_that_only_start_like_kernel_directories_are_fine() -> None:
    validate_spec(service(tmpfs=("/process", "/system", "/devices", "/var/lib/postgresql/data")))


# ---------------------------------------------------------------- egress lists


@pytest.mark.parametrize(
    ("entry", "kept"),
    [
        ("pypi.org", "pypi.org"),
        ("PyPI.org:443", "pypi.org:443"),
        (".debian.org", ".debian.org"),
        ("files.pythonhosted.org:8080", "files.pythonhosted.org:8080"),
        ("localhost", "localhost"),
        ("10.0.0.1", "10.0.0.1"),
        ("192.168.1.20:65535", "192.168.1.20:65535"),
        ("a-b.c-d.e:1", "a-b.c-d.e:1"),
    ],
)
def test_an_egress_entry_is_a_host_or_a_host_and_port(entry: str, kept: str) -> None:
    assert egress_entry(entry) == kept


@pytest.mark.parametrize(
    "entry",
    [
        "",
        ":443",
        "pypi.org:",
        "pypi.org:0",
        "pypi.org:65536",
        "pypi.org:080",
        "pypi.org:https",
        "pypi.org:443:1",
        "http://pypi.org",
        "pypi.org/simple",
        "*.pypi.org",
        "..pypi.org",
        "pypi.org.",
        "-pypi.org",
        "pypi-.org",
        "py_pi.org",
        "pypi org",
        "10.0.0.256",
        "10.0.0",
        "01.2.3.4",
        ".10.0.0.1",
        "[::1]:443",
        "::1",
        "a" * 64 + ".org",
        "pypi.org\n",
    ],
)
def test_anything_else_is_refused_naming_the_entry(entry: str) -> None:
    with pytest.raises(InvalidArgument, match=r"egress entry .* is not HOST or HOST:PORT") as refused:
        egress_entry(entry)
    assert repr(entry)[:20] in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_list_keeps_its_order_without_repeats_and_is_bounded() -> None:
    assert egress_list(["b.org", "a.org:80", "B.org"]) == ("b.org", "a.org:80")
    egress_list([f"h{i}.org" for i in range(MAX_EGRESS_ENTRIES)])
    with pytest.raises(InvalidArgument, match="at most 64 egress entries, not 65"):
        egress_list([f"h{i}.org" for i in range(MAX_EGRESS_ENTRIES + 1)])


def test_a_pool_change_replaces_keeps_or_clears_the_egress_list() -> None:
    listed = PoolPolicy(egress_allow=("pypi.org",))
    assert _changed(listed, PolicyChange()).egress_allow == ("pypi.org",)
    assert _changed(listed, PolicyChange(runtime="runc")).egress_allow == ("pypi.org",)
    assert _changed(listed, PolicyChange(egress_allow=("A.org", "b.org:81"))).egress_allow == (
        "a.org",
        "b.org:81",
    )
    assert _changed(listed, PolicyChange(no_egress=True)).egress_allow == ()
    with pytest.raises(InvalidArgument, match="not both"):
        _changed(listed, PolicyChange(egress_allow=("a.org",), no_egress=True))
    with pytest.raises(InvalidArgument, match=r"egress entry 'a\.org:0'"):
        _changed(listed, PolicyChange(egress_allow=("b.org", "a.org:0")))


# ---------------------------------------------------------------- submit and dispatch


async def test_a_fetch_step_in_a_pool_without_egress_is_refused_and_nothing_stored() -> None:
    world = World()
    with pytest.raises(FailedPrecondition) as refused:
        await world.jobs.submit("acme", spec(fetch="wget http://pypi.org/"))
    assert str(refused.value) == (
        "pool default allows no egress, so the fetch step has nowhere to fetch from: an operator allows "
        "hosts with 'testhide-controlplane pools set default --egress-allow HOST[:PORT]' "
        "(or 'testhide admin pools set')"
    )
    assert world.store.jobs == {}
    # Services and caches alone need no egress; only a fetch step does.
    assert (await world.jobs.submit("acme", service())).status == JobStatus.QUEUED


async def test_a_fetch_secret_must_exist_and_reaches_only_the_fetch_step() -> None:
    world = World(PoolPolicy(egress_allow=("pypi.org",)))
    with pytest.raises(InvalidArgument, match="secrets not found in this organisation: PYPI_TOKEN"):
        await world.jobs.submit("acme", FULL)
    assert world.store.jobs == {}
    await world.secrets.set("acme", "PYPI_TOKEN", b"pypi-s3cret")
    await world.secrets.set("acme", "DEPLOY", b"deploy-s3cret")

    job = await world.jobs.submit("acme", dataclasses.replace(FULL, secrets=("DEPLOY",)))
    details = await world.jobs.assignment_details(job)

    assert details.secret_env == {"DEPLOY": "deploy-s3cret"}
    assert details.fetch_secret_env == {"PYPI_TOKEN": "pypi-s3cret"}
    assert details.policy.egress_allow == ("pypi.org",)
    used = {s.name: s.last_used_by_job for s in await world.secrets.list("acme")}
    assert used == {"PYPI_TOKEN": job.id, "DEPLOY": job.id}


async def test_a_queued_fetch_step_whose_pool_lost_its_egress_list_ends_at_dispatch() -> None:
    world = World(PoolPolicy(egress_allow=("pypi.org",)))
    job = await world.jobs.submit("acme", spec(fetch="true"))
    world.store.policies[("acme", "default")] = PoolPolicy()
    world.jobs._policies.clear()  # the second it is cached for has passed

    with pytest.raises(FailedPrecondition, match="pool default allows no egress"):
        await world.jobs.assignment_details(job)


async def test_a_service_image_the_pool_does_not_allow_is_recorded_as_error() -> None:
    world = World(PoolPolicy(allowed_images=("busybox:*",)))

    job = await world.jobs.submit("acme", service(image="postgres:16"))

    assert job.status == JobStatus.ERROR
    assert job.status_reason == (
        "service db: image 'postgres:16' is not allowed in pool 'default' (allowed: busybox:*)"
    )
    assert (await world.jobs.submit("acme", service(image="busybox:1"))).status == JobStatus.QUEUED


# ---------------------------------------------------------------- conversions


def test_a_spec_with_services_survives_the_wire_and_the_store() -> None:
    assert spec_from_pb(spec_to_pb(FULL)) == FULL
    assert _spec_from_json(_spec_to_json(FULL)) == FULL
    # A spec stored before the fetch step existed reads with its defaults.
    older = _spec_to_json(GOOD).replace(', "services": []', "").replace(', "fetch": ""', "")
    assert "services" not in older
    assert _spec_from_json(older) == GOOD


def egress_pb(**changes: Any) -> jobs_pb2.EgressRequest:
    fields: dict[str, Any] = {
        "at": Timestamp(seconds=int(AT.timestamp()), nanos=600000000),
        "method": "CONNECT",
        "host": "pypi.org",
        "port": 443,
        "allowed": True,
        "http_status": 200,
        "bytes_sent": 10,
        "bytes_received": 20,
    }
    return jobs_pb2.EgressRequest(**{**fields, **changes})


def test_a_fetch_report_is_bounded_printable_and_round_trips() -> None:
    pb = jobs_pb2.FetchStep(cache="miss", exit_code=3, requests=[egress_pb()])
    pb.duration.FromTimedelta(timedelta(seconds=2.5))
    fetch = fetch_from_pb(pb)
    assert fetch == FetchStep(
        "miss", 3, 2.5, (EgressRequest(AT, "CONNECT", "pypi.org", 443, True, 200, 10, 20),)
    )
    assert fetch_from_pb(fetch_to_pb(fetch)) == fetch
    assert _fetch_from_json(_fetch_to_json(fetch)) == fetch
    assert _fetch_from_json(None) is None

    odd = egress_pb(method="G\x1bET" * 20, host="h\n" * 300, port=70000, http_status=-1, bytes_sent=-5)
    hostile = jobs_pb2.FetchStep(cache="hit", requests=[odd] * (MAX_FETCH_REQUESTS + 5))
    hostile.duration.seconds = -9
    kept = fetch_from_pb(hostile)
    assert (kept.duration_s, len(kept.requests)) == (0.0, MAX_FETCH_REQUESTS)
    first = kept.requests[0]
    assert (first.port, first.http_status, first.bytes_sent) == (0, 0, 0)
    assert (first.host.isprintable(), first.method.isprintable()) == (True, True)
    assert (first.host, first.method) == ("h" * 128, "GET" * 8)  # cut at 255 and 32, then filtered


@pytest.mark.parametrize(
    ("pb", "message"),
    [
        (jobs_pb2.FetchStep(), "cache must be hit, miss or none, not ''"),
        (jobs_pb2.FetchStep(cache="maybe"), "not 'maybe'"),
        (
            jobs_pb2.FetchStep(cache="none", requests=[egress_pb(at=Timestamp(seconds=2**40))]),
            "fetched.fetch.requests.at must be a time",
        ),
    ],
)
def test_a_fetch_report_that_makes_no_sense_is_refused(pb: jobs_pb2.FetchStep, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        fetch_from_pb(pb)
