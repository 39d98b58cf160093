"""What the profiles showed for each figure and what changed because of
them; written into the results next to the numbers they explain."""

NOTES: dict[str, str] = {
    "job_overhead": (
        "Not met. The CLI's own start-up (`testhide --help`, details.cli_startup_s, ~0.5 s) is already longer "
        "than the whole `docker run` (~0.4 s): python -X importtime shows grpc ~40 ms, cryptography.x509 "
        "(through common.tls, not needed by `run`) ~66 ms, cli.workspace/pathspec ~30 ms and "
        "protobuf.json_format ~31 ms imported even with --no-workspace. On the agent each job also creates a "
        "volume and a helper container for /workspace. Next: lazy imports in the CLI and no workspace volume "
        "for jobs without a workspace; a Python CLI cannot reach 1.15x of a Go client's `docker run`."),
    "pickup_latency": (
        "Met: the assignment is pushed on the open stream as soon as the dispatcher runs, so pickup is about "
        "one RPC round trip (the baseline). No polling interval enters."),
    "log_throughput": (
        "Not met (0.70 in the last two full runs; 0.91 once in an earlier one). Profile (top, per process): "
        "before the fix dockerd sat at 100% of a core for over two minutes writing a 1.5 GB json-file log for "
        "the 200 MB of 10-byte lines, for testhide's job and the baseline alike. Fixed in 5a96268: job "
        "containers use Docker's 'none' log driver (the agent reads the attach socket), and the baseline "
        "container is made the same way; a 200 MB run now takes ~11 s instead of minutes. What holds the rest "
        "back: the path (agent demux -> gRPC -> control plane seals each batch with AES-GCM and writes SQLite "
        "-> follower reads and unseals -> gRPC -> CLI) is three Python processes sharing 2 cores with the "
        "generator and dockerd, while the baseline is one reader; the per-process split of that path is not "
        "profiled yet. sha256 of every followed log matched the source."),
    "scheduler_throughput": (
        "Not met. cProfile of the control plane's event loop (600 jobs, 10 agents): 31% of wall time idle in "
        "epoll waiting on the store's single SQLite thread, which served 5,516 calls (~9 per job: submit "
        "pool_exists/secrets/pool_policy/create_job; dispatch queued_jobs/pool_policy/secrets/assign_job; "
        "started and result get_job + set_job_status each, and every job load re-reads its transitions); "
        "0.6 ms per Submit verifying the RS256 access token. The store alone (baseline, 4 transactions a job) "
        "does only a few hundred jobs/s, so 1,000 jobs/s needs fewer, batched transactions (one dispatch "
        "round assigning many jobs in one transaction, results grouped) in the scheduler, job service and "
        "store, which are being reworked on another branch: left for after that lands."),
    "controlplane_memory": (
        "Not met: about 100 KiB per stream (details.per_stream_kib). Each stream is its own TLS connection "
        "with its own certificate; per stream the control plane holds gRPC core's connection (TLS and HTTP/2 "
        "buffers) and, in Python, an AgentSession with its outbox queue and three tasks (reader, writer, "
        "certificate-expiry wait). Not yet split between Python objects (tracemalloc) and gRPC core; next "
        "steps are that split, smaller HTTP/2 buffers for the agent port, and one task per idle stream."),
    "agent_memory": (
        "Not met, by a few MB, and held back by imports: RSS after only importing agent.daemon and "
        "agent.runtime.docker is 57.4 MiB (60.2 MB) before any connection: grpc +18.5 MiB, docker-py (with "
        "requests and urllib3) +17 MiB, cryptography.x509 +10 MiB over a 13.4 MiB interpreter. The open "
        "channel and the daemon's state add ~6 MiB. Talking to dockerd's API without docker-py would be "
        "the largest single saving."),
    "certificate_signing": (
        "Building and signing an X.509 certificate from a CSR (CSR parse and signature check, extensions, "
        "serialisation) costs about ten bare ECDSA signatures; no target was set."),
    "certificate_renewal": (
        "Each renewal is a TLS handshake with the agent's own certificate, the identity and deny-list "
        "checks, a signature, a store write and an audit record (one SQLite transaction each, on the store's "
        "single thread). 1,000 agents took 4.4 s earlier; 10,000 take about 20 times as long, with 64 "
        "renewals in flight per worker process (all at once, handshakes failed). No target was set; with "
        "renewal at half of a 1 h lifetime and ±10% jitter, 10,000 agents renew over a 12-minute window."),
}
