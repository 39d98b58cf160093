"""The agent image, ``Dockerfile.agent``, built with no registry and no network inside the build.

    python -m images.agent [--tag TAG] [--base IMAGE]   # from the repository's root, with its venv
    python -m images.agent --context DIR                # only write the build context, for `docker build`

The base is a local image (testhide/agent-base:1 by default: Debian 12 minbase with python3 and
python3-venv, made by debootstrap and ``docker import``; built here once and kept, like
testhide/python:1). The build context holds Dockerfile.agent and ``wheels/``:

- testhide's own wheel, built from a copy of pyproject.toml, README.md and src/, so no build output
  lands in the working tree;
- the part of requirements.lock that testhide needs at run time. The lock also pins the test and build
  tools and marks nothing, so pip's resolver decides: ``pip download`` of testhide's wheel with the whole
  lock as constraints (versions only), for the base's own interpreter, glibc and architecture (asked of
  the base), into a staging directory. The lock's entries for what it picked, hashes and all, become
  ``wheels/requirements.txt``; ``pip download --require-hashes --no-index`` copies the files from staging
  alone (isolated from pip's configuration) and refuses any whose sha256 the lock does not list; each
  file is checked against the lock once more, and the image installs them with ``--require-hashes
  --no-index``. The files come from whatever index pip is configured with on this host.

The build runs with ``network_mode="none"`` through the Engine's build API: the classic builder, which
every Engine has (nothing in the Dockerfile needs BuildKit, and the build needs no buildx). The install
stage is built under a temporary tag and removed afterwards, so no untagged image is left behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.models.images import Image
from packaging.utils import canonicalize_name, parse_wheel_filename

from images.build import AGENT_BASE_IMAGE, build_agent_base
from testhide import __version__

REPO = Path(__file__).resolve().parent.parent
AGENT_IMAGE = f"testhide/agent:{__version__}"
AGENT_UID = 10001  # also its gid; Dockerfile.agent
DATA_DIR = "/var/lib/testhide-agent"
_HASH_OPTION = re.compile(r"[ \t]*\\\n[ \t]*--hash=sha256:[0-9a-f]{64}")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
# Legacy names of manylinux_2_5, _2_12 and _2_17: older wheels carry only these.
_LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
_PROBE = (
    "import json, platform; "
    "print(json.dumps([platform.python_version(), platform.libc_ver()[1], platform.machine()]))"
)


@dataclass(frozen=True)
class Target:
    """The interpreter the wheels are for: the base image's python3."""

    python: str  # "3.11.2"
    glibc: str  # "2.36"
    machine: str  # "x86_64"

    def pip_options(self) -> list[str]:
        major, minor = self.python.split(".")[:2]
        glibc_major, glibc_minor = (int(part) for part in self.glibc.split(".")[:2])
        assert glibc_major == 2, f"glibc {self.glibc}"
        platforms = []
        for version in range(5, glibc_minor + 1):
            platforms.append(f"manylinux_2_{version}_{self.machine}")
            if version in _LEGACY_MANYLINUX:
                platforms.append(f"{_LEGACY_MANYLINUX[version]}_{self.machine}")
        return [
            "--only-binary=:all:",
            "--implementation=cp",
            f"--python-version={self.python}",
            f"--abi=cp{major}{minor}",
            *(f"--platform={platform}" for platform in platforms),
        ]


def base_target(client: docker.DockerClient, base: str) -> Target:
    output = client.containers.run(base, ["python3", "-c", _PROBE], network_mode="none", remove=True)
    python, glibc, machine = json.loads(output)
    return Target(python, glibc, machine)


@dataclass(frozen=True)
class LockEntry:
    version: str
    hashes: frozenset[str]
    text: str  # as written in the lock: the pin, its marker, its hashes


def lock_entries(lock: str) -> dict[str, LockEntry]:
    """Each pinned distribution in the lock, by canonical name."""
    entries: dict[str, LockEntry] = {}
    for block in re.split(r"\n(?=[^\s#])", lock):
        pin = _PIN.match(block)
        if pin:
            entry = LockEntry(pin.group(2), frozenset(_HASH.findall(block)), block.strip())
            entries[canonicalize_name(pin.group(1))] = entry
    return entries


