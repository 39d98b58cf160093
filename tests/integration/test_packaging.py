"""Installing testhide puts one package in site-packages, as a user gets it.

The wheel is built from a copy of the repository (so the build leaves no ``build/`` or ``*.egg-info``
behind in the working tree, and stale build output there cannot leak into the wheel), then installed
without ``--editable`` into a fresh venv of the same base interpreter that already holds the locked
dependencies. Every command then runs from that venv's ``bin/`` with the working directory outside
the repository and no ``PYTHONPATH``, so ``src/`` cannot be imported by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from testhide import __version__
from tests.harness import REPO

# About 25-30 s, nearly all of it unpacking the locked dependencies (mypy, ruff, uv, ...) into the fresh venv.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PACKAGE = "testhide"
DIST_INFO = f"{PACKAGE}-{__version__}.dist-info"
PROGRAMS = ("testhide", "testhide-controlplane", "testhide-agent")
# What the wheel carries beside modules: the typing marker, the protos' typed stubs, the contract.
SHIPPED_SUFFIXES = {".py", ".pyi", ".proto", ".typed"}
NOT_SHIPPED = {"tests", "benchmarks", "scripts", "images", "conftest.py"}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site_before: frozenset[str]
    site_after: frozenset[str]
    env: dict[str, str]
    work: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a program from the fresh venv's bin/, from a directory outside the repository."""
        return subprocess.run(
            [str(self.venv / "bin" / argv[0]), *argv[1:]],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def clean_env(venv: Path) -> dict[str, str]:
    """The environment minus what could import the repository's src/ or steer the programs."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
        and not name.startswith("TESTHIDE_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", os.defpath)])
    return env


def checked(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, f"{argv} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def copy_of_repository(destination: Path) -> Path:
    """The source tree without VCS data, venvs, caches or earlier build output."""

    def ignored(directory: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".pyc")}
        if Path(directory) == REPO:
            skipped |= {
                name
                for name in names
                if name.startswith(".") or name in {"build", "dist"} or name.endswith(".egg-info")
            }
        return skipped

    return Path(shutil.copytree(REPO, destination, ignore=ignored))


def site_packages(python: Path, env: dict[str, str], cwd: Path) -> list[Path]:
    """Where pip installs pure and binary packages (one directory in a venv, but ask rather than guess)."""
    program = "import sysconfig\nfor scheme in ('purelib', 'platlib'): print(sysconfig.get_path(scheme))"
    return sorted({Path(line) for line in checked([str(python), "-c", program], env, cwd).splitlines()})


def snapshot(directories: list[Path]) -> frozenset[str]:
    return frozenset(entry.name for directory in directories for entry in directory.iterdir())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    work = root / "work"
    work.mkdir()
    venv = root / "fresh"
    env = clean_env(venv)
    source = copy_of_repository(root / "source")
    wheels = root / "wheels"
    build = ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)]
    checked([sys.executable, "-m", "pip", "--disable-pip-version-check", *build], env, work)
    # A venv of the interpreter this venv was made from, not a venv nested in a venv.
    base_python = str(getattr(sys, "_base_executable", sys.executable))
    checked([base_python, "-m", "venv", str(venv)], env, work)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", "install"]
    checked([*pip, "--require-hashes", "--no-deps", "-r", str(REPO / "requirements.lock")], env, work)
    directories = site_packages(python, env, work)
    before = snapshot(directories)
    (wheel,) = wheels.glob("*.whl")
    checked([*pip, "--no-deps", str(wheel)], env, work)
    return Installed(wheel, venv, before, snapshot(directories), env, work)


def test_the_wheel_is_named_for_the_version(installed: Installed) -> None:
    assert installed.wheel.name == f"{PACKAGE}-{__version__}-py3-none-any.whl"


def test_site_packages_gains_exactly_the_package_and_its_metadata(installed: Installed) -> None:
    assert installed.site_after - installed.site_before == {PACKAGE, DIST_INFO}
    assert installed.site_before - installed.site_after == set()


def wheel_names(wheel: Path) -> list[PurePosixPath]:
    with zipfile.ZipFile(wheel) as archive:
        return [PurePosixPath(name) for name in archive.namelist() if not name.endswith("/")]


def test_the_wheel_holds_one_package_and_no_tests_or_tools(installed: Installed) -> None:
    names = wheel_names(installed.wheel)
    assert {name.parts[0] for name in names} == {PACKAGE, DIST_INFO}
    with zipfile.ZipFile(installed.wheel) as archive:
        top_level = archive.read(f"{DIST_INFO}/top_level.txt").decode().split()
    assert top_level == [PACKAGE]
    assert [name for name in names if NOT_SHIPPED & set(name.parts)] == []
    assert [name for name in names if name.name.startswith("test_")] == []


def test_the_wheel_ships_every_source_file_and_the_typed_stubs(installed: Installed) -> None:
    shipped = {name for name in wheel_names(installed.wheel) if name.parts[0] == PACKAGE}
    source = {
        PurePosixPath(path.relative_to(REPO / "src").as_posix())
        for path in (REPO / "src" / PACKAGE).rglob("*")
        if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts
    }
    assert source - shipped == set()
    assert PurePosixPath(PACKAGE, "py.typed") in shipped
    protos = PurePosixPath(PACKAGE, "protos", "v1")
    generated = sorted(name for name in shipped if name.parent == protos and name.suffix == ".py")
    assert any(name.stem.endswith("_pb2") for name in generated)
    assert any(name.stem.endswith("_pb2_grpc") for name in generated)
    for module in generated:
        if module.stem.endswith(("_pb2", "_pb2_grpc")):
            assert module.with_suffix(".pyi") in shipped, f"{module} has no typed stub in the wheel"


@pytest.mark.parametrize("program", PROGRAMS)
def test_each_program_runs_from_the_fresh_venv(installed: Installed, program: str) -> None:
    result = installed.run(program, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {program} "), result.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_each_program_reports_the_packaged_version(installed: Installed, program: str) -> None:
    result = installed.run(program, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{program} {__version__}\n"


def test_the_package_is_imported_from_the_fresh_venv_not_the_repository(installed: Installed) -> None:
    result = installed.run("python", "-c", "import testhide; print(testhide.__file__)")
    assert result.returncode == 0, result.stderr
    imported = Path(result.stdout.strip()).resolve()
    assert imported.is_relative_to(installed.venv.resolve()), imported
    assert imported.parent.parent.name == "site-packages", imported
    assert not imported.is_relative_to(REPO), imported


def test_control_plane_init_makes_a_data_dir_and_prints_the_admin_key(installed: Installed) -> None:
    data_dir = installed.work / "cp"
    result = installed.run("testhide-controlplane", "init", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("thk_"), result.stdout
    for name in ("state.json", "ca.pem", "master.key", "testhide.db"):
        assert (data_dir / name).is_file(), name


def test_pip_check_finds_every_declared_dependency(installed: Installed) -> None:
    result = installed.run("python", "-m", "pip", "--disable-pip-version-check", "check")
    assert result.returncode == 0, result.stdout + result.stderr
