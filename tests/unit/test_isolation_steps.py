"""The control plane's check of the containers beside a job's own
(controlplane/jobs/isolation_policy.py): its fetch step's and its services', field by
field, passing and failing; and what the job service does with the facts (a fetched
report, a started report with services' facts): a mismatch ends the job ERROR naming
the container and the field, its agent is told to stop it, the facts stay with the job."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from testhide.agent.model import JobFetched
from testhide.agent.model import JobStarted as AgentJobStarted
from testhide.agent.rpc.convert import report_to_pb
from testhide.cli.output import job_details, job_json
from testhide.cli.wire_convert import job_from_pb
from testhide.common.fetch import job_network
from testhide.common.identity import AgentIdentity
from testhide.controlplane.jobs.isolation_guard import checked_parts
from testhide.controlplane.jobs.isolation_policy import (
    fetch_mismatches,
    mismatch_reason,
    service_mismatches,
)
from testhide.controlplane.jobs.model import (
    FetchStep,
    Isolation,
    Job,
    JobReport,
    JobSpec,
    JobStatus,
    PoolPolicy,
    ServiceIsolation,
    ServiceSpec,
)
from testhide.controlplane.jobs.scheduler import AgentSession, Cancel
from testhide.controlplane.rpc.agent_wire import report_of
from testhide.controlplane.rpc.convert import fetch_from_pb, job_to_pb
from testhide.protos.v1 import agent_pb2, jobs_pb2
from tests.unit.test_isolation_policy import GOOD, GVISOR, JOB, audited_world, facts_for
from tests.unit.test_job_service import LEASE, SPEC, START

JOB_ID = "j0190a3b4c5d6e7f8a9b0c1d2"
NETWORK = job_network(JOB_ID)
FETCH = replace(
    GOOD,
    network_mode=NETWORK,
    interfaces=("eth0", "lo"),
    mounts=("/cache (rw)", "/tmp (tmpfs)", "/workspace (ro)"),
)
HOLDER = "container:" + "ab" * 32
WITH_SERVICES = replace(JOB, services=(ServiceSpec("db", "postgres:16", tmpfs=("/data",)),))
JOB_FACTS = replace(GOOD, network_mode=HOLDER)
SERVICE = replace(GOOD, network_mode=HOLDER, mounts=("/data (tmpfs)", "/tmp (tmpfs)"))


def fetch(facts: Isolation, spec: JobSpec = JOB) -> list[str]:
    return [str(m) for m in fetch_mismatches(JOB_ID, spec, PoolPolicy(), facts)]


def services(*reported: ServiceIsolation, job: Isolation | None = JOB_FACTS) -> list[str]:
    return [str(m) for m in service_mismatches(WITH_SERVICES, PoolPolicy(), reported, job)]


# ------------------------------------------------------------- the fetch step's container


def test_a_fetch_container_as_the_agent_makes_it_passes() -> None:
    assert fetch(FETCH) == []
    assert fetch(replace(FETCH, interfaces=())) == []  # not observed: it had exited already


def test_a_fetch_container_under_gvisors_networked_registration_passes() -> None:
    networked = replace(FETCH, runtime="runsc-net", seccomp="testhide-gvisor", pids_limit=9792)
    assert fetch(networked, replace(JOB, runtime="runsc")) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"network_mode": "bridge"},
            f"network_mode: expected the job's internal network {NETWORK}, got bridge",
        ),
        ({"network_mode": "none"}, f"network_mode: expected the job's internal network {NETWORK}, got none"),
        ({"network_mode": "host"}, f"network_mode: expected the job's internal network {NETWORK}, got host"),
        (
            {"network_mode": "default"},
            f"network_mode: expected the job's internal network {NETWORK}, got default",
        ),
        (
            {"network_mode": job_network("j-another")},
            f"network_mode: expected the job's internal network {NETWORK}, got {job_network('j-another')}",
        ),
        ({"interfaces": ("lo",)}, "interfaces: expected lo and one on the job's network, got lo"),
        (
            {"interfaces": ("eth0", "eth1", "lo")},
            "interfaces: expected lo and one on the job's network, got eth0, eth1, lo",
        ),
        ({"user": "0:0"}, "user: expected a numeric non-root uid[:gid], got 0:0"),
        ({"cap_add": ("NET_RAW",)}, "cap_add: expected none, got NET_RAW"),
        ({"cap_drop": ()}, "cap_drop: expected ALL, got (none)"),
        ({"no_new_privileges": False}, "no_new_privileges: expected true, got false"),
        ({"seccomp": "default"}, "seccomp: expected testhide, got default"),
        ({"read_only_root": False}, "read_only_root: expected true, got false"),
        ({"pids_limit": 0}, "pids_limit: expected 100, got 0 (unlimited)"),
        ({"memory_bytes": 1}, f"memory_bytes: expected {JOB.resources.memory_bytes}, got 1"),
        ({"cpus": 2.0}, "cpus: expected 1.5, got 2"),
        ({"image_id": "busybox"}, "image_id: expected sha256:<64 hex digits>, got busybox"),
        ({"runtime": "kata"}, "runtime: expected runc (or a gVisor registration), got kata"),
    ],
)
def test_each_fetch_field_that_differs_is_named(change: dict[str, Any], expected: str) -> None:
    assert fetch(replace(FETCH, **change)) == [f"fetch step: {expected}"]


@pytest.mark.parametrize(
    "mounts",
    [
        ("/cache (ro)", "/tmp (tmpfs)", "/workspace (ro)"),  # fine for the job step, not for the fetch step
        ("/cache (rw)", "/tmp (tmpfs)", "/workspace (rw)"),
        (
            "/cache (rw)",
            "/tmp (tmpfs)",
            "/var/run/docker.sock (rw, bind /var/run/docker.sock)",
            "/workspace (ro)",
        ),
    ],
)
def test_a_fetch_container_with_another_mount_fails(mounts: tuple[str, ...]) -> None:
    [found] = fetch_mismatches(JOB_ID, JOB, PoolPolicy(), replace(FETCH, mounts=mounts))
    assert (found.container, found.field, found.where) == ("fetch step", "mounts", "fetch step: mounts")
    assert found.expected == "only /cache (rw), /tmp (tmpfs), /workspace (ro)"


def test_the_reason_names_the_fetch_step() -> None:
    found = fetch_mismatches(JOB_ID, JOB, PoolPolicy(), replace(FETCH, network_mode="bridge"))
    assert mismatch_reason(found) == (
        "the job's containers are not isolated as the job and its pool require: fetch step:"
        f" network_mode: expected the job's internal network {NETWORK}, got bridge"
    )


# ------------------------------------------------------------- the services' containers


def test_services_as_the_agent_makes_them_pass() -> None:
    assert services(ServiceIsolation("db", SERVICE)) == []
    assert services(ServiceIsolation("db", replace(SERVICE, mounts=("/tmp (tmpfs)",)))) == []
    assert services(ServiceIsolation("db", SERVICE), job=None) == []  # the job's facts were not read
    assert services() == []  # an agent older than the services' facts


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"network_mode": "bridge"},
            f"network_mode: expected the job container's namespace ({HOLDER}), got bridge",
        ),
        (
            {"network_mode": "container:" + "cd" * 32},
            f"network_mode: expected the job container's namespace ({HOLDER}), got container:{'cd' * 32}",
        ),
        ({"interfaces": ("eth0", "lo")}, "interfaces: expected lo only, got eth0, lo"),
        ({"user": "root"}, "user: expected a numeric non-root uid[:gid], got root"),
        ({"cap_add": ("CHOWN",)}, "cap_add: expected none, got CHOWN"),
        ({"cap_drop": ("NET_RAW",)}, "cap_drop: expected ALL, got NET_RAW"),
        ({"no_new_privileges": False}, "no_new_privileges: expected true, got false"),
        ({"seccomp": "unconfined"}, "seccomp: expected testhide, got unconfined"),
        ({"read_only_root": False}, "read_only_root: expected true, got false"),
        ({"pids_limit": 2048}, "pids_limit: expected 100, got 2048"),
        ({"memory_bytes": 0}, f"memory_bytes: expected {JOB.resources.memory_bytes}, got 0 (unlimited)"),
        ({"cpus": 0.0}, "cpus: expected 1.5, got 0 (unlimited)"),
        ({"image_id": ""}, "image_id: expected sha256:<64 hex digits>, got (none)"),
        (
            {"mounts": ("/tmp (tmpfs)", "/var/lib/x (rw)")},
            "mounts: expected only /data (tmpfs), /tmp (tmpfs), got /var/lib/x (rw)",
        ),
    ],
)
def test_each_service_field_that_differs_is_named(change: dict[str, Any], expected: str) -> None:
    assert services(ServiceIsolation("db", replace(SERVICE, **change))) == [f"service db: {expected}"]


def test_a_service_must_share_a_holders_namespace_when_the_jobs_facts_are_missing() -> None:
    assert services(ServiceIsolation("db", replace(SERVICE, network_mode="none")), job=None) == [
        "service db: network_mode: expected container:<the services' holder>, got none"
    ]


def test_a_service_the_spec_does_not_name_fails() -> None:
    assert services(ServiceIsolation("db", SERVICE), ServiceIsolation("cache", SERVICE)) == [
        "service cache: name: expected one of the job's services (db), got cache"
    ]


def test_services_under_gvisor_pass() -> None:
    spec = replace(WITH_SERVICES, runtime="runsc")
    shared = replace(GVISOR, runtime="runsc-net", network_mode=HOLDER, mounts=("/tmp (tmpfs)",))
    found = service_mismatches(spec, PoolPolicy(), [ServiceIsolation("db", shared)], shared)
    assert found == []


# ------------------------------------------------------------- the job service


async def test_a_fetch_step_whose_container_is_on_another_network_ends_the_job_as_error() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    facts = replace(facts_for(SPEC), network_mode="bridge", interfaces=("eth0", "lo"), mounts=FETCH.mounts)

    await world.jobs.on_fetched(session, job.id, job.epoch, FetchStep("none", 0, 1.0, (), facts))

    ended = world.store.jobs[job.id]
    assert ended.status == JobStatus.ERROR
    assert (
        f"fetch step: network_mode: expected the job's internal network {job_network(job.id)}, got bridge"
        in ended.status_reason
    )
    assert ended.fetch is not None
    assert ended.fetch.isolation == facts  # stored all the same
    assert await session.outbox.get() == Cancel(job.id, ended.status_reason, abandon=True)
    assert audit.entries[0].event.details["fields"] == ["fetch step: network_mode"]


async def test_a_fetch_step_whose_container_holds_leaves_the_job_running() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    facts = replace(
        facts_for(SPEC), network_mode=job_network(job.id), interfaces=("eth0", "lo"), mounts=FETCH.mounts
    )

    await world.jobs.on_fetched(session, job.id, job.epoch, FetchStep("miss", 0, 1.0, (), facts))
    await world.jobs.on_fetched(session, job.id, job.epoch, FetchStep("hit", 0, 0.0))  # no container

    assert world.store.jobs[job.id].status == JobStatus.RUNNING
    assert len(session.outbox) == 0
    assert audit.actions() == []


async def test_a_started_report_with_a_loose_service_ends_the_job_as_error() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    spec = replace(SPEC, services=(ServiceSpec("db", "postgres:16"),))
    world.store.jobs[job.id] = replace(world.store.jobs[job.id], spec=spec)
    own = facts_for(SPEC, network_mode=HOLDER)
    loose = ServiceIsolation("db", replace(own, cap_add=("SYS_ADMIN",), mounts=("/tmp (tmpfs)",)))

    await world.jobs.on_started(session, job.id, job.epoch, own, (loose,))

    ended = world.store.jobs[job.id]
    assert ended.status == JobStatus.ERROR
    assert ended.status_reason == (
        "the job's containers are not isolated as the job and its pool require:"
        " service db: cap_add: expected none, got SYS_ADMIN"
    )
    assert ended.service_isolation == (loose,)
    assert audit.entries[0].event.details["fields"] == ["service db: cap_add"]


async def test_a_started_report_whose_services_hold_leaves_the_job_running() -> None:
    world, _ = audited_world()
    job, session = await world.running()
    spec = replace(SPEC, services=(ServiceSpec("db", "postgres:16"),))
    world.store.jobs[job.id] = replace(world.store.jobs[job.id], spec=spec)
    own = facts_for(SPEC, network_mode=HOLDER)
    db = ServiceIsolation("db", replace(own, mounts=("/tmp (tmpfs)",)))

    await world.jobs.on_started(session, job.id, job.epoch, own, (db,))

    stored = world.store.jobs[job.id]
    assert (stored.status, stored.service_isolation) == (JobStatus.RUNNING, (db,))
    assert len(session.outbox) == 0


def test_a_report_with_services_facts_alone_is_checked_before_a_later_result() -> None:
    facts = (ServiceIsolation("db", SERVICE),)
    started = JobReport("acme", "a1", "j1", 1, JobStatus.RUNNING, services=facts)
    result = JobReport("acme", "a1", "j1", 1, JobStatus.SUCCEEDED, exit_code=0, last_seq=0)
    assert checked_parts([started, result]) == [[started], [result]]


# ------------------------------------------------------------- on the wire and on screen


def test_the_facts_travel_from_agent_to_control_plane_to_the_cli() -> None:
    db = ServiceIsolation("db", SERVICE)
    started = report_to_pb(AgentJobStarted(JOB_ID, 3, JOB_FACTS, (db,)))
    session = AgentSession(AgentIdentity("td", "acme", "default", "a1"), 1, START + LEASE, "ca")
    report = report_of(session, started)
    assert (report.isolation, report.services) == (JOB_FACTS, (db,))
    fetched = report_to_pb(JobFetched(JOB_ID, 3, FetchStep("none", 0, 1.5, (), FETCH)))
    step = fetch_from_pb(fetched.fetched.fetch)
    assert step.isolation == FETCH

    job = Job(JOB_ID, "acme", WITH_SERVICES, JobStatus.RUNNING, START, fetch=step, service_isolation=(db,))
    shown = job_from_pb(job_to_pb(job))
    document = job_json(shown)
    assert document["fetch"]["isolation"]["network_mode"] == NETWORK
    assert document["fetch"]["isolation"]["mounts"] == ["/cache (rw)", "/tmp (tmpfs)", "/workspace (ro)"]
    assert [(s["name"], s["isolation"]["network_mode"]) for s in document["service_isolation"]] == [
        ("db", HOLDER)
    ]
    lines = job_details(shown)
    at = lines.index("fetch step isolation:")
    assert lines[at + 1] == f"  runtime runc, network {NETWORK} (interfaces: eth0, lo)"
    at = lines.index("service db isolation:")
    assert lines[at + 1] == f"  runtime runc, network {HOLDER} (interfaces: lo)"
    assert lines[at + 7] == "  mounts: /data (tmpfs), /tmp (tmpfs)"


def test_old_agents_report_no_facts_beside_the_jobs_own() -> None:
    started = agent_pb2.AgentMessage(started=agent_pb2.JobStarted(job_id=JOB_ID, epoch=3))
    session = AgentSession(AgentIdentity("td", "acme", "default", "a1"), 1, START + LEASE, "ca")
    assert report_of(session, started).services == ()
    assert fetch_from_pb(jobs_pb2.FetchStep(cache="none")).isolation is None
