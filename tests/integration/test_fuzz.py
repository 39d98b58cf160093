"""Fuzzing every RPC of both ports (issue 12, point 11).

The RPCs come from the service descriptors (tests/rpc_catalog.py), so one added later is
fuzzed without a change here. Each gets a few hundred requests that Hypothesis builds
from its message descriptor (any subset of fields, extreme numbers, invalid UTF-8 in
string fields, megabyte strings, many repeated entries) and then often damages
(truncated, a bit flipped, bytes inserted, a malformed field appended). They are sent
as raw bytes, on the API port with a bearer token and without one, on the agent port
with a valid agent certificate. The server must never answer UNKNOWN, INTERNAL or
UNIMPLEMENTED, never name a Python type, never send an error text beyond 1 KiB; it
must still answer afterwards, and its memory must not keep growing.

The control plane runs in a process of its own (tests/standalone_controlplane.py) so
that its resident memory can be read from /proc, apart from the fuzzer's own. Rate
limits are raised there: at the defaults nearly every request would be refused before
reaching a servicer, which proves nothing about the servicers."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.configuration import set_hypothesis_home_dir

from testhide.agent.credentials import new_key_and_csr
from testhide.common.tls import secure_channel
from testhide.protos.v1 import (
    agent_pb2,
    auth_pb2,
    auth_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from tests.harness import REPO
from tests.rpc_catalog import AGENT, API, MAX_DETAILS_BYTES, RPCS, Outcome, Rpc, call_raw, requests

# Hypothesis keeps its files in the temp dir, not in the repository (as tests/unit/conftest.py).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "testhide-fuzz-hypothesis")
sys.modules.setdefault("hypothesis.extra._patching", None)  # type: ignore[arg-type]

# Requests per API-port RPC and caller (with a token, without one); each agent-port RPC,
# which has one caller, gets twice as many: a few hundred per RPC.
EXAMPLES = int(os.environ.get("TESTHIDE_FUZZ_EXAMPLES", "150"))
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,  # we cancel a response stream after its first message
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # lockouts, and requests beyond the size limit
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Methods a servicer leaves out: grpcio-health-checking's asyncio servicer has no List.
NOT_SERVED = {"/grpc.health.v1.Health/List"}
# A response stream that may never end (a follower of a job that runs on) is given up after this.
STREAM_DEADLINE_S = 2.0
# Growth of the server's resident memory allowed between the warm-up and the end: the
# fuzz sends more than a gigabyte in all, so a leak of even a small part of it shows.
MAX_RSS_GROWTH_MIB = 64


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    info: dict[str, object]
    log_path: Path

    def rss_kib(self) -> tuple[int, int]:
        """Resident and peak resident memory of the server process, in KiB."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@contextmanager
def standalone_server(directory: Path) -> Iterator[Server]:
    log_path = directory / "controlplane.log"
    config = {"rate_per_address": 1e6, "rate_per_principal": 1e6}
    ready_read, ready_write = os.pipe()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.standalone_controlplane",
                str(directory),
                json.dumps(config),
                str(os.getpid()),
                str(ready_write),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(ready_write,),
        )
    os.close(ready_write)  # the child holds the only write end: its death ends the pipe
    try:
        with os.fdopen(ready_read) as ready:
            readable, _, _ = select.select([ready], [], [], 60)
            assert readable, "the control plane did not start within 60 s"
            line = ready.readline()
        assert line, f"the control plane exited before serving:\n{log_path.read_text()}"
        yield Server(process, json.loads(line), log_path)
    finally:
        process.terminate()
        process.wait(30)


@dataclass
class Callers:
    api: grpc.aio.Channel
    agent: grpc.aio.Channel
    bearer: tuple[tuple[str, str], ...]
    known: list[str]
    """Strings worth sending among the random ones: real ids, names, a valid image."""
    hello: bytes
    sent: Counter[tuple[str, bool, grpc.StatusCode]] = field(default_factory=Counter)
    """Calls by RPC, caller (anonymous or not) and status."""
    requests: int = 0
    """Calls made, counting those made again because the client lost the status."""
    lost: int = 0
    """Calls whose status the client lost each time (the server's log still tells)."""
    bytes_sent: int = 0

    async def send(self, rpc: Rpc, messages: list[bytes], anonymous: bool) -> Outcome:
        channel = self.agent if rpc.port == AGENT else self.api
        metadata = () if anonymous or rpc.port == AGENT else self.bearer
        outcome = await call_raw(
            channel,
            rpc,
            messages,
            metadata,
            deadline_s=STREAM_DEADLINE_S if rpc.server_streaming else 30,
            read_all=rpc.client_streaming,  # to the end of Connect: its reads are the point
        )
        self.sent[(rpc.id, anonymous, outcome.code)] += 1
        self.requests += outcome.attempts
        self.bytes_sent += outcome.attempts * sum(len(m) for m in messages)
        self.lost += outcome.lost
        return outcome


