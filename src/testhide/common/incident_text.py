"""The scope of an incident for a person: `testhide-controlplane incident agent` and
`testhide admin incident agent` print the same report, rendered here from the one JSON
document both build (README, "Incident response")."""

from __future__ import annotations

from typing import Any


def incident_lines(document: dict[str, Any]) -> list[str]:
    """A header for the agent, a table of its jobs, the secrets by name, the artifacts,
    each job's verdict, then one summary line."""
    return [
        *_agent_lines(document),
        "",
        *_job_table(document["jobs"]),
        "",
        *_secret_lines(document["secrets"]),
        "",
        *_artifact_lines(document["jobs"]),
        "",
        *_verdict_lines(document["jobs"]),
        "",
        summary_line(document),
    ]


def summary_line(document: dict[str, Any]) -> str:
    s = document["summary"]
    cut = "; more jobs than one report holds: the oldest are left out (narrow with --since)"
    return (
        f"{s['jobs']} jobs, {s['secrets_exposed']} secrets exposed by name, {s['artifacts']} artifacts, "
        f"{s['verified']} verify / {s['failed']} fail / {s['unknown']} unknown"
        + (cut if document["truncated"] else "")
    )


def _agent_lines(document: dict[str, Any]) -> list[str]:
    a = document["agent"]
    serials = [f"{c['serial']} ({c['event']}, {c['issued_at']})" for c in document["certificates"]]
    since = document["since_at"]
    return [
        f"agent {a['id']} ({a['name']}), org {a['org']}, pool {a['pool']},"
        f" host {a['host'] or '-'}: {a['state']}",
        f"  enrolled {a['enrolled_at']}, last seen {a['last_seen_at'] or 'never'},"
        f" revoked {a['revoked_at'] or 'no'}",
        f"  certificate now {a['cert_serial']}, expires {a['cert_expires_at']}",
        "  certificates issued: " + ("; ".join(serials) or "none recorded"),
        f"  jobs not finished before {since}" if since else "  all its jobs",
    ]


def _job_table(jobs: list[dict[str, Any]]) -> list[str]:
    if not jobs:
        return ["no jobs"]
    columns = (
        "id",
        "org",
        "pool",
        "image",
        "status",
        "exit",
        "assigned_at",
        "started_at",
        "finished_at",
        "held",
    )
    rows = [
        {
            **{c: str(j.get(c) or "-") for c in columns},
            "exit": "-" if j["exit_code"] is None else str(j["exit_code"]),
            "held": "yes" if j["held"] else "taken back",
        }
        for j in jobs
    ]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    return ["  ".join(c.upper().ljust(widths[c]) for c in columns)] + [
        "  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows
    ]


def _secret_lines(secrets: list[dict[str, Any]]) -> list[str]:
    if not secrets:
        return ["secrets: none"]
    lines = ["secrets (names only; rotate those not changed since):"]
    for s in secrets:
        if s["deleted"]:
            now = "deleted since"
        elif s["changed_since"]:
            now = f"changed since ({s['updated_at']})"
        else:
            now = f"unchanged since {s['updated_at']}"
        lines.append(
            f"  {s['name']}: {len(s['job_ids'])} job(s), last handed {s['last_handed_at'] or '-'}, {now};"
            f" last used by {s['last_used_by_job'] or '-'}"
        )
    return lines


def _artifact_lines(jobs: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"  {j['id']} {a['path']} {a['size']} bytes sha256:{a['sha256'] or '-'}"
        for j in jobs
        for a in j["artifacts"]
    ]
    return ["artifacts:", *lines] if lines else ["artifacts: none"]


def _verdict_lines(jobs: list[dict[str, Any]]) -> list[str]:
    if not jobs:
        return ["verdicts: none"]
    word = {True: "verifies", False: "FAILS", None: "unknown"}
    return ["verdicts:"] + [f"  {j['id']}: {word[j['verifies']]}: {j['verdict']}" for j in jobs]
