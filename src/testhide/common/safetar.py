"""Tar archives from elsewhere, checked and unpacked the way tarfile's "data"
filter would, on every Python from 3.11.2 up.

Why not simply ``extractall(..., filter="data")``: Debian 12's own python3 is
3.11.2, and the filter came in 3.11.4. And where it exists, tarfile's own
extraction makes up for a hard link it cannot create by copying another
member, unfiltered; that, and ``os.path.realpath`` guessing at paths it cannot
resolve, is how the 2025 bypasses of the filter worked (CVE-2025-4138,
CVE-2025-4330, CVE-2025-4517).

``data_filter(member, dest)`` refuses what the stdlib's filter refuses (a
member landing outside ``dest``, a link whose target is absolute or outside,
a device, FIFO or other special file) by raising ``UnsafeMember``, and returns
a copy with the same sanitised attributes: no setuid, setgid or sticky bit, no
group or other write; a regular file readable and writable by its owner, and
executable by nobody unless by its owner; no mode of its own for a directory
or a symbolic link; no owner. Our implementation decides, the same on every
Python; where the stdlib has a filter it is asked too and may only refuse more.

``extract_all(archive, dest)`` unpacks member by member through that filter.

Deliberate differences from ``tarfile.data_filter``:

* an absolute member name is refused; the stdlib strips the leading ``/``;
* a path component that cannot be examined (a path too long, a loop of links,
  no permission) is refused, not guessed at (CVE-2025-4517);
* ``extract_all`` hard-links only to a regular file it has already extracted,
  never copies another member instead (CVE-2025-4138, CVE-2025-4330), replaces
  an existing file rather than writing through it, and checks once more at the
  end that every symbolic link it made resolves inside ``dest`` (a loop of links
  does not): links made later in the archive can redirect one that pointed
  inside when it was made.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable
from typing import TypeAlias

StrPath: TypeAlias = str | os.PathLike[str]

# Linux follows at most 40 symbolic links in one path lookup; so do we.
_MAX_LINK_HOPS = 40

_STDLIB_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None
)


class UnsafeMember(Exception):
    """An archive member the "data" filter refuses; the message names it and says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name!r} {reason}")
        self.name = name
        self.reason = reason


def data_filter(member: tarfile.TarInfo, dest: StrPath) -> tarfile.TarInfo:
    """``member`` as the "data" filter would extract it into ``dest`` (a copy),
    or ``UnsafeMember``. The same verdict and attributes on every Python."""
    safe = portable_data_filter(member, dest)
    if _STDLIB_DATA_FILTER is not None:
        try:
            _STDLIB_DATA_FILTER(member, os.fspath(dest))
        except tarfile.FilterError as exc:
            raise UnsafeMember(member.name, f"is refused by tarfile's data filter: {exc}") from exc
    return safe


def portable_data_filter(member: tarfile.TarInfo, dest: StrPath) -> tarfile.TarInfo:
    """Our implementation of the "data" filter alone (``data_filter`` is this,
    plus the stdlib's second opinion where there is one)."""
    name = member.name
    if name.startswith("/"):
        raise UnsafeMember(name, "has an absolute path")
    root = _resolve_or_refuse(name, os.path.abspath(dest))
    _require_inside(name, root, posixpath.join(root, name), "would be extracted outside the destination")
    mode: int | None
    if member.isreg() or member.islnk():
        mode = None if member.mode is None else _file_mode(member.mode)
    elif member.isdir() or member.issym():
        mode = None
    else:
        raise UnsafeMember(name, "is a special file (a device, a FIFO or of unknown type)")
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            raise UnsafeMember(name, f"links to the absolute path {target!r}")
        # A symbolic link's target is relative to the link's directory, a hard link's to the archive.
        base = posixpath.dirname(name) if member.issym() else ""
        _require_inside(name, root, posixpath.join(root, base, target), f"links to {target!r}, outside")
    safe = copy.copy(member)
    # tarfile reads None as "nothing from the archive"; typeshed types these fields as never None.
    safe.mode = mode  # type: ignore[assignment]
    safe.uid = safe.gid = None  # type: ignore[assignment]
    safe.uname = safe.gname = None  # type: ignore[assignment]
    return safe


def _file_mode(mode: int) -> int:
    mode &= 0o755  # no setuid, setgid or sticky bit, no group or other write
    if not mode & 0o100:
        mode &= ~0o111  # executable by nobody if not by the owner
    return mode | 0o600


def _require_inside(name: str, root: str, path: str, reason: str) -> None:
    resolved = _resolve_or_refuse(name, path)
    if os.path.commonpath([resolved, root]) != root:
        raise UnsafeMember(name, f"{reason} ({resolved!r} is not under {root!r})")


