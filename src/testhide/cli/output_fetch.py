"""What `testhide jobs show` prints of what runs beside a job's command: its fetch step as
asked for (command, fetch secrets by name, cache key) and as it ran (cache hit or miss,
exit code, duration, and every request its egress proxy saw, allowed or refused), and its
services. For people and for `--json` (the convention of `cli/output.py`)."""

from __future__ import annotations

import shlex
from typing import Any

from testhide.cli.model import EgressRequest, FetchStep, Job, JobSpec, JobStatus, Service
from testhide.cli.output import isolation_json, timestamp

# JSON ---------------------------------------------------------------------------------------


def spec_fetch_json(spec: JobSpec) -> dict[str, Any]:
    """The spec's fields about the fetch step and the services."""
    return {
        "fetch": spec.fetch or None,
        "fetch_secrets": list(spec.fetch_secrets),
        "cache": spec.cache or None,
        "services": [_service_json(s) for s in spec.services],
    }


def _service_json(service: Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "image": service.image,
        "command": list(service.command),
        "env": dict(service.env),
        "tmpfs": list(service.tmpfs),
    }


def fetch_json(fetch: FetchStep | None) -> dict[str, Any] | None:
    if fetch is None:
        return None
    return {
        "cache": fetch.cache,
        "running": fetch.running,
        "exit_code": fetch.exit_code,
        "duration_s": fetch.duration_s,
        "requests": [_request_json(r) for r in fetch.requests],
        "isolation": isolation_json(fetch.isolation),
    }


def _request_json(request: EgressRequest) -> dict[str, Any]:
    return {
        "at": timestamp(request.at),
        "method": request.method,
        "host": request.host,
        "port": request.port,
        "allowed": request.allowed,
        "http_status": request.http_status or None,
        "sent_bytes": request.bytes_sent,
        "received_bytes": request.bytes_received,
    }


# For people ---------------------------------------------------------------------------------


def fetch_rows(spec: JobSpec) -> list[tuple[str, str]]:
    """The spec's rows about the fetch step: its command (secrets by name) and cache key."""
    if not spec.fetch:
        return [("fetch", "")]
    secrets = f"  (secrets: {', '.join(spec.fetch_secrets)})" if spec.fetch_secrets else ""
    return [("fetch", f"{spec.fetch}{secrets}"), ("cache", spec.cache)]


def service_lines(spec: JobSpec) -> list[str]:
    """One line for each service, under "services:"; their env is not secret (as the job's)."""
    if not spec.services:
        return ["services:   -"]
    lines = ["services:"]
    for s in spec.services:
        parts = [f"  {s.name}: {s.image}", f"command {shlex.join(s.command) or '(the image default)'}"]
        parts += [f"env {' '.join(f'{k}={v}' for k, v in s.env.items())}"] if s.env else []
        parts += [f"tmpfs {', '.join(s.tmpfs)}"] if s.tmpfs else []
        lines.append(", ".join(parts))
    return lines


_CACHE = {
    "hit": "restored from the cache, fetch step skipped",
    "miss": "not in the cache: fetched, then kept",
    "none": "no cache",
}


def fetch_step_lines(job: Job) -> list[str]:
    """The "fetch step:" part, once the fetch step ran (or its cache was restored)."""
    fetch = job.fetch
    if fetch is None:
        return ["fetch step: - (not run yet)"] if job.spec.fetch else []
    cache = _CACHE.get(fetch.cache, fetch.cache or "-")
    if fetch.running:  # its container started; no report of its end (yet)
        live = job.status in (JobStatus.ASSIGNED, JobStatus.RUNNING)
        state = "running" if live else "stopped with the job before its end"
        return ["fetch step:", f"  {state} (cache {fetch.cache or '-'}: {cache})"]
    lines = [
        "fetch step:",
        f"  cache {fetch.cache or '-'} ({cache}), exit code {fetch.exit_code}, {fetch.duration_s:.1f}s",
    ]
    if not fetch.requests:
        return [*lines, "  no requests through the egress proxy"]
    header = (
        f"  {'TIME':<27} {'METHOD':<7} {'HOST:PORT':<32} {'VERDICT':<8} {'STATUS':>6} {'SENT':>10} RECEIVED"
    )
    lines.append(header)
    for r in fetch.requests:
        where, verdict = f"{r.host}:{r.port}", "allowed" if r.allowed else "REFUSED"
        status = str(r.http_status) if r.http_status else "-"
        lines.append(
            f"  {timestamp(r.at):<27} {r.method:<7} {where:<32} {verdict:<8} {status:>6} "
            f"{r.bytes_sent:>10} {r.bytes_received}"
        )
    return lines
