"""Certificate throughput of the control plane.

1. signing: agent certificates the CA signs per second from CSRs, against
   bare ECDSA P-256 signatures per second (the floor under each certificate);
2. renewal: N agents, each with its own certificate and its own mutual-TLS
   channel, call Renew on a real control plane at once, from several worker
   processes; the time until all hold new certificates, against the time the
   CA alone needs to sign as many.

    python3 -m benchmarks.certs [--agents 1000] [--workers 4] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.figures import Figure, median, raise_fd_limit
from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.common.logging import configure
from testhide.common.tls import CHANNEL_OPTIONS, fingerprint
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.store.base import AgentRecord
from testhide.protos.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import control_plane


def signing_rate(count: int) -> float:
    ca = CertificateAuthority.create("bench.local")
    csrs = [new_key_and_csr()[1] for _ in range(count)]
    started = time.perf_counter()
    for i, csr in enumerate(csrs):
        ca.issue_agent(
            csr, AgentIdentity("bench.local", "default", "default", f"a{i:016x}"), timedelta(hours=1)
        )
    return count / (time.perf_counter() - started)


def ecdsa_rate(count: int) -> float:
    """Bare P-256 signatures of a certificate-sized message per second."""
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"x" * 600
    started = time.perf_counter()
    for _ in range(count):
        key.sign(message, ec.ECDSA(hashes.SHA256()))
    return count / (time.perf_counter() - started)


RENEWALS_AT_ONCE = 64
"""Per worker process. Thousands of handshakes at once overran the control
plane's accept queue ("Handshake read failed"); real agents spread their
renewals over the jitter window anyway."""


async def _renew_all(target: str, ca_pem: bytes, agents: list[tuple[bytes, bytes]]) -> list[float]:
    gate = asyncio.Semaphore(RENEWALS_AT_ONCE)

    async def one(key_pem: bytes, cert_pem: bytes) -> float:
        async with gate:
            return await renew(key_pem, cert_pem)

    async def renew(key_pem: bytes, cert_pem: bytes) -> float:
        credentials = grpc.ssl_channel_credentials(ca_pem, private_key=key_pem, certificate_chain=cert_pem)
        async with grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
            started = time.perf_counter()
            _, csr = new_key_and_csr()
            response = await agent_pb2_grpc.AgentControlStub(channel).Renew(
                agent_pb2.RenewRequest(csr_pem=csr), timeout=300
            )
            assert response.certificate_pem
            return time.perf_counter() - started

    return list(await asyncio.gather(*(one(k, c) for k, c in agents)))


def _worker(target: str, ca_pem: bytes, agents: list[tuple[bytes, bytes]], start: Any, out: Any) -> None:
    raise_fd_limit()
    start.wait()
    out.put(asyncio.run(_renew_all(target, ca_pem, agents)))


async def renewal(agents: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane(Path(tmp)) as cp:
            directory = DataDir(cp.data_dir)
            ca = directory.load_ca(directory.master_key())
            store = cp.daemon._store
            assert store is not None
            identities = []
            for i in range(agents):
                key_pem, csr = new_key_and_csr()
                identity = AgentIdentity(ca.trust_domain, "default", "default", f"a{i:016x}")
                issued = ca.issue_agent(csr, identity, timedelta(hours=1))
                await store.create_agent(
                    AgentRecord(
                        identity.agent_id,
                        "default",
                        "default",
                        f"bench-{i}",
                        format(issued.serial, "x"),
                        issued.not_after,
                        datetime.now(UTC),
                        cert_issuer=fingerprint(ca.certificate_pem),
                    )
                )
                identities.append((key_pem, issued.certificate_pem))
            context = multiprocessing.get_context("spawn")
            start, out = context.Event(), context.Queue()
            shares = [identities[i::workers] for i in range(workers)]
            processes = [
                context.Process(target=_worker, args=(cp.agent_target, cp.ca_pem, share, start, out))
                for share in shares
            ]
            for process in processes:
                process.start()
            await asyncio.sleep(1.0)  # let the workers import and reach the start line
            started = time.perf_counter()
            start.set()
            latencies: list[float] = []
            for _ in processes:
                latencies += await asyncio.to_thread(out.get, True, 900)
            elapsed = time.perf_counter() - started
            for process in processes:
                process.join(30)
    latencies.sort()
    return {
        "agents": agents,
        "workers": workers,
        "all_renewed_s": round(elapsed, 3),
        "renewals_per_s": round(agents / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
    }


async def measure(smoke: bool) -> list[Figure]:
    agents, workers, sign_count = (20, 2, 50) if smoke else (10_000, 5, 2000)
    raise_fd_limit()
    signing, ecdsa = [], []
    for _ in range(1 if smoke else 3):  # turn about
        signing.append(signing_rate(sign_count))
        ecdsa.append(ecdsa_rate(sign_count))
    renewed = await renewal(agents, workers)
    signing.append(signing_rate(sign_count))
    sign_rate, ecdsa_per_s = median(signing), median(ecdsa)
    signing_alone_s = agents / sign_rate
    return [
        Figure(
            name="certificate_signing",
            title="Certificate signing",
            value=round(sign_rate, 1),
            unit="certificates/s",
            baseline=round(ecdsa_per_s, 1),
            baseline_unit="signatures/s",
            baseline_what="bare ECDSA P-256 signatures (cryptography) in the same process",
            ratio=round(sign_rate / ecdsa_per_s, 3),
            goal="none set (reported)",
            met=None,
            details={
                "signing_per_s": [round(r, 1) for r in signing],
                "ecdsa_per_s": [round(r, 1) for r in ecdsa],
            },
        ),
        Figure(
            name="certificate_renewal",
            title=f"{agents:,} agents renewing",
            value=renewed["all_renewed_s"],
            unit="s",
            baseline=round(signing_alone_s, 3),
            baseline_unit="s",
            baseline_what=f"the CA alone signing {agents:,} certificates in process",
            ratio=round(renewed["all_renewed_s"] / signing_alone_s, 2),
            goal="none set (reported)",
            met=None,
            details=renewed,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds: keeps the benchmark from rotting"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure("warning")
    agents, sign_count = (20, 50) if args.smoke else (args.agents, 2000)
    signing = signing_rate(sign_count)
    result = asyncio.run(renewal(agents, min(args.workers, agents)))
    result["signing_per_s"] = round(signing, 1)
    result["renewal_rate_vs_signing"] = round(result["renewals_per_s"] / signing, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
