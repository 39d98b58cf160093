"""The control plane's check of what an agent read back from a job's container
(controlplane/jobs/isolation_policy.py), field by field, passing and failing;
and what the job service does with a started report whose facts fail it
(jobs/isolation_guard.py): the job ends ERROR naming the fields, its agent is
told to stop it, the audit chain records it, the facts stay with the job."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from testhide.agent.runtime.isolation import mounts_of
from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.jobs.isolation_guard import checked_parts
from testhide.controlplane.jobs.isolation_policy import (
    Mismatch,
    isolation_mismatches,
    mismatch_reason,
    requested_runtime,
)
from testhide.controlplane.jobs.model import (
    Isolation,
    JobReport,
    JobSpec,
    JobStatus,
    PoolPolicy,
    Resources,
    ServiceSpec,
)
from testhide.controlplane.jobs.scheduler import Cancel, ResultAck
from tests.unit.fakes import MemoryAudit
from tests.unit.test_job_service import SPEC, World

IMAGE_ID = "sha256:" + "c3d7" * 16
MIB = 1024 * 1024
RESOURCES = Resources(cpus=1.5, memory_bytes=256 * MIB, pids=100)
JOB = JobSpec(image="busybox:1.36", command=("true",), resources=RESOURCES)
GOOD = Isolation(
    runtime="runc",
    network_mode="none",
    interfaces=("lo",),
    user="65534:65534",
    cap_add=(),
    cap_drop=("ALL",),
    no_new_privileges=True,
    seccomp="testhide",
    read_only_root=True,
    pids_limit=100,
    memory_bytes=256 * MIB,
    cpus=1.5,
    image_id=IMAGE_ID,
    image_digest="",
    mounts=("/tmp (tmpfs)", "/workspace (rw)"),
)
GVISOR = replace(GOOD, runtime="runsc", seccomp="testhide-gvisor", pids_limit=9792)


def mismatches(facts: Isolation, spec: JobSpec = JOB, policy: PoolPolicy | None = None) -> list[str]:
    return [str(m) for m in isolation_mismatches(spec, policy or PoolPolicy(), facts)]


def test_a_container_as_the_agent_makes_it_passes() -> None:
    assert mismatches(GOOD) == []
    assert mismatches(replace(GOOD, mounts=("/tmp (tmpfs)", "/workspace (tmpfs)"))) == []


def test_interfaces_not_observed_pass() -> None:
    # The job had exited before they were read, or the agent's /proc is not the engine host's.
    assert mismatches(replace(GOOD, interfaces=())) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"network_mode": "bridge"}, ["network_mode: expected none, got bridge"]),
        ({"network_mode": ""}, ["network_mode: expected none, got (none)"]),
        (
            {"network_mode": "host", "interfaces": ("eth0", "lo")},
            [
                "network_mode: expected none, got host",
                "interfaces: expected lo only, got eth0, lo",
            ],
        ),
        ({"interfaces": ("eth0", "lo")}, ["interfaces: expected lo only, got eth0, lo"]),
        ({"user": "0:0"}, ["user: expected a numeric non-root uid[:gid], got 0:0"]),
        ({"user": "root"}, ["user: expected a numeric non-root uid[:gid], got root"]),
        ({"user": ""}, ["user: expected a numeric non-root uid[:gid], got (none)"]),
        ({"user": "00"}, ["user: expected a numeric non-root uid[:gid], got 00"]),
        ({"cap_add": ("NET_ADMIN", "SYS_ADMIN")}, ["cap_add: expected none, got NET_ADMIN, SYS_ADMIN"]),
        ({"cap_drop": ()}, ["cap_drop: expected ALL, got (none)"]),
        ({"cap_drop": ("NET_RAW",)}, ["cap_drop: expected ALL, got NET_RAW"]),
        ({"no_new_privileges": False}, ["no_new_privileges: expected true, got false"]),
        ({"seccomp": "unconfined"}, ["seccomp: expected testhide, got unconfined"]),
        ({"seccomp": "default"}, ["seccomp: expected testhide, got default"]),
        (
            {"seccomp": "custom:sha256:0123456789ab"},
            ["seccomp: expected testhide, got custom:sha256:0123456789ab"],
        ),
        # The profile adapted for gVisor lets through what the sandbox needs: under runc it is too loose.
        ({"seccomp": "testhide-gvisor"}, ["seccomp: expected testhide, got testhide-gvisor"]),
        ({"read_only_root": False}, ["read_only_root: expected true, got false"]),
        ({"pids_limit": 0}, ["pids_limit: expected 100, got 0 (unlimited)"]),
        ({"pids_limit": 2048}, ["pids_limit: expected 100, got 2048"]),
        ({"memory_bytes": 0}, ["memory_bytes: expected 268435456, got 0 (unlimited)"]),
        ({"memory_bytes": 512 * MIB}, ["memory_bytes: expected 268435456, got 536870912"]),
        ({"cpus": 2.0}, ["cpus: expected 1.5, got 2"]),
        ({"cpus": 0.0}, ["cpus: expected 1.5, got 0 (unlimited)"]),
        ({"image_id": ""}, ["image_id: expected sha256:<64 hex digits>, got (none)"]),
        ({"image_id": "sha256:c3d7"}, ["image_id: expected sha256:<64 hex digits>, got sha256:c3d7"]),
        ({"runtime": "kata"}, ["runtime: expected runc (or a gVisor registration), got kata"]),
        ({"runtime": ""}, ["runtime: expected runc (or a gVisor registration), got (none)"]),
    ],
)
def test_each_field_that_differs_is_named_with_what_was_expected(
    change: dict[str, Any], expected: list[str]
) -> None:
    assert mismatches(replace(GOOD, **change)) == expected


@pytest.mark.parametrize(
    "mounts",
    [
        ("/tmp (tmpfs)", "/var/run/docker.sock (rw)", "/workspace (rw)"),
        ("/run/docker.sock (ro)", "/tmp (tmpfs)"),
        ("/tmp (tmpfs)", "/workspace (rw)", "/workspace/docker.sock (rw)"),
        ("/cache (ro)", "/tmp (tmpfs)", "/workspace (rw)"),  # no fetch step, no cache: no /cache
        ("/cache (rw)", "/tmp (tmpfs)", "/workspace (rw)"),
    ],
)
def test_a_mount_the_agent_never_makes_is_refused(mounts: tuple[str, ...]) -> None:
    found = isolation_mismatches(JOB, PoolPolicy(), replace(GOOD, mounts=mounts))
    assert [m.field for m in found] == ["mounts"]
    assert set(found[0].actual.split(", ")) == set(mounts) - {"/tmp (tmpfs)", "/workspace (rw)"}


def test_a_job_with_a_fetch_step_or_a_cache_has_a_read_only_cache() -> None:
    mounts = ("/cache (ro)", "/tmp (tmpfs)", "/workspace (rw)")
    for spec in (replace(JOB, fetch="make deps"), replace(JOB, fetch="make deps", cache="deps-1")):
        assert mismatches(replace(GOOD, mounts=mounts), spec) == []
        assert mismatches(replace(GOOD, mounts=("/cache (rw)", "/tmp (tmpfs)")), spec) == [
            "mounts: expected only /cache (ro), /tmp (tmpfs), /workspace (ro), /workspace (rw),"
            " /workspace (tmpfs), got /cache (rw)"
        ]


def test_the_job_step_after_a_fetch_step_has_no_network_either() -> None:
    spec = replace(JOB, fetch="make deps")
    assert mismatches(replace(GOOD, network_mode="testhide-fetch-j1"), spec) == [
        "network_mode: expected none, got testhide-fetch-j1"
    ]


def test_a_job_with_services_shares_their_holders_namespace_and_only_lo() -> None:
    spec = replace(JOB, services=(ServiceSpec("db", "postgres:16"),))
    shared = replace(GOOD, network_mode="container:" + "ab" * 32)
    assert mismatches(shared, spec) == []
    assert mismatches(replace(GOOD, network_mode="none"), spec) == [
        "network_mode: expected container:<the services' holder>, got none"
    ]
    assert mismatches(replace(shared, interfaces=("eth0", "lo")), spec) == [
        "interfaces: expected lo only, got eth0, lo"
    ]
    assert mismatches(shared) == [f"network_mode: expected none, got {shared.network_mode}"]  # no services


def test_the_runtime_is_the_pools_else_the_jobs_else_runc() -> None:
    assert requested_runtime(JOB, PoolPolicy()) == "runc"
    assert requested_runtime(replace(JOB, runtime="runsc"), PoolPolicy()) == "runsc"
    assert requested_runtime(replace(JOB, runtime="runc"), PoolPolicy(runtime="runsc")) == "runsc"
    assert mismatches(GOOD, policy=PoolPolicy(runtime="runsc")) == [
        "runtime: expected runsc (gVisor), got runc"
    ]
    assert mismatches(GOOD, replace(JOB, runtime="runsc")) == ["runtime: expected runsc (gVisor), got runc"]


def test_under_gvisor_the_pids_limit_is_the_sandboxs_budget() -> None:
    spec = replace(JOB, runtime="runsc")
    assert mismatches(GVISOR, spec) == []
    assert mismatches(replace(GVISOR, pids_limit=100), spec) == []
    assert mismatches(replace(GVISOR, pids_limit=99), spec) == [
        "pids_limit: expected at least 100 (under gVisor: the sandbox's host-thread budget), got 99"
    ]
    assert mismatches(replace(GVISOR, pids_limit=0), spec)[0].endswith("got 0 (unlimited)")
    # gVisor is the runtime's word only with the gVisor profile: runc with a large limit fails.
    assert mismatches(replace(GOOD, pids_limit=9792)) == ["pids_limit: expected 100, got 9792"]


def test_gvisor_where_runc_was_asked_is_stronger_and_passes() -> None:
    # An agent host configured to run every job under gVisor (AgentConfig.runtime).
    assert mismatches(GVISOR) == []
    assert mismatches(replace(GVISOR, runtime="runsc-everything")) == []


def test_where_runsc_was_asked_any_gvisor_registration_passes_and_nothing_else() -> None:
    # With services, the job runs under the registration that shares their loopback.
    spec = replace(JOB, runtime="runsc", services=(ServiceSpec("db", "postgres:16"),))
    shared = replace(GVISOR, runtime="runsc-net-4242", network_mode="container:" + "ab" * 32)
    assert mismatches(shared, spec) == []
    assert mismatches(replace(shared, seccomp="testhide"), spec) == [
        "runtime: expected runsc (gVisor), got runsc-net-4242",
        "pids_limit: expected 100, got 9792",  # not gVisor: the job's own limit, exactly
    ]
    assert mismatches(replace(GOOD, runtime="kata"), replace(JOB, runtime="runsc")) == [
        "runtime: expected runsc (gVisor), got kata"
    ]


def test_every_differing_field_is_in_the_reason_in_order() -> None:
    loose = replace(GOOD, network_mode="bridge", interfaces=("eth0", "lo"), cap_add=("NET_RAW",))
    found = isolation_mismatches(JOB, PoolPolicy(), loose)
    assert [m.field for m in found] == ["network_mode", "interfaces", "cap_add"]
    assert mismatch_reason(found) == (
        "the job's container is not isolated as the job and its pool require: network_mode: expected"
        " none, got bridge; interfaces: expected lo only, got eth0, lo; cap_add: expected none, got NET_RAW"
    )
    assert str(Mismatch("f", "a", "b")) == "f: expected a, got b"


# ------------------------------------------------------------- the job service


def audited_world() -> tuple[World, MemoryAudit]:
    audit = MemoryAudit()
    world = World()
    world.jobs._isolation._auditor = Auditor(audit, b"k" * 32)
    return world, audit


def facts_for(spec: JobSpec, **change: Any) -> Isolation:
    r = spec.resources
    return replace(GOOD, pids_limit=r.pids, memory_bytes=r.memory_bytes, cpus=r.cpus, **change)


async def test_a_started_report_whose_facts_fail_ends_the_job_as_error_and_stops_it() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    facts = facts_for(SPEC, network_mode="testhide-net", interfaces=("eth0", "lo"))

    with capture_logs() as events:
        await world.jobs.on_started(session, job.id, job.epoch, facts)

    ended = world.store.jobs[job.id]
    assert ended.status == JobStatus.ERROR
    assert ended.status_reason.startswith("the job's container is not isolated")
    assert "network_mode: expected none, got testhide-net" in ended.status_reason
    assert "interfaces: expected lo only, got eth0, lo" in ended.status_reason
    assert ended.isolation == facts  # stored all the same
    assert await session.outbox.get() == Cancel(job.id, ended.status_reason, abandon=True)
    assert job.id not in session.jobs
    assert audit.actions() == ["job_isolation_mismatch"]
    entry = audit.entries[0].event
    assert (entry.actor, entry.org, entry.target) == ("agent:a1", "acme", job.id)
    assert entry.details["fields"] == ["network_mode", "interfaces"]
    [logged] = [e for e in events if e["event"] == "job_isolation_mismatch"]
    assert (logged["job_id"], logged["agent_id"], logged["fields"]) == (
        job.id,
        "a1",
        ["network_mode", "interfaces"],
    )


async def test_a_started_report_whose_facts_hold_leaves_the_job_running() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    facts = facts_for(SPEC)

    await world.jobs.on_started(session, job.id, job.epoch, facts)

    stored = world.store.jobs[job.id]
    assert (stored.status, stored.isolation) == (JobStatus.RUNNING, facts)
    assert len(session.outbox) == 0
    assert job.id in session.jobs
    assert audit.actions() == []


async def test_a_job_that_ended_in_the_same_batch_as_its_start_still_ends_as_error() -> None:
    world, _ = audited_world()
    job, session = await world.running()
    facts = facts_for(SPEC, cap_add=("SYS_ADMIN",))
    now_running = JobReport("acme", "a1", job.id, job.epoch, JobStatus.RUNNING, isolation=facts)
    result = JobReport("acme", "a1", job.id, job.epoch, JobStatus.SUCCEEDED, exit_code=0, last_seq=0)

    refusals = await world.jobs.on_reports(session, [now_running, result])

    assert refusals == [None, None]
    ended = world.store.jobs[job.id]
    assert (ended.status, ended.exit_code) == (JobStatus.ERROR, None)
    assert "cap_add: expected none, got SYS_ADMIN" in ended.status_reason
    sent = [await session.outbox.get() for _ in range(len(session.outbox))]
    assert sent == [Cancel(job.id, ended.status_reason, abandon=True), ResultAck(job.id)]


async def test_facts_of_a_job_that_has_ended_are_stored_and_stop_nothing() -> None:
    world, audit = audited_world()
    job, session = await world.running()
    await world.store.set_job_status("acme", job.id, job.epoch, JobStatus.CANCELED, datetime.now(UTC))
    session.jobs.discard(job.id)

    await world.jobs.on_started(session, job.id, job.epoch, facts_for(SPEC, user="0"))

    assert world.store.jobs[job.id].status == JobStatus.CANCELED
    assert len(session.outbox) == 0
    assert audit.actions() == []


async def test_the_pools_runtime_binds_a_job_that_asked_for_none() -> None:
    world = World(PoolPolicy(runtime="runsc"))
    job, session = await world.running()

    await world.jobs.on_started(session, job.id, job.epoch, facts_for(SPEC))

    ended = world.store.jobs[job.id]
    assert ended.status == JobStatus.ERROR
    assert "runtime: expected runsc (gVisor), got runc" in ended.status_reason


async def test_a_job_whose_pool_was_removed_is_held_to_its_own_spec() -> None:
    world, _ = audited_world()
    job, session = await world.running()
    world.store.policies.clear()

    await world.jobs.on_started(session, job.id, job.epoch, facts_for(SPEC))
    assert world.store.jobs[job.id].status == JobStatus.RUNNING
    await world.jobs.on_started(session, job.id, job.epoch, facts_for(SPEC, read_only_root=False))
    assert "read_only_root: expected true, got false" in world.store.jobs[job.id].status_reason


def test_a_start_with_facts_is_written_apart_only_from_a_later_report_of_its_own_job() -> None:
    def running(job_id: str, facts: Isolation | None = GOOD) -> JobReport:
        return JobReport("acme", "a1", job_id, 1, JobStatus.RUNNING, isolation=facts)

    def result(job_id: str) -> JobReport:
        return JobReport("acme", "a1", job_id, 1, JobStatus.SUCCEEDED, exit_code=0, last_seq=0)

    assert checked_parts([]) == []
    assert checked_parts([running("j1"), running("j2"), result("j3")]) == [
        [running("j1"), running("j2"), result("j3")]
    ]
    assert checked_parts([running("j1"), running("j2", None), result("j2"), result("j1")]) == [
        [running("j1")],
        [running("j2", None), result("j2"), result("j1")],
    ]


def test_a_bind_mount_is_read_back_with_its_host_path_and_refused() -> None:
    container = {
        "HostConfig": {"Tmpfs": {"/tmp": "rw"}},
        "Mounts": [
            {
                "Type": "volume",
                "Destination": "/workspace",
                "RW": True,
                "Source": "/var/lib/docker/volumes/x",
            },
            {"Type": "bind", "Destination": "/workspace", "RW": True, "Source": "/"},
            {"Type": "bind", "Destination": "/run/s", "RW": False, "Source": "/var/run/docker.sock"},
        ],
    }
    mounts = mounts_of(container)
    assert mounts == (
        "/run/s (ro, bind /var/run/docker.sock)",
        "/tmp (tmpfs)",
        "/workspace (rw)",
        "/workspace (rw, bind /)",
    )
    assert mismatches(replace(GOOD, mounts=mounts)) == [
        "mounts: expected only /tmp (tmpfs), /workspace (ro), /workspace (rw), /workspace (tmpfs),"
        " got /run/s (ro, bind /var/run/docker.sock), /workspace (rw, bind /)"
    ]
