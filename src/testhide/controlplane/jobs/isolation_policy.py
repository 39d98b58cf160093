"""What a job's container must look like, held against what its agent read back
from it (``common/isolation.py``): the control plane's check before the job may
run on. Pure: the job's spec, its pool's policy and the facts in, the fields
that differ out, each with what was expected and what was found.

What the agent's code applies, and so what must hold (``agent/runtime/hardening.py``,
``docker.py``, ``services.py``, ``steps.py``):

- runtime: the one asked for (the pool's, else the job's, else runc). gVisor
  where runc was asked is stronger and passes (an agent host configured to run
  every job under gVisor). Where runsc was asked, any gVisor registration
  passes: a job with services runs under the registration that shares the
  services' loopback, under a name the operator chose. The agent applies its
  gVisor-adapted seccomp profile only under a gVisor registration, so that
  profile is the evidence.
- network: "none"; with services "container:<holder>" (the namespace the job
  shares with its services alone). The job step of a job with a fetch step is
  offline as ever: only the fetch step's own container has a network. Inside,
  only ``lo`` (no interfaces = not observed: the job had already exited).
- a numeric non-root user, every capability dropped and none added, no new
  privileges, testhide's seccomp profile, a read-only root.
- the spec's memory and CPUs; its pids under runc. Under gVisor Docker's pids
  limit is the sandbox's host-thread budget (the job's own limit is RLIMIT_NPROC
  inside it), larger than the job's, computed from the agent host's pid_max: at
  least the job's, and set.
- mounts: /tmp (tmpfs), /workspace, and /cache read-only with a fetch step or a
  cache; anything else (the Docker socket above all) is refused.
- an image id, as Docker names images by content.

The fetch step's container (``fetch_mismatches``; ``agent/steps.py``) is the job's
container in all but three things: it is on the job's own internal network
(``common/fetch.py``'s ``job_network``: made ``--internal`` for the job alone, its only
other member the job's egress proxy), so inside it has ``lo`` and one interface more;
its runtime is the networked registration under gVisor (as services'); its mounts are
/tmp (tmpfs), /workspace read-only and /cache read-write.

Each service's container (``service_mismatches``; ``agent/runtime/services.py``) is
hardened as the job's, with the job's limits and user, in the namespace the job's
container joins (the same "container:<holder>" as the job's, only ``lo``); its
writable paths are tmpfs mounts (/tmp and those its spec names), its root read-only.

The holder of the services' namespace (``sleep``, network "none", under runc) and
the egress proxy are the agent's own containers, not reported: the holder runs
nothing of the job's, and what its network means is seen from inside the job's and
the services' containers (only ``lo``, one namespace); the proxy is meant to reach
out, and the fetch step reaching it and nothing else is what its own facts show.

The facts are the agent's word: this catches an agent (or an engine, or a
runtime) that did not apply what it should, not an agent that lies."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from testhide.common.fetch import job_network
from testhide.controlplane.jobs.model import Isolation, JobSpec, PoolPolicy, ServiceIsolation, ServiceSpec

RUNC = "runc"
RUNSC = "runsc"
SECCOMP = "testhide"
GVISOR_SECCOMP = "testhide-gvisor"
"""The profile the agent applies under a gVisor registration only (``agent/runtime/seccomp.py``)."""
SHARED_NAMESPACE = "container:"
_USER = re.compile(r"([0-9]+)(:[0-9]+)?")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
CPU_TOLERANCE = 1e-6
"""Docker keeps CPUs as an integer of nanoCPUs."""


FETCH_STEP = "fetch step"
LOOPBACK = "lo"


@dataclass(frozen=True)
class Mismatch:
    field: str
    expected: str
    actual: str
    container: str = ""
    """Which of the job's containers: "" for the job's own, "fetch step", "service NAME"."""

    @property
    def where(self) -> str:
        """The field, after the container it belongs to unless that is the job's own."""
        return f"{self.container}: {self.field}" if self.container else self.field

    def __str__(self) -> str:
        return f"{self.where}: expected {self.expected}, got {self.actual}"


def requested_runtime(spec: JobSpec, policy: PoolPolicy) -> str:
    """The runtime the job is assigned with: the pool's, else the job's, else runc."""
    return policy.runtime or spec.runtime or RUNC