async def open_callers(server: Server) -> Callers:
    ca_pem = str(server.info["ca_pem"]).encode()
    api = grpc.aio.secure_channel(
        f"127.0.0.1:{server.info['api_port']}", grpc.ssl_channel_credentials(ca_pem)
    )
    login = await auth_pb2_grpc.AuthStub(api).Login(
        auth_pb2.LoginRequest(api_key=str(server.info["admin_key"]))
    )
    bearer = (("authorization", f"Bearer {login.access_token}"),)
    key_pem, csr_pem = new_key_and_csr()
    enrolled = await enrollment_pb2_grpc.EnrollmentStub(api).Enroll(
        enrollment_pb2.EnrollRequest(token=str(server.info["enrollment_token"]), csr_pem=csr_pem, name="fuzz")
    )
    agent = secure_channel(
        f"127.0.0.1:{server.info['agent_port']}",
        ca_pem,
        client_key_pem=key_pem,
        client_cert_pem=enrolled.certificate_pem,
    )
    jobs = jobs_pb2_grpc.JobsStub(api)
    # One job any agent may take (the fuzzing agent's hellos do), one none can.
    job_ids = [
        (await jobs.Submit(jobs_pb2.SubmitJobRequest(spec=spec), metadata=bearer)).job.id
        for spec in (
            jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"]),
            jobs_pb2.JobSpec(image="testhide/busybox:1", command=["true"], labels={"never": "x"}),
        )
    ]
    hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(max_jobs=2, version="fuzz")).SerializeToString()
    known = [*job_ids, "default", "testhide/busybox:1", "true", "/workspace", "runsc", "ok.txt", "SECRET"]
    return Callers(api, agent, bearer, known, hello)


def fuzz(runner: asyncio.Runner, callers: Callers, rpc: Rpc, anonymous: bool, examples: int) -> None:
    prefix = [callers.hello] if rpc.path.endswith("/Connect") else []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(requests(rpc, callers.known, prefix))
    def one(messages: list[bytes]) -> None:
        outcome = runner.run(callers.send(rpc, messages, anonymous))
        if outcome.lost:
            return  # grpc's client-side race; the server's log is checked at the end
        assert (
            outcome.code in ALLOWED
            or (rpc.server_streaming and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED)
            or (rpc.path in NOT_SERVED and outcome.code == grpc.StatusCode.UNIMPLEMENTED)
        ), outcome
        # The client's own refusal of an oversized trailer, hiding the server's status.
        assert not (
            outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Stream removed" in outcome.details
        )
        assert not outcome.leaks(), outcome
        assert len(outcome.details.encode()) <= MAX_DETAILS_BYTES + 32, len(outcome.details)

    one()


async def still_serving(callers: Callers) -> None:
    for channel in (callers.api, callers.agent):
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        answer = await check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    listed = await jobs_pb2_grpc.JobsStub(callers.api).List(
        jobs_pb2.ListJobsRequest(), metadata=callers.bearer
    )
    assert len(listed.jobs) >= 2


def examples(rpc: Rpc) -> int:
    return max(10, EXAMPLES if rpc.port == API else 2 * EXAMPLES)


@pytest.mark.slow
# Its time grows with every RPC added (~2 s each on 2 cores): the default 120 s is too close.
@pytest.mark.timeout(300)
# A falsifying example may hold megabytes; Hypothesis warns before printing it.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_fuzz_every_rpc_of_both_ports_with_generated_and_damaged_requests(tmp_path: Path) -> None:
    callers_of = [
        (rpc, anonymous) for rpc in RPCS for anonymous in ((False, True) if rpc.port == API else (False,))
    ]
    started = time.monotonic()
    with standalone_server(tmp_path) as server, asyncio.Runner() as runner:
        callers = runner.run(open_callers(server))
        # Warm-up: a tenth of the requests, so that caches, pools and arenas have grown
        # to their working size before memory is measured.
        for rpc, anonymous in callers_of:
            fuzz(runner, callers, rpc, anonymous, examples(rpc) // 10)
        warm_rss, _ = server.rss_kib()
        warm_count = callers.requests
        for rpc, anonymous in callers_of:
            fuzz(runner, callers, rpc, anonymous, examples(rpc))
        end_rss, peak_rss = server.rss_kib()
        runner.run(still_serving(callers))
        assert server.process.poll() is None
        total = callers.requests
        codes = Counter[str]()
        for (_, _, code), count in callers.sent.items():
            codes[code.name] += count
        codes["status lost by the client"] = callers.lost
        codes["INTERNAL"] -= callers.lost
        per_rpc = Counter[str]()
        for (rpc_id, _, _), count in callers.sent.items():
            per_rpc[rpc_id] += count
        print(
            f"\nfuzz: {total} requests ({warm_count} warm-up, {callers.bytes_sent >> 20} MiB) "
            f"to {len(per_rpc)} RPCs in "
            f"{time.monotonic() - started:.1f} s; fewest to one RPC: {min(per_rpc.values())} "
            f"({min(per_rpc, key=lambda k: per_rpc[k])}); statuses: {dict(codes.most_common())}; "
            f"server RSS {warm_rss // 1024} MiB after warm-up, {end_rss // 1024} MiB at the end, "
            f"peak {peak_rss // 1024} MiB"
        )
        runner.run(callers.api.close())
        runner.run(callers.agent.close())
    log = server.log_path.read_text()
    assert "Unexpected" not in log, "grpc answered an exception of ours itself"
    assert "rpc_failed" not in log, "a servicer raised something unexpected"
    assert end_rss - warm_rss <= MAX_RSS_GROWTH_MIB * 1024, (warm_rss, end_rss)
