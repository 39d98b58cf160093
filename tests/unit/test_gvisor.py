"""gVisor specifics without Docker: the sandbox's pids budget, spotting its own
panic in a job's stderr, the job's outcome when it died, and which runtimes an
agent offers (each checked once, and only those enforcing seccomp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from testhide.agent.model import Outcome
from testhide.agent.runtime import offer
from testhide.agent.runtime.fake import Script
from testhide.agent.runtime.gvisor import SandboxPanicWatch, failure_reason, sandbox_pids_limit
from testhide.agent.runtime.offer import ProbeResult, Registration, offered_runtimes, registrations
from tests.unit.test_executor import Harness, job

SENTRY_PANIC = (
    b"panic: error initializing first thread: resource temporarily unavailable\n\n"
    b"goroutine 15 [running]:\n"
    b"gvisor.dev/gvisor/pkg/sentry/platform/ptrace.newSubprocess.func1()\n"
    b"\tgvisor.dev/gvisor/pkg/sentry/platform/ptrace/subprocess.go:192 +0x285\n"
)


def test_the_sandbox_budget_is_sized_for_its_host_threads() -> None:
    assert sandbox_pids_limit(2048, None) == 8192 + 16 * 2048 == 40960
    assert sandbox_pids_limit(64, 4_194_304) == 8192 + 16 * 64
    assert sandbox_pids_limit(2048, 32768) == 16384  # never more than half the host's PIDs


def watch(*chunks: bytes) -> str:
    panic_watch = SandboxPanicWatch()
    for chunk in chunks:
        panic_watch.feed(chunk)
    return panic_watch.failure


def test_the_sentrys_panic_is_recognised_even_split_across_reads() -> None:
    expected = "panic: error initializing first thread: resource temporarily unavailable"
    assert watch(b"job output\n" + SENTRY_PANIC) == expected
    for cut in (3, 20, 80, 100, 130):
        assert watch(b"x" * 5000 + b"\n", SENTRY_PANIC[:cut], SENTRY_PANIC[cut:]) == expected, cut
    assert watch(*(bytes([b]) for b in SENTRY_PANIC)) == expected


@pytest.mark.parametrize(
    "stderr",
    [
        b"panic: boom\n\ngoroutine 1 [running]:\nmain.main()\n\t/src/main.go:5 +0x1d\nexit status 2\n",
        b"see gvisor.dev/gvisor/ for docs\npanic: mine\n",  # a frame before the line does not count
        b"log: panic: error initializing first thread\n\tgvisor.dev/gvisor/x.go\n",  # not at a line start
        b"",
    ],
)
def test_a_jobs_own_panic_is_not_the_sandboxs(stderr: bytes) -> None:
    assert watch(stderr) == ""


def test_the_reason_says_when_the_sandbox_ran_out_of_host_threads() -> None:
    hint = " (it ran out of host threads; see the pids limit under gVisor in the README)"
    for line in (
        "panic: error initializing first thread: resource temporarily unavailable",
        "fatal error: newosproc",
    ):
        assert failure_reason(line) == f"the gVisor sandbox failed: {line}{hint}"
    assert failure_reason("panic: something else") == "the gVisor sandbox failed: panic: something else"


async def test_a_failed_sandbox_ends_the_job_error_not_with_its_exit_code(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.runtime.scripts["j1"] = Script(
        exit_code=2, runtime_failure="the gVisor sandbox failed: panic: error initializing first thread"
    )
    await h.run(job())
    result = h.result()
    assert (result.outcome, result.exit_code) == (Outcome.ERROR, -1)
    assert result.reason == "the gVisor sandbox failed: panic: error initializing first thread"


# Which runtimes are offered -------------------------------------------------------------------------------

INFO: dict[str, Any] = {
    "ID": "engine-1",
    "DefaultRuntime": "runc",
    "SecurityOptions": ["name=seccomp,profile=default"],
    "Runtimes": {
        "runc": {"path": "runc"},
        "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--oci-seccomp"]},
        "gvisor-old": {"path": "/usr/local/bin/runsc", "runtimeArgs": ["--network=none"]},
    },
}


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for the probe container: seccomp is enforced where --oci-seccomp is."""
    monkeypatch.setattr(offer, "_results", {})
    # A logger of its own: one cached before (another test configured logging) bypasses capture_logs.
    monkeypatch.setattr(offer, "log", structlog.get_logger("testhide.agent.runtimes"))
    probed: list[str] = []

    def probe(client: object, registration: Registration, image: str) -> ProbeResult:
        probed.append(registration.name)
        if "--oci-seccomp" in registration.args:
            return ProbeResult(True, "Seccomp: 2; unshare: refused", 0.5)
        return ProbeResult(False, "Seccomp: 0; unshare: allowed", 0.5)

    monkeypatch.setattr(offer, "probe", probe)
    return probed


def test_only_runtimes_enforcing_seccomp_are_offered_whatever_their_name(probes: list[str]) -> None:
    with capture_logs() as events:
        offered = offered_runtimes(object(), INFO, registrations(INFO), "probe:1")  # type: ignore[arg-type]
    assert offered == ["runc", "runsc"]
    assert sorted(probes) == ["gvisor-old", "runsc"]  # the engine's default is not probed
    [refused] = [e for e in events if e["event"] == "runtime_not_offered"]
    assert refused["runtime"] == "gvisor-old"
    assert "Seccomp: 0" in refused["reason"]
    assert (
        '"runtimeArgs": ["--network=none", "--oci-seccomp", "--panic-log=/proc/self/fd/2"' in refused["fix"]
    )
    assert '"path": "/usr/local/bin/runsc"' in refused["fix"]
    assert "kill -HUP" in refused["fix"]


def test_each_registration_is_probed_once_per_process(probes: list[str]) -> None:
    offered_runtimes(object(), INFO, registrations(INFO), "probe:1")  # type: ignore[arg-type]
    offered_runtimes(object(), INFO, registrations(INFO), "probe:1")  # type: ignore[arg-type]
    assert sorted(probes) == ["gvisor-old", "runsc"]
    fixed = {**INFO, "Runtimes": {**INFO["Runtimes"], "gvisor-old": INFO["Runtimes"]["runsc"]}}
    assert offered_runtimes(object(), fixed, registrations(fixed), "probe:1") == [  # type: ignore[arg-type]
        "gvisor-old",
        "runc",
        "runsc",
    ]
    assert sorted(probes) == ["gvisor-old", "gvisor-old", "runsc"]  # registered anew: probed anew


def test_an_engine_without_seccomp_offers_nothing(probes: list[str]) -> None:
    info = {**INFO, "SecurityOptions": ["name=apparmor"]}
    with capture_logs() as events:
        assert offered_runtimes(object(), info, registrations(info), "probe:1") == []  # type: ignore[arg-type]
    assert [e["event"] for e in events] == ["runtimes_not_offered"]
    assert probes == []