def _pip(*args: str, isolated: bool = False) -> None:
    """pip of this venv, with this host's pip configuration (its index) unless ``isolated`` (then no
    configuration file or PIP_ variable counts); its output only if it fails."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    environment = os.environ.copy()
    if isolated:
        command.insert(3, "--isolated")
        environment["PIP_CONFIG_FILE"] = os.devnull
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"pip {args[0]} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def testhide_wheel(dest: Path, work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(source))
    (wheel,) = dest.glob("testhide-*.whl")
    return wheel


def runtime_entries(wheel: Path, lock: str, target: Target, staging: Path) -> list[str]:
    """The lock's entries for what ``wheel`` needs at run time on ``target``; their files land in
    ``staging``, not yet checked."""
    constraints = staging.parent / "constraints.txt"
    constraints.write_text(_HASH_OPTION.sub("", lock))
    _pip("download", "-d", str(staging), "-c", str(constraints), *target.pip_options(), str(wheel))
    picked = {parse_wheel_filename(path.name)[0] for path in staging.glob("*.whl")} - {"testhide"}
    entries = lock_entries(lock)
    missing = sorted(picked - set(entries))
    if missing:
        raise SystemExit(f"needed at run time but not in requirements.lock: {missing} (run scripts/lock.py)")
    return [entries[name].text for name in sorted(picked)]


def wheelhouse(dest: Path, target: Target) -> None:
    """``dest``: testhide's wheel, the locked wheels it runs on, and requirements.txt naming them all
    with their hashes."""
    dest.mkdir()
    lock = (REPO / "requirements.lock").read_text()
    with tempfile.TemporaryDirectory(prefix="testhide-wheels-") as directory:
        work = Path(directory)
        wheel = testhide_wheel(dest, work)
        staging = work / "staging"
        runtime = runtime_entries(wheel, lock, target, staging)
        copy_locked(runtime, staging, dest, target)
    ours = f"testhide=={__version__} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}"
    (dest / "requirements.txt").write_text("\n".join([*runtime, ours]) + "\n")
    check_wheelhouse(dest, lock)


def copy_locked(runtime: list[str], staging: Path, dest: Path, target: Target) -> None:
    """The files of the lock entries ``runtime`` from ``staging`` into ``dest``, offline and from
    ``staging`` alone; pip refuses any file whose sha256 the entry does not list."""
    requirements = staging.parent / "runtime.txt"
    requirements.write_text("\n".join(runtime) + "\n")
    fetch = ["download", "--require-hashes", "--no-index", "--find-links", str(staging), "-d", str(dest)]
    _pip(*fetch, "-r", str(requirements), *target.pip_options(), isolated=True)


def check_wheelhouse(wheels: Path, lock: str) -> None:
    """Every third-party file is a wheel whose sha256 the lock lists for its name and version."""
    entries = lock_entries(lock)
    for path in sorted(wheels.iterdir()):
        if path.name == "requirements.txt":
            continue
        name, version, _, _ = parse_wheel_filename(path.name)
        if name == "testhide":
            continue
        entry = entries.get(name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if entry is None or entry.version != str(version) or digest not in entry.hashes:
            raise SystemExit(f"{path.name} (sha256 {digest}) is not what requirements.lock pins")


def write_context(context: Path, target: Target) -> None:
    shutil.copy2(REPO / "Dockerfile.agent", context / "Dockerfile.agent")
    wheelhouse(context / "wheels", target)


def build_agent(client: docker.DockerClient, tag: str = AGENT_IMAGE, base: str = AGENT_BASE_IMAGE) -> Image:
    """Dockerfile.agent on ``base`` (which must exist: build_agent_base makes the default one)."""
    with tempfile.TemporaryDirectory(prefix="testhide-agent-context-") as directory:
        context = Path(directory)
        write_context(context, base_target(client, base))
        return build_context(client, context, tag, base)


def build_context(client: docker.DockerClient, context: Path, tag: str, base: str) -> Image:
    """The image from a context write_context made. The install stage is built first under a
    temporary tag, so that it can be removed afterwards rather than left as an untagged image."""
    stage = f"testhide/agent-install:{uuid.uuid4().hex[:12]}"
    _docker_build(client, context, tag=stage, target="install", buildargs={"BASE": base})
    try:
        return _docker_build(client, context, tag=tag, buildargs={"BASE": base})
    finally:
        client.images.remove(stage)


def _docker_build(client: docker.DockerClient, context: Path, **options: object) -> Image:
    try:
        image, _ = client.images.build(
            path=str(context),
            dockerfile="Dockerfile.agent",
            pull=False,
            rm=True,
            forcerm=True,
            network_mode="none",
            **options,  # type: ignore[arg-type]
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(line.get("stream") or line.get("error") or "") for line in exc.build_log)
        raise SystemExit(f"docker build of Dockerfile.agent failed: {exc.msg}\n{log}") from exc
    return image


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m images.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default=AGENT_IMAGE, help=f"the image's name (default {AGENT_IMAGE})")
    parser.add_argument("--base", default=AGENT_BASE_IMAGE, help="a local image with python3-venv")
    parser.add_argument("--context", type=Path, help="only write the build context into this new directory")
    options = parser.parse_args()
    client = docker.from_env()
    if options.base == AGENT_BASE_IMAGE:
        build_agent_base(client)
    if options.context:
        options.context.mkdir(parents=True)
        write_context(options.context, base_target(client, options.base))
        context = options.context
        print(f"docker build -f {context}/Dockerfile.agent --build-arg BASE={options.base} {context}")
        return
    image = build_agent(client, options.tag, options.base)
    print(f"{options.tag} built ({image.short_id})")


if __name__ == "__main__":
    main()
