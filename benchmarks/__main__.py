"""The benchmark suite: all its figures, each with its baseline from the same
run, written to ``results/latest.json`` and ``results/latest.md``.

    python3 -m benchmarks            # the full suite (about 15 minutes on 2 cores)
    python3 -m benchmarks --smoke    # tiny sizes, seconds: run in CI so it cannot rot
    python3 -m benchmarks --only replicas --out-dir /tmp/replicas   # some of them, results elsewhere

``replicas`` starts a PostgreSQL cluster of its own (``scripts/postgres``, as
root): nothing needs to be running beforehand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import certs, connections, login_flood, logs, overhead, pickup, replicas, scheduler
from benchmarks.figures import Figure, machine, raise_fd_limit
from benchmarks.notes import NOTES
from testhide.common.logging import configure
from tests.harness import REPO

SUITE: dict[str, Callable[[bool], Awaitable[Figure | list[Figure]]]] = {
    "overhead": overhead.measure,
    "pickup": pickup.measure,
    "logs": logs.measure,
    "scheduler": scheduler.measure,
    "connections": connections.measure,
    "certs": certs.measure,
    "login_flood": login_flood.measure,
    "replicas": replicas.measure,
}


def commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", ".", ":!benchmarks/results")),
    }


def markdown(result: dict[str, Any]) -> str:
    source = result["source"]
    header = (
        f"Commit `{source['commit'][:12]}`{' (with uncommitted changes)' if source['dirty'] else ''}, "
        f"{result['finished_at']}, {result['machine']['cpus']} cores, "
        f"{result['machine']['memory_mib']:,} MiB, Python {result['machine']['python']}. "
        f"Run with `python3 -m benchmarks{' --smoke' if result['smoke'] else ''}` "
        f"in {result['duration_s']:.0f} s."
    )
    lines = [
        f"# Benchmark results{' (smoke)' if result['smoke'] else ''}",
        "",
        header,
        "",
        "| figure | value | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in result["figures"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[f["met"]]
        lines.append(
            f"| {f['title']} | {f['value']:,} {f['unit']} | {f['baseline']:,} {f['baseline_unit']} "
            f"({f['baseline_what']}) | {f['ratio']} | {f['goal']} | {met} |"
        )
    lines += ["", "## Notes", ""]
    for f in result["figures"]:
        lines.append(f"- **{f['title']}**: {f['note'] or '-'}")
        lines.append(f"  Details: `{json.dumps(f['details'])}`")
    return "\n".join(lines) + "\n"


async def run(names: list[str], smoke: bool) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    failed: list[str] = []
    for name in names:
        started = time.monotonic()
        try:
            produced = await SUITE[name](smoke)
        except Exception:  # one broken benchmark must not cost the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        for figure in produced if isinstance(produced, list) else [produced]:
            figure.note = NOTES.get(figure.name, "")
            figure.details["seconds_to_measure"] = round(time.monotonic() - started, 1)
            figures.append(figure)
            print(
                f"{figure.title}: {figure.value} {figure.unit} vs {figure.baseline} {figure.baseline_unit}"
                f" -> ratio {figure.ratio} (goal {figure.goal}; met: {figure.met})",
                flush=True,
            )
    return figures, failed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds: keeps the suite from rotting"
    )
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--renote",
        action="store_true",
        help="only rewrite the notes of the results in --out-dir from notes.py",
    )
    args = parser.parse_args()
    if args.renote:
        path = args.out_dir / "latest.json"
        result = json.loads(path.read_text())
        for figure in result["figures"]:
            figure["note"] = NOTES.get(figure["name"], "")
        path.write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "latest.md").write_text(markdown(result))
        return
    configure("warning")
    raise_fd_limit()
    source = commit()
    started = time.monotonic()
    figures, failed = asyncio.run(run(args.only, args.smoke))
    result = {
        "smoke": args.smoke,
        "source": source,
        "machine": machine(),
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.monotonic() - started, 1),
        "figures": [f.as_dict() for f in figures],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "latest.md").write_text(markdown(result))
    print(f"wrote {args.out_dir / 'latest.json'} and latest.md")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
