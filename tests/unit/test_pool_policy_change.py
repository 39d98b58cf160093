"""What a pool's policy becomes after an administrator's change, and what is refused, checked
whole before anything is written (`operations/agents.py`); why a job of a paused pool waits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, PoolPolicy, PullPolicy
from testhide.controlplane.jobs.scheduler import Scheduler
from testhide.controlplane.operations.agents import PolicyChange, _changed, pool_cert_ttl
from tests.unit.fakes import MemoryJobs

LISTED = PoolPolicy(("registry.example.com/*",), PullPolicy.ALWAYS, "runsc")


def test_an_empty_change_keeps_everything_and_each_field_replaces_its_own() -> None:
    assert _changed(LISTED, PolicyChange()) == LISTED
    assert _changed(LISTED, PolicyChange(allowed_images=("a/*", "b/*"))).allowed_images == ("a/*", "b/*")
    assert _changed(LISTED, PolicyChange(any_image=True)).allowed_images == ()
    assert _changed(LISTED, PolicyChange(pull_policy="never")).pull_policy == PullPolicy.NEVER
    assert _changed(LISTED, PolicyChange(runtime="job")).runtime == ""
    assert _changed(PoolPolicy(), PolicyChange(runtime="runsc")).runtime == "runsc"
    assert _changed(PoolPolicy(paused=True), PolicyChange(runtime="runc")).paused  # not a policy change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (PolicyChange(any_image=True, allowed_images=("x/*",)), "not both"),
        (PolicyChange(pull_policy="sometimes"), "pull policy 'sometimes'"),
        (PolicyChange(runtime="kata"), "runtime 'kata'"),
        (PolicyChange(allowed_images=("",)), "pattern ''"),
        (PolicyChange(allowed_images=("a b",)), "pattern 'a b'"),
        (PolicyChange(allowed_images=("x\n",)), "pattern 'x\\\\n'"),
        (PolicyChange(allowed_images=("x" * 300,)), "(300 characters)"),
        (PolicyChange(allowed_images=tuple(f"p{i}/*" for i in range(65))), "at most 64"),
    ],
)
def test_a_change_that_makes_no_sense_is_refused_and_says_why(change: PolicyChange, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        _changed(LISTED, change)


def test_agent_certificate_lifetimes_stay_within_the_servers_bounds() -> None:
    assert pool_cert_ttl(timedelta(minutes=15)) == timedelta(minutes=15)
    for ttl in (timedelta(seconds=5), timedelta(hours=25)):
        with pytest.raises(InvalidArgument, match="between 10s and 24h"):
            pool_cert_ttl(ttl)


def test_a_job_of_a_paused_pool_says_so_before_anything_else() -> None:
    scheduler = Scheduler(MemoryJobs())
    job = Job(
        "j1", "acme", JobSpec(image="x", command=("true",), pool="gpu"), JobStatus.QUEUED, datetime.now(UTC)
    )
    assert scheduler.explain_queued(job, paused=True) == (
        "waiting: pool 'gpu' is paused by an administrator; nothing new is dispatched until it is resumed"
    )
    assert scheduler.explain_queued(job) == "waiting: no agent of pool 'gpu' is connected"
