"""Files in and out of a job: the workspace archive going in, artifacts and
JUnit reports coming out. Both directions treat the archive as hostile."""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from testhide.agent.errors import JobSetupError
from testhide.common.safetar import UnsafeMember, data_filter

WORKSPACE = "/workspace"


class UnsafeArchive(JobSetupError):
    """The workspace archive tried to reach outside /workspace or to create a device."""


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or "\x00" in name:
        raise UnsafeArchive(f"workspace archive refused: absolute path {name!r}")
    if ".." in parts:
        raise UnsafeArchive(f"workspace archive refused: path {name!r} leaves the workspace")
    if member.isdev() or member.isfifo():
        raise UnsafeArchive(f"workspace archive refused: {name!r} is a device or FIFO")
    if member.issym() or member.islnk():
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(
                f"workspace archive refused: link {name!r} -> {target!r} leaves the workspace"
            )


def repack_workspace(source: IO[bytes], uid: int, gid: int) -> bytes:
    """Validate a (possibly gzipped) tar and repack it for /workspace, owned by
    the job user, with permissions sanitised by the ``data`` filter (common/safetar.py)."""
    out = io.BytesIO()
    try:
        with (
            tarfile.open(fileobj=source, mode="r:*") as archive,
            tarfile.open(fileobj=out, mode="w") as packed,
        ):
            for member in archive:
                _check_member(member)
                try:
                    safe = data_filter(member, WORKSPACE)
                except UnsafeMember as exc:
                    raise UnsafeArchive(f"workspace archive refused: {exc}") from exc
                safe.uid, safe.gid, safe.uname, safe.gname = uid, gid, "", ""
                # The filter gives directories and links no mode of their own; tar needs one.
                if safe.isdir():
                    safe.mode = 0o755
                elif safe.issym():
                    safe.mode = 0o777
                data = archive.extractfile(member) if member.isreg() else None
                packed.addfile(safe, data)
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"workspace archive is not a valid tar: {exc}") from exc
    return out.getvalue()


@dataclass(frozen=True)
class CollectedFile:
    path: str
    kind: str
    data: bytes


@dataclass(frozen=True)
class Collection:
    files: list[CollectedFile]
    skipped: list[str]


def collect(
    archive_stream: IO[bytes],
    artifact_globs: tuple[str, ...],
    junit_globs: tuple[str, ...],
    max_file: int,
    max_total: int,
) -> Collection:
    """Regular files under /workspace matching the globs, from ``docker cp``'s
    tar of the workspace. Links are never followed: a symlink to /etc/shadow is
    a symlink, not a file, and is skipped."""
    import pathspec  # only here: its import alone costs an idle agent ~9 MiB

    artifacts = pathspec.GitIgnoreSpec.from_lines(artifact_globs)
    reports = pathspec.GitIgnoreSpec.from_lines(junit_globs)
    files: list[CollectedFile] = []
    skipped: list[str] = []
    total = 0
    with tarfile.open(fileobj=archive_stream, mode="r|*") as archive:
        for member in _members(archive):
            path = member.name.split("/", 1)[1] if "/" in member.name else ""
            kinds = [
                k
                for k, spec in (("junit", reports), ("artifact", artifacts))
                if path and spec.match_file(path)
            ]
            if not kinds:
                continue
            if not member.isreg():
                skipped.append(f"{path} (not a regular file)")
                continue
            if member.size > max_file or total + member.size > max_total:
                skipped.append(f"{path} ({member.size} bytes, over the limit)")
                continue
            handle = archive.extractfile(member)
            data = handle.read() if handle else b""
            total += len(data)
            files.extend(CollectedFile(path, kind, data) for kind in kinds)
    return Collection(files, skipped)


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in archive:
        if ".." in member.name.split("/") or member.name.startswith("/"):
            continue
        yield member
