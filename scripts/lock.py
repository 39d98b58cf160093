"""The hashed lock of every runtime, test and build dependency: `requirements.lock`.

    python scripts/lock.py            # re-resolve after editing pyproject.toml (needs the package index)
    python scripts/lock.py --upgrade  # the same, taking the newest versions allowed
    python scripts/lock.py --check    # offline: fails when the lock no longer matches pyproject.toml

The lock is resolved by uv for every platform and Python version the project supports (`--universal`), so
one file serves Debian 12's Python 3.11.2 and newer ones alike; scripts/host-setup installs it with
`pip install --require-hashes`. Its first line records a digest of what it was resolved from (the
dependencies, its extras (`test`, `psycopg`, `pkcs11`) and the build requirements of pyproject.toml);
`--check` recomputes that digest and also checks that every declared requirement is pinned at a
version it allows.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
DIGEST_LINE = re.compile(r"^# inputs sha256: ([0-9a-f]{64})$", re.MULTILINE)
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)
HEADER = """\
# inputs sha256: {digest}
# The hashed lock of pyproject.toml's dependencies, its extras and its build requirements.
# Do not edit: regenerate with `python scripts/lock.py` (README: "Dependencies and the lock").
"""


def declared_requirements() -> list[str]:
    """Everything the lock must satisfy, as written in pyproject.toml, in a stable order."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    requirements = [
        *project["dependencies"],
        *(line for extra in project.get("optional-dependencies", {}).values() for line in extra),
        *pyproject["build-system"]["requires"],
    ]
    return sorted(str(Requirement(line)) for line in requirements)


def inputs_digest(requirements: list[str]) -> str:
    return hashlib.sha256("\n".join(requirements).encode()).hexdigest()


def check() -> list[str]:
    """What is wrong with the lock, as sentences; empty when it matches pyproject.toml."""
    if not LOCK.exists():
        return [f"{LOCK.name} is missing"]
    text = LOCK.read_text()
    requirements = declared_requirements()
    problems = []
    recorded = DIGEST_LINE.search(text)
    if not recorded or recorded.group(1) != inputs_digest(requirements):
        problems.append("pyproject.toml's dependencies changed since the lock was made")
    pins = {canonicalize_name(name): version for name, version in PIN_LINE.findall(text)}
    for line in requirements:
        requirement = Requirement(line)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is declared but not locked")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} is locked at {version}, outside {requirement.specifier}")
    unhashed = [name for name, _ in PIN_LINE.findall(text) if not _has_hash(text, name)]
    problems.extend(f"{name} is locked without a hash" for name in unhashed)
    return problems


def _has_hash(text: str, name: str) -> bool:
    entry = re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==.*?(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    return entry is not None and "--hash=sha256:" in entry.group(0)


def resolve(upgrade: bool) -> None:
    requirements = declared_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "requirements.in"
        inputs.write_text("\n".join(requirements) + "\n")
        output = Path(tmp) / "requirements.lock"
        if LOCK.exists():
            output.write_text(LOCK.read_text())  # uv keeps the pins it finds there unless --upgrade
        command = [
            sys.executable, "-m", "uv", "pip", "compile", str(inputs), "--output-file", str(output),
            "--generate-hashes", "--universal", "--python-version", "3.11", "--no-header", "--quiet",
            "--no-annotate",
        ]  # fmt: skip
        if upgrade:
            command.append("--upgrade")
        subprocess.run(command, check=True)
        body = DIGEST_LINE.sub("", output.read_text()).lstrip("\n")
        body = "\n".join(line for line in body.splitlines() if not line.startswith("# ")) + "\n"
    LOCK.write_text(HEADER.format(digest=inputs_digest(requirements)) + body)


def main() -> int:
    if "--check" in sys.argv[1:]:
        problems = check()
        for problem in problems:
            print(f"lock: {problem}; run `python scripts/lock.py`", file=sys.stderr)
        return 1 if problems else 0
    resolve(upgrade="--upgrade" in sys.argv[1:])
    problems = check()
    if problems:
        print("lock: the resolved lock does not pass its own check:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"wrote {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
