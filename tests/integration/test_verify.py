"""``testhide verify`` end to end: a real control plane (SQLite), a real agent and a Docker job
that writes its log over several batches, keeps an artifact and a JUnit report, and exits 3.
The job verifies online with the CA file of the session; each tampering of the database behind
the control plane's back (a log batch edited, removed, reordered, all re-sealed as the control
plane seals; an artifact's bytes replaced; the exit code changed) makes it fail, naming what.
Exported to a bundle, it verifies with the control plane stopped; a bundle whose statement is
signed by another agent, or countersigned by a key rotated out before the job ended, or checked
against another CA, fails naming why."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from docker import DockerClient

from testhide.agent.credentials import Credentials
from testhide.agent.daemon import Agent
from testhide.agent.runtime.docker import DockerRuntime
from testhide.common.statement import Statement, key_id, sign
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.statement_keys import new_statement_key, unseal_key
from testhide.controlplane.datadir import DataDir
from tests.harness import (
    JOB_IMAGE,
    Cli,
    CliResult,
    RunningControlPlane,
    control_plane,
    enrolled,
    eventually,
    running_agent,
)
from tests.json_schema import assert_matches_example
from tests.tamper import Database

pytestmark = pytest.mark.docker

# ~3 MB of log (batches hold at most 1 MiB) with lines on stderr, an artifact, a JUnit report.
SCRIPT = (
    'i=0; while [ $i -lt 6 ]; do head -c 500000 /dev/zero | tr "\\0" x; echo; echo "err $i" >&2;'
    " i=$((i+1)); done; mkdir -p out; echo data > out/a.txt;"
    ' echo \'<testsuite name="s" tests="1"><testcase classname="c" name="t"/></testsuite>\' > report.xml;'
    " exit 3"
)


async def run_job(cp: RunningControlPlane, cli: Cli) -> tuple[str, Statement, str]:
    """The job's id, its signed statement and the key that countersigned it, once recorded."""
    run = await cli(
        "run", "--artifacts", "out/*", "--junit", "report.xml", "--image", JOB_IMAGE, "--", "sh", "-c", SCRIPT
    )
    assert run.returncode == 3, run.stderr
    job_id = json.loads((await cli("jobs", "list", "--json")).stdout)[0]["id"]
    store = cp.daemon._store
    assert store is not None
    record = await eventually(lambda: store.job_statement("default", job_id), 60, "the job's statement")
    assert record.signing_key_id, record.mismatch
    return job_id, Statement.decode(record.payload), record.signing_key_id


def verdict(statement: Statement, key: str, batches: int, agent: Agent) -> str:
    return (
        f"job {statement.job_id} verifies: signed by agent agent ({agent.agent_id}) at "
        f"{statement.finished_at}, countersigned by the control plane (key {key}), log {batches} batches, "
        "1 artifact; not checked: the bytes of 1 JUnit report (the control plane serves their parsed "
        "results, not the files)\n"
    )


def refused(result: CliResult, job_id: str, reason: str) -> None:
    assert (result.returncode, result.stdout) == (1, b""), result.stderr
    assert result.stderr.decode() == f"Error: job {job_id} does not verify: {reason}\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_a_job_verifies_online_and_each_tampering_of_the_database_is_named(
    cp: RunningControlPlane, docker_agent: Agent, cli: Cli, tmp_path: Path
) -> None:
    job_id, statement, key = await run_job(cp, cli)
    bundle = tmp_path / "job.bundle.json"
    result = await cli("verify", job_id, "--export", str(bundle))
    assert result.returncode == 0, result.stderr
    exported = json.loads(bundle.read_bytes())
    batches = exported["log_batches"]
    assert len(batches) >= 3
    assert result.stdout.decode() == verdict(statement, key, len(batches), docker_agent)
    assert f"bundle written to {bundle}" in result.stderr.decode()
    assert [a["path"] for a in exported["artifacts"]] == ["out/a.txt"]
    assert base64.b64decode(exported["artifacts"][0]["data"]) == b"data\n"

    db = Database(cp, job_id)
    saved = await db.rows()

    async def verify() -> CliResult:
        return await cli("verify", job_id)

    await db.reseal(2, 0, b"all tests passed\n")
    refused(await verify(), job_id, "log batch 2 does not match its chain link (edited)")
    await db.restore(saved)

    await db.delete_batch(2)
    refused(await verify(), job_id, "log batch 2 is missing (batches jump from 1 to 3)")
    await db.restore(saved)

    entries_of = {
        b["seq"]: [(e["stream"], base64.b64decode(e["data"])) for e in b["entries"]] for b in batches
    }
    await db.swap_resealed(1, 2, entries_of)
    refused(await verify(), job_id, "log batches out of order: 2 before 1")
    await db.restore(saved)

    original = await db.replace_artifact("out/a.txt", b"forged\n")
    forged, signed = hashlib.sha256(b"forged\n").hexdigest(), hashlib.sha256(b"data\n").hexdigest()
    refused(
        await verify(),
        job_id,
        f"artifact out/a.txt: its bytes' sha256 is {forged}, the signed statement says {signed}",
    )
    await db.replace_artifact("out/a.txt", original)

    await db.set_result(0, "SUCCEEDED")
    refused(
        await verify(), job_id, "exit code: the signed statement says 3, the control plane's record says 0"
    )
    await db.set_result(3, "FAILED")

    # Put back as it was, the job verifies again: each failure above was the tampering's.
    result = await cli("verify", job_id, "--json")
    assert result.returncode == 0, result.stderr
    assert_matches_example("testhide verify", json.loads(result.stdout))
    assert json.loads(result.stdout)["artifacts"] == [{"path": "out/a.txt", "sha256": signed}]

    provenance = tmp_path / "provenance.json"
    result = await cli("verify", job_id, "--in-toto", str(provenance))
    assert result.returncode == 0, result.stderr
    envelope = json.loads(provenance.read_bytes())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert [s["keyid"] for s in envelope["signatures"]] == [key]
    in_toto = json.loads(base64.b64decode(envelope["payload"]))
    assert in_toto["subject"] == [{"name": "out/a.txt", "digest": {"sha256": signed}}]

    # Swapped without re-sealing, the rows no longer authenticate: the server cannot read them back.
    await db.swap(1, 2)
    result = await verify()
    assert result.returncode == 1, result.stderr
    reason = "the control plane cannot read its record back: log batch 1 of job"
    assert result.stderr.decode().startswith(f"Error: job {job_id} does not verify: {reason}")
    await db.restore(saved)

    await db.run(lambda c: c.execute("DELETE FROM job_statements WHERE job_id = ?", (job_id,)))
    refused(
        await verify(),
        job_id,
        f"job {job_id} has no signed statement (it has not ended, or its agent predates statements)",
    )


