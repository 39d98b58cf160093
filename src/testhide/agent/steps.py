"""What runs before a job's own container: its services, and its fetch step.

The fetch step is the only part of a job that reaches a network: ``sh -c FETCH``
in its own container from the job's image, hardened like the job, with the
workspace read-only, /cache writable, and one route, to the job's egress proxy
(``egress/``), which lets through only the hosts the pool allows and records
every request. What Docker applied to that container is read back right after
its start and reported with the step (``FetchStep.isolation``). Its output goes
into the job's log between two marker lines.
Then the job step runs offline as ever, /cache read-only. With ``--cache KEY``,
/cache is the agent's cache for the org, pool and key (``caches.py``): a hit
restores it and skips the fetch step; a miss that the fetch step fills is kept.

Services start before the job step in a namespace of their own that the job
container joins (``runtime/services.py``): only ``lo``, shared by the job and
its services alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from testhide.agent.errors import JobSetupError
from testhide.agent.model import Assignment, FetchStep, Isolation, LogStream, Outcome
from testhide.agent.runtime.base import ContainerSpec, OutputQueue, RunningServices, VolumeMount

if TYPE_CHECKING:
    from testhide.agent.caches import CacheLease, Caches
    from testhide.agent.egress import EgressProxies

CACHE_MOUNT = "/cache"
# A job without --cache gets a /cache of its own, filled by its fetch step and removed with it.
SCRATCH_KEY_PREFIX = "job."


class StepEnded(Exception):
    """The job ended before its job step: the fetch step failed, timed out or was canceled."""

    def __init__(self, outcome: Outcome, exit_code: int, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.exit_code = exit_code
        self.reason = reason


@dataclass(frozen=True)
class JobFacilities:
    """What fetch steps use beside the container runtime (Docker's only)."""

    egress: EgressProxies
    caches: Caches
    org_and_pool: Callable[[], tuple[str, str]]
    """This agent's organisation and pool, from its certificate."""


@dataclass
class BeforeJob:
    """What the job step takes from the steps before it, and what is cleaned up after."""

    workspace: str | None = None
    """Made for the fetch step; the job step's container takes it over (then None)."""
    lease: CacheLease | None = None
    kept: bool = False
    services: RunningServices | None = None


Supervise = Callable[
    [ContainerSpec, OutputQueue, Callable[[Isolation | None], None]],
    Awaitable[tuple[Outcome, int, str, Isolation | None]],
]
"""Run a container of the job to its end, its output into the job's log, within
what is left of the job's timeout: (outcome, exit code, reason, and what Docker
applied to it, read back right after its start, when it is also given to the
callback; None if that could not be read)."""
Note = Callable[[str], Awaitable[None]]
"""Write a line of testhide's own into the job's log."""


def check_fetch(job: Assignment, facilities: JobFacilities | None) -> None:
    """Refusals that need nothing started."""
    if facilities is None:
        raise JobSetupError("this agent cannot run fetch steps (its container runtime is not Docker)")
    if not job.egress_allow:
        raise JobSetupError(
            "the pool allows no egress, so the fetch step has nowhere to fetch from: an operator allows hosts"
            " with 'testhide-controlplane pools set POOL --egress-allow HOST[:PORT]'"
        )


async def run_fetch_step(
    job: Assignment,
    spec: ContainerSpec,
    before: BeforeJob,
    facilities: JobFacilities,
    supervise: Supervise,
    note: Note,
    runtime_for_network: Callable[[str], Awaitable[str]],
    report: Callable[[FetchStep], None],
) -> ContainerSpec:
    """The fetch step (or its cache restored), reported with ``report`` however it
    ended, then the job step's spec: the workspace the fetch step saw, and /cache
    read-only. ``StepEnded`` if the job ends here."""
    org, pool = facilities.org_and_pool()
    before.lease = lease = await facilities.caches.acquire(
        org, pool, job.cache or SCRATCH_KEY_PREFIX + job.job_id
    )
    job_step = replace(
        spec,
        workspace_name=before.workspace,
        volumes=(*spec.volumes, VolumeMount(lease.volume, CACHE_MOUNT, read_only=True)),
    )
    if lease.hit:
        await note(f"cache {job.cache} restored on this agent: fetch step skipped")
        report(FetchStep("hit", 0, 0.0))
        return job_step
    fetch_runtime = await runtime_for_network(spec.runtime)
    started = time.monotonic()
    session = await facilities.egress.open(job.job_id, job.egress_allow)
    try:
        fetch_spec = replace(
            spec,
            name=f"testhide-fetch-{job.job_id}",
            command=("sh", "-c", job.fetch),
            env={**job.env, **job.fetch_secret_env, **session.proxy_env()},
            network=session.network,
            runtime=fetch_runtime,
            workspace_name=before.workspace,
            workspace_read_only=True,
            volumes=(*spec.volumes, VolumeMount(lease.volume, CACHE_MOUNT, read_only=False)),
        )
        await note(f"fetch step: sh -c {job.fetch!r} (egress allowed to: {', '.join(job.egress_allow)})")
        cache = "miss" if job.cache else "none"

        def facts_read(isolation: Isolation | None) -> None:
            # Checked by the control plane while the step runs: a mismatch stops its container.
            report(FetchStep(cache, 0, 0.0, isolation=isolation, running=True))

        outcome, exit_code, reason, isolation = await supervise(fetch_spec, OutputQueue(), facts_read)
        requests = tuple(await session.finish())
    finally:
        await session.close()
    duration_s = time.monotonic() - started
    report(FetchStep(cache, exit_code, duration_s, requests, isolation))
    refused = sum(1 for r in requests if not r.allowed)
    await note(
        f"fetch step ended with exit code {exit_code} after {duration_s:.1f} s:"
        f" {len(requests)} request(s) through the egress proxy, {refused} refused"
    )
    if outcome != Outcome.EXITED:
        raise StepEnded(outcome, exit_code, f"{reason} (in the fetch step)")
    if exit_code != 0:
        raise StepEnded(Outcome.EXITED, exit_code, f"the fetch step failed with exit code {exit_code}")
    if job.cache:
        before.kept = True
        kept_note = await facilities.caches.keep(lease)
        if kept_note:
            await note(kept_note)
    return job_step


async def clean_up(
    before: BeforeJob, facilities: JobFacilities | None, remove_workspace: Callable[[str], Awaitable[None]]
) -> None:
    """Services stopped and removed, the cache lease released, a workspace no job step
    took removed: to the end even when the job's task is canceled (the agent stopping),
    which then still ends canceled."""
    steps: list[Callable[[], Awaitable[None]]] = []
    if (services := before.services) is not None:
        steps.append(services.remove)
    if (lease := before.lease) is not None and facilities is not None:
        steps.append(lambda: facilities.caches.release(lease, kept=before.kept))
    if (workspace := before.workspace) is not None:
        steps.append(lambda: remove_workspace(workspace))
    canceled = False
    for step in steps:
        try:
            await to_the_end(step())
        except asyncio.CancelledError:
            canceled = True
    if canceled:
        raise asyncio.CancelledError


async def to_the_end(cleanup: Awaitable[None]) -> None:
    """Await ``cleanup`` to its end even if the caller is canceled meanwhile (a shield
    alone would let the caller go on, and the event loop end, while it still runs)."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def system_line(text: str) -> list[tuple[LogStream, bytes]]:
    return [(LogStream.SYSTEM, f"testhide: {text}\n".encode())]
