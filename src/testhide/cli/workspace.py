"""Packing the current directory as a job's workspace: in a git repository the
tracked and untracked-but-not-ignored files; elsewhere every file except those
a .testhideignore matches (gitignore syntax)."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import IO

import pathspec

from testhide.cli.errors import WorkspaceTooLarge
from testhide.common.sizes import describe_size

DEFAULT_CAP = 256 * 1024 * 1024
IGNORE_FILE = ".testhideignore"


def workspace_files(root: Path) -> list[str]:
    """Relative paths to pack, sorted."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        )
        return sorted({p for p in listed.stdout.decode().split("\0") if p and os.path.lexists(root / p)})
    except (OSError, subprocess.CalledProcessError):
        pass
    ignore_path = root / IGNORE_FILE
    spec = pathspec.GitIgnoreSpec.from_lines(
        ignore_path.read_text().splitlines() if ignore_path.is_file() else []
    )
    found = []
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = Path(directory).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if d != ".git" and not spec.match_file(f"{(relative_dir / d).as_posix()}/")
        )
        for name in filenames:
            relative = (relative_dir / name).as_posix()
            if not spec.match_file(relative):
                found.append(relative)
    return sorted(found)


def pack(root: Path, cap: int = DEFAULT_CAP) -> IO[bytes]:
    """A gzipped tar of the workspace in a temporary file, positioned at 0.
    Regular files and symlinks only; refuses above ``cap`` bytes of content."""
    files = workspace_files(root)
    total = sum(
        os.lstat(root / f).st_size for f in files if (root / f).is_file() and not (root / f).is_symlink()
    )
    if total > cap:
        raise WorkspaceTooLarge(
            f"the workspace holds {describe_size(total)}, above the {describe_size(cap)} cap; "
            f"exclude files with {IGNORE_FILE} (or .gitignore), or pass --no-workspace"
        )
    spool = tempfile.TemporaryFile()  # noqa: SIM115  # the caller closes it after the upload
    with tarfile.open(fileobj=spool, mode="w:gz", compresslevel=6) as archive:
        for relative in files:
            path = root / relative
            if path.is_symlink() or path.is_file():
                info = archive.gettarinfo(str(path), arcname=relative)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with open(path, "rb") as handle:
                        archive.addfile(info, handle)
                else:
                    archive.addfile(info)
    spool.seek(0)
    return spool