def forged_bundle(exported: dict[str, Any], path: Path, **evidence: Any) -> Path:
    document = json.loads(json.dumps(exported))
    document["evidence"].update(evidence.pop("fields", {}))
    for index, signature in evidence.pop("signatures", {}).items():
        document["evidence"]["envelope"]["signatures"][index] = signature
    path.write_text(json.dumps(document))
    return path


async def test_a_bundle_verifies_with_no_control_plane_and_a_forged_one_names_its_signer(
    tmp_path: Path, docker_client: DockerClient
) -> None:
    bundle = tmp_path / "job.bundle.json"
    async with (
        control_plane(tmp_path) as cp,
        running_agent(cp, tmp_path, DockerRuntime(docker_client), stop_grace=timedelta(seconds=1)) as agent,
    ):
        cli = Cli(tmp_path / "config")
        assert (await cli.login(cp)).returncode == 0
        job_id, statement, key = await run_job(cp, cli)
        online = await cli("verify", job_id, "--export", str(bundle))
        assert online.returncode == 0, online.stderr
        other = Credentials.load(await enrolled(cp, tmp_path, "other"))
        data_dir = DataDir(cp.data_dir)
        master = data_dir.master_key()
        ca: CertificateAuthority = data_dir.load_ca(master)
        # A key made 40 days before the job ended, active 30 of them and certified 7 more: rotated
        # out, its window over, by the time the job ended.
        old = new_statement_key(ca, master, statement.finished - timedelta(days=40), timedelta(days=30))
    # The control plane and its agent are gone: the bundle is all there is.
    offline = await cli("verify", job_id, "--bundle", str(bundle))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout
    assert offline.stdout.decode() == verdict(
        statement, key, len(json.loads(bundle.read_bytes())["log_batches"]), agent
    )

    exported = json.loads(bundle.read_bytes())
    payload = statement.encode()
    other_key = serialization.load_pem_private_key(other.key_pem, None)
    assert isinstance(other_key, ec.EllipticCurvePrivateKey)
    other_der = other.certificate.public_bytes(serialization.Encoding.DER)
    by_other = forged_bundle(
        exported,
        tmp_path / "other.json",
        fields={"agent_certificate": b64(other_der)},
        signatures={0: {"keyid": key_id(other_der), "sig": b64(sign(other_key, payload))}},
    )
    refused(
        await cli("verify", job_id, "--bundle", str(by_other)),
        job_id,
        f"statement names agent default/{agent.agent_id} but is signed by agent default/{other.agent_id}'s "
        "certificate",
    )

    rotated_out = forged_bundle(
        exported,
        tmp_path / "rotated.json",
        fields={
            "signing_certificates": [*exported["evidence"]["signing_certificates"], b64(old.certificate)]
        },
        signatures={1: {"keyid": old.id, "sig": b64(unseal_key(old, master).countersign(payload))}},
    )
    refused(
        await cli("verify", job_id, "--bundle", str(rotated_out)),
        job_id,
        f"countersignature key {old.id}'s certificate expired before the statement's end time (rotated out)",
    )

    # The anchor is the CA file, never what the bundle (or a server) carries.
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(
        CertificateAuthority.create("stranger.local").certificate.public_bytes(serialization.Encoding.PEM)
    )
    refused(
        await cli("verify", job_id, "--bundle", str(bundle), "--ca-file", str(stranger)),
        job_id,
        "the agent certificate was not issued by the trusted CA",
    )
