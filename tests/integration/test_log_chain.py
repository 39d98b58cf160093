"""The log hash chain end to end: a real control plane (SQLite), a real agent and a Docker job
writing several batches, with a secret masked and SYSTEM lines. After the job the head the
control plane stored, the head the agent reported and the head recomputed over GetLogBatches
are one; another organisation gets NOT_FOUND and no batch. Then the database is tampered with
directly (bytes re-sealed with the control plane's own sealing, a batch deleted, two batches
swapped) and the verifier names each. A stored chain tampered with while the job runs is
recorded and audited when the result comes; a job that ends while its agent is cut off (its
log spooled, then replayed) keeps the heads equal. The same on PostgreSQL, at the store's
level: tests/integration/test_log_chain_store.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from testhide.common.evidence import log_chain_head, verify_log_chain
from testhide.controlplane.jobs.model import JobStatus
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    Cli,
    RunningControlPlane,
    assert_same_bytes,
    containers_of,
    control_plane,
    eventually,
    in_status,
    log_reached,
    numbered,
    operator,
    running_agent,
)
from tests.netproxy import CuttableProxy
from tests.tamper import Database

pytestmark = pytest.mark.docker

SECRET = "chain-secret-4b1e7d"
# ~3 MB of output (batches hold at most 1 MiB), the secret in it, and lines on stderr.
SCRIPT = (
    'echo "token=$TOKEN"; i=0; while [ $i -lt 6 ]; do head -c 500000 /dev/zero | tr "\\0" x; echo;'
    ' echo "err $i" >&2; i=$((i+1)); done'
)

Record = tuple[int, bytes, list[tuple[int, bytes]]]


@asynccontextmanager
async def jobs_stub(cp: RunningControlPlane) -> AsyncIterator[jobs_pb2_grpc.JobsAsyncStub]:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        yield jobs_pb2_grpc.JobsStub(channel)


async def download(cp: RunningControlPlane, job_id: str, api_key: str | None = None) -> list[Record]:
    async with jobs_stub(cp) as stub:
        call = stub.GetLogBatches(
            jobs_pb2.GetLogBatchesRequest(job_id=job_id), metadata=await cp.bearer(api_key), timeout=60
        )
        return [(r.seq, r.chain, [(e.stream, e.data) for e in r.entries]) async for r in call]


async def get_job(cp: RunningControlPlane, job_id: str) -> jobs_pb2.Job:
    async with jobs_stub(cp) as stub:
        return await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=await cp.bearer(), timeout=60)


async def test_stored_agent_and_recomputed_heads_agree_and_tampering_is_named(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    assert (await cli("secrets", "set", "TOKEN", stdin=SECRET.encode())).returncode == 0
    run = await cli("run", "--secret", "TOKEN", "--image", JOB_IMAGE, "--", "sh", "-c", SCRIPT)
    assert run.returncode == 0, run.stderr
    job_id = (await cli("jobs", "list", "--json")).stdout.split(b'"id": "')[1].split(b'"')[0].decode()

    job = await get_job(cp, job_id)
    batches = await download(cp, job_id)
    assert len(batches) >= 3
    assert [seq for seq, _, _ in batches] == list(range(1, len(batches) + 1))
    log = b"".join(data for _, _, entries in batches for _, data in entries)
    assert b"token=***\n" in log  # the chain is over masked bytes
    assert SECRET.encode() not in log
    assert b"err 5\n" in log
    recomputed = log_chain_head(job_id, [(seq, entries) for seq, _, entries in batches])
    assert len(job.log_chain_head) == 32
    assert job.log_chain_head == job.agent_log_chain_head == recomputed
    assert verify_log_chain(job_id, job.agent_log_chain_head, batches) is None

    # Another organisation: NOT_FOUND, and not one batch.
    code, _, err = await operator("orgs", "create", "--data-dir", str(cp.data_dir), "beta")
    assert code == 0, err
    beta_key, _ = await cp.api_key("beta", "jobs:read")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await download(cp, job_id, beta_key)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert SECRET not in (error.value.details() or "")

    head = job.agent_log_chain_head
    db = Database(cp, job_id)
    saved = await db.rows()
    last = len(batches)

    async def verdict() -> str | None:
        return verify_log_chain(job_id, head, await download(cp, job_id))

    await db.reseal(2, 0, b"all tests passed\n")
    assert await verdict() == "log batch 2 does not match its chain link (edited)"
    await db.restore(saved)
    assert await verdict() is None

    await db.delete_batch(2)
    assert await verdict() == "log batch 2 is missing (batches jump from 1 to 3)"
    await db.restore(saved)

    await db.delete_batch(last)
    assert await verdict() == "log chain head differs from the signed head (batches removed at the end?)"
    await db.restore(saved)

    # Swapped rows no longer authenticate at rest (their sealing names their batch) ...
    await db.swap(1, 2)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await download(cp, job_id)
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert "log batch 1 of job" in (error.value.details() or "")
    # ... and re-sealed for their new places by someone holding the key, the chain still tells.
    entries_of = {seq: entries for seq, _, entries in batches}
    for seq, original in ((1, 2), (2, 1)):
        for index, (_, data) in enumerate(e for e in entries_of[original] if e[1]):
            await db.reseal(seq, index, data)
    assert await verdict() == "log batches out of order: 2 before 1"


async def test_a_stored_log_that_differs_from_the_agents_is_recorded_and_audited(
    docker_agent: Agent, cp: RunningControlPlane, cli: Cli
) -> None:
    """The job's stored chain is tampered with while it runs: its result is recorded all the
    same, with both heads, and the mismatch goes to the audit log."""
    run = await cli(
        "run", "--detach", "--image", JOB_IMAGE, "--", "sh", "-c", "echo first; sleep 8; echo second"
    )
    job_id = run.stdout.decode().strip()
    await eventually(lambda: log_reached(cp, job_id, 1), 60, "the first batch stored")
    db = Database(cp, job_id)
    await db.run(lambda c: c.execute("UPDATE jobs SET log_chain = ? WHERE id = ?", (bytes(32), job_id)))
    assert (await get_job(cp, job_id)).status == jobs_pb2.JOB_STATUS_RUNNING  # tampered before the result

    await eventually(lambda: in_status(cp, job_id, JobStatus.SUCCEEDED), 60, "the job's result")
    job = await get_job(cp, job_id)
    assert job.agent_log_chain_head
    assert job.log_chain_head != job.agent_log_chain_head
    assert verify_log_chain(job_id, job.agent_log_chain_head, await download(cp, job_id)) == (
        "log batch 2 does not match its chain link (edited)"
    )
    entries, _ = await db.store.read_audit()
    mismatches = [e.event for e in entries if e.event.action == "log_chain_mismatch"]
    assert [(e.target, e.details["agent_head"]) for e in mismatches] == [
        (job_id, job.agent_log_chain_head.hex())
    ]


async def test_batches_spooled_while_cut_off_and_replayed_keep_the_heads_equal(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    """The job ends while its agent is cut off from the control plane: the rest of its log waits
    in the spool (on disk), the agent's head is made then; replayed on reconnect, the control
    plane's chain over what it stores comes to the same head."""
    script = "seq 1 200000; while [ ! -e /tmp/go ]; do sleep 0.1; done; seq 200001 900000; echo done >&2"
    async with (
        control_plane(tmp_path) as cp,
        CuttableProxy("127.0.0.1", cp.daemon.agent_port) as proxy,
        running_agent(
            cp,
            tmp_path,
            DockerRuntime(docker_client),
            agent_port=proxy.port,
            max_backoff=timedelta(seconds=1),
            stop_grace=timedelta(seconds=1),
        ) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        run = await cli("run", "--detach", "--image", JOB_IMAGE, "--", "sh", "-c", script)
        job_id = run.stdout.decode().strip()
        await eventually(lambda: log_reached(cp, job_id, len(numbered(1, 200000))), 60, "the first part")
        proxy.cut()
        await asyncio.to_thread(containers_of(docker_client, job_id)[0].exec_run, ["touch", "/tmp/go"])
        await asyncio.wait_for(agent.job_done(job_id), 60)
        assert any(agent.config.spool_dir.iterdir()), "the backlog is on disk"
        assert (await get_job(cp, job_id)).status == jobs_pb2.JOB_STATUS_RUNNING
        proxy.restore()
        await eventually(lambda: in_status(cp, job_id, JobStatus.SUCCEEDED), 120, "the job's result")
        job = await get_job(cp, job_id)
        batches = await download(cp, job_id)
    assert proxy.connections >= 2, "the agent reconnected through the proxy"

    def written_to(stream: int) -> bytes:
        return b"".join(data for _, _, entries in batches for s, data in entries if s == stream)

    # Each stream whole and in order; across the two, Docker keeps no order (its stderr frame
    # may overtake stdout the pipe still holds).
    assert_same_bytes(written_to(jobs_pb2.LOG_STREAM_STDOUT), numbered(1, 900000))
    assert written_to(jobs_pb2.LOG_STREAM_STDERR) == b"done\n"
    assert job.log_chain_head == job.agent_log_chain_head
    assert verify_log_chain(job_id, job.agent_log_chain_head, batches) is None