def _resolve_or_refuse(name: str, path: str) -> str:
    try:
        return _resolve(path)
    except OSError as exc:
        raise UnsafeMember(name, f"leads through a path that cannot be resolved safely: {exc}") from exc


def _resolve(path: str) -> str:
    """The real path the kernel would reach from the absolute ``path``: symbolic
    links followed, components not there (yet) taken as written. Where
    ``os.path.realpath`` silently stops resolving at a component it cannot
    examine and guesses the rest, this raises OSError."""
    resolved = "/"
    pending = path.split("/")[::-1]
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = posixpath.dirname(resolved)
            continue
        candidate = posixpath.join(resolved, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_link = False
        if not is_link:
            resolved = candidate
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending.extend(target.split("/")[::-1])
    return resolved


def extract_all(archive: tarfile.TarFile, dest: StrPath) -> None:
    """Unpack ``archive`` (opened for random access, not as a stream) into the
    directory ``dest`` through ``data_filter``, the same on every Python.

    Every member is checked before anything is written, and again just before
    it is written, against what is on disk by then. The first refusal stops the
    extraction with ``UnsafeMember``; what was written before it stays, inside
    ``dest``, less any symbolic link that leads out by then. Errors of the
    filesystem raise OSError.
    """
    os.makedirs(dest, exist_ok=True)
    root = _resolve(os.path.abspath(dest))
    members = archive.getmembers()
    for member in members:
        data_filter(member, root)
    directories: list[tarfile.TarInfo] = []
    links: list[str] = []
    try:
        for member in members:
            safe = data_filter(member, root)
            _extract_one(archive, safe, root)
            if safe.isdir():
                directories.append(safe)
            elif safe.issym():
                links.append(safe.name)
    finally:
        leading_out = _remove_links_leading_out(links, root)
    if leading_out:
        raise leading_out[0]
    for directory in sorted(directories, key=lambda d: d.name, reverse=True):
        _set_mtime(os.path.join(root, directory.name), directory)  # after their contents changed them


def _extract_one(archive: tarfile.TarFile, safe: tarfile.TarInfo, root: str) -> None:
    path = os.path.join(root, safe.name).rstrip("/")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if safe.isdir():
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)  # no mode of its own: the umask decides, as with tarfile
        return
    if safe.issym():
        _make_room(path)
        os.symlink(safe.linkname, path)
        return
    if safe.islnk():
        _hard_link(safe, os.path.join(root, safe.linkname), path)
    else:
        _make_room(path)
        source = archive.extractfile(safe)
        assert source is not None  # a regular file, by the filter
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
    os.chmod(path, safe.mode)
    _set_mtime(path, safe)


def _make_room(path: str) -> None:
    """A later member of the same name replaces an earlier one, as with tar; a
    link in the way is removed, never written through. A directory stays (and
    the member then fails with OSError)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _hard_link(safe: tarfile.TarInfo, source: str, path: str) -> None:
    try:
        is_file = stat.S_ISREG(os.lstat(source).st_mode)
    except FileNotFoundError:
        is_file = False
    if not is_file:
        # A link to a symbolic link would read its target from another directory; a copy of the
        # member instead (tarfile's fallback) would dodge the filter.
        raise UnsafeMember(safe.name, f"is a hard link to {safe.linkname!r}, not a file extracted before it")
    _make_room(path)
    os.link(source, path, follow_symlinks=False)


def _set_mtime(path: str, safe: tarfile.TarInfo) -> None:
    # As tarfile does, a time the filesystem cannot hold is not a reason to refuse the archive.
    with contextlib.suppress(OSError, OverflowError, ValueError):
        os.utime(path, (safe.mtime, safe.mtime), follow_symlinks=False)


def _remove_links_leading_out(names: list[str], root: str) -> list[UnsafeMember]:
    """Each link was checked when it was made, but a link made later can
    redirect it (``q -> m/k/../..`` is inside until ``m -> .`` comes)."""
    refusals = []
    for name in dict.fromkeys(names):
        path = os.path.join(root, name)
        if not os.path.islink(path):
            continue  # replaced by a later member
        try:
            resolved = _resolve(path)
        except OSError as exc:
            reason = f"is a link that cannot be resolved once the archive is extracted: {exc}"
        else:
            if os.path.commonpath([resolved, root]) == root:
                continue
            reason = f"is a link leading outside once the archive is extracted ({resolved!r})"
        os.unlink(path)
        refusals.append(UnsafeMember(name, reason))
    return refusals