def isolation_mismatches(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    """Every field of ``facts`` that breaks what the job and its pool require, in the
    order of ``Isolation``'s fields; empty when the container is as it must be."""
    checks: Sequence[Callable[[JobSpec, PoolPolicy, Isolation], list[Mismatch]]] = (
        _runtime,
        _network,
        _user,
        _capabilities,
        _privileges,
        _limits,
        _image,
        _mounts,
    )
    return [mismatch for check in checks for mismatch in check(spec, policy, facts)]


def mismatch_reason(mismatches: Sequence[Mismatch]) -> str:
    """The job's status reason: every differing field, one after the other."""
    shown = "; ".join(str(m) for m in mismatches)
    whose = (
        "the job's container is" if all(not m.container for m in mismatches) else "the job's containers are"
    )
    return f"{whose} not isolated as the job and its pool require: {shown}"


def under_gvisor(facts: Isolation) -> bool:
    return facts.runtime != RUNC and facts.seccomp == GVISOR_SECCOMP


def _runtime(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    requested = requested_runtime(spec, policy)
    if facts.runtime == requested or under_gvisor(facts):
        return []
    expected = f"{requested} (or a gVisor registration)" if requested == RUNC else f"{requested} (gVisor)"
    return [Mismatch("runtime", expected, facts.runtime or "(none)")]


def _network(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    found: list[Mismatch] = []
    if spec.services:
        if not facts.network_mode.startswith(SHARED_NAMESPACE):
            found.append(
                Mismatch("network_mode", "container:<the services' holder>", _shown(facts.network_mode))
            )
    elif facts.network_mode != "none":
        found.append(Mismatch("network_mode", "none", _shown(facts.network_mode)))
    if facts.interfaces not in ((), ("lo",)):
        found.append(Mismatch("interfaces", "lo only", ", ".join(facts.interfaces)))
    return found


def _user(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    match = _USER.fullmatch(facts.user)
    if match is not None and int(match.group(1)) != 0:
        return []
    return [Mismatch("user", "a numeric non-root uid[:gid]", _shown(facts.user))]


def _capabilities(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    found: list[Mismatch] = []
    if facts.cap_add:
        found.append(Mismatch("cap_add", "none", ", ".join(facts.cap_add)))
    if not any(cap.upper().removeprefix("CAP_") == "ALL" for cap in facts.cap_drop):
        found.append(Mismatch("cap_drop", "ALL", ", ".join(facts.cap_drop) or "(none)"))
    return found


def _privileges(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    found: list[Mismatch] = []
    if not facts.no_new_privileges:
        found.append(Mismatch("no_new_privileges", "true", "false"))
    # The gVisor-adapted profile allows what the sandbox needs: under runc it is the looser one.
    expected = SECCOMP if facts.runtime == RUNC else f"{SECCOMP} or {GVISOR_SECCOMP}"
    allowed = (SECCOMP,) if facts.runtime == RUNC else (SECCOMP, GVISOR_SECCOMP)
    if facts.seccomp not in allowed:
        found.append(Mismatch("seccomp", expected, _shown(facts.seccomp)))
    if not facts.read_only_root:
        found.append(Mismatch("read_only_root", "true", "false"))
    return found


def _limits(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    wanted = spec.resources
    found: list[Mismatch] = []
    if under_gvisor(facts):
        if facts.pids_limit < wanted.pids:
            expected = f"at least {wanted.pids} (under gVisor: the sandbox's host-thread budget)"
            found.append(Mismatch("pids_limit", expected, _limit(facts.pids_limit)))
    elif facts.pids_limit != wanted.pids:
        found.append(Mismatch("pids_limit", str(wanted.pids), _limit(facts.pids_limit)))
    if facts.memory_bytes != wanted.memory_bytes:
        found.append(Mismatch("memory_bytes", str(wanted.memory_bytes), _limit(facts.memory_bytes)))
    if abs(facts.cpus - wanted.cpus) > CPU_TOLERANCE:
        found.append(Mismatch("cpus", f"{wanted.cpus:g}", _limit(facts.cpus)))
    return found


def _image(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    if _IMAGE_ID.fullmatch(facts.image_id):
        return []
    return [Mismatch("image_id", "sha256:<64 hex digits>", _shown(facts.image_id))]


def allowed_mounts(spec: JobSpec) -> frozenset[str]:
    """The mounts (as ``isolation.py`` shows them) a job's container may have."""
    allowed = {"/tmp (tmpfs)", "/workspace (rw)", "/workspace (ro)", "/workspace (tmpfs)"}  # noqa: S108
    if spec.fetch or spec.cache:
        allowed.add("/cache (ro)")
    return frozenset(allowed)


def _mounts(spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    return _only_mounts(allowed_mounts(spec), facts)


def _shown(value: str) -> str:
    return value or "(none)"


def _limit(value: float) -> str:
    shown = str(value) if isinstance(value, int) else f"{value:g}"
    return shown if value > 0 else f"{shown} (unlimited)"


# ------------------------------------------------------------ the fetch step's container


FETCH_MOUNTS = frozenset({"/tmp (tmpfs)", "/workspace (ro)", "/cache (rw)"})  # noqa: S108


def fetch_mismatches(job_id: str, spec: JobSpec, policy: PoolPolicy, facts: Isolation) -> list[Mismatch]:
    """As ``isolation_mismatches``, for the fetch step's container of job ``job_id``."""
    checks: Sequence[Callable[[JobSpec, PoolPolicy, Isolation], list[Mismatch]]] = (
        _runtime,
        lambda spec, policy, facts: _fetch_network(job_id, facts),
        _user,
        _capabilities,
        _privileges,
        _limits,
        _image,
        lambda spec, policy, facts: _only_mounts(FETCH_MOUNTS, facts),
    )
    found = [mismatch for check in checks for mismatch in check(spec, policy, facts)]
    return [replace(m, container=FETCH_STEP) for m in found]


def _fetch_network(job_id: str, facts: Isolation) -> list[Mismatch]:
    found: list[Mismatch] = []
    network = job_network(job_id)
    if facts.network_mode != network:
        found.append(
            Mismatch("network_mode", f"the job's internal network {network}", _shown(facts.network_mode))
        )
    others = [name for name in facts.interfaces if name != LOOPBACK]
    if facts.interfaces and (LOOPBACK not in facts.interfaces or len(others) != 1):
        found.append(Mismatch("interfaces", "lo and one on the job's network", ", ".join(facts.interfaces)))
    return found


# ------------------------------------------------------------ the services' containers


def service_mismatches(
    spec: JobSpec, policy: PoolPolicy, services: Sequence[ServiceIsolation], job: Isolation | None
) -> list[Mismatch]:
    """As ``isolation_mismatches``, for each service's container (``job``: the job's own
    container's facts, whose namespace the services must share; None if not read). A
    service whose facts are missing (not read) is not checked; one the spec does not
    name is a mismatch."""
    wanted = {service.name: service for service in spec.services}
    found: list[Mismatch] = []
    for reported in services:
        container = f"service {reported.name}"
        service = wanted.get(reported.name)
        if service is None:
            names = ", ".join(wanted) or "none"
            found.append(Mismatch("name", f"one of the job's services ({names})", reported.name, container))
            continue
        found += [
            replace(m, container=container) for m in _service(spec, policy, service, reported.isolation, job)
        ]
    return found


def _service(
    spec: JobSpec, policy: PoolPolicy, service: ServiceSpec, facts: Isolation, job: Isolation | None
) -> list[Mismatch]:
    mounts = frozenset({"/tmp (tmpfs)", *(f"{path} (tmpfs)" for path in service.tmpfs)})  # noqa: S108
    checks: Sequence[Callable[[JobSpec, PoolPolicy, Isolation], list[Mismatch]]] = (
        _runtime,
        lambda spec, policy, facts: _service_network(facts, job),
        _user,
        _capabilities,
        _privileges,
        _limits,
        _image,
        lambda spec, policy, facts: _only_mounts(mounts, facts),
    )
    return [mismatch for check in checks for mismatch in check(spec, policy, facts)]


def _service_network(facts: Isolation, job: Isolation | None) -> list[Mismatch]:
    found: list[Mismatch] = []
    shared = job.network_mode if job is not None and job.network_mode.startswith(SHARED_NAMESPACE) else ""
    if shared and facts.network_mode != shared:
        found.append(
            Mismatch("network_mode", f"the job container's namespace ({shared})", _shown(facts.network_mode))
        )
    elif not facts.network_mode.startswith(SHARED_NAMESPACE):
        found.append(Mismatch("network_mode", "container:<the services' holder>", _shown(facts.network_mode)))
    if facts.interfaces not in ((), (LOOPBACK,)):
        found.append(Mismatch("interfaces", "lo only", ", ".join(facts.interfaces)))
    return found


def _only_mounts(allowed: frozenset[str], facts: Isolation) -> list[Mismatch]:
    unexpected = [m for m in facts.mounts if m not in allowed]
    if not unexpected:
        return []
    return [Mismatch("mounts", "only " + ", ".join(sorted(allowed)), ", ".join(unexpected))]
