"""The "data" filter of common/safetar.py on every Python, checked against
tarfile's own where this Python has one, and extraction of real archives."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from testhide.common import safetar
from testhide.common.safetar import UnsafeMember, data_filter, extract_all, portable_data_filter

STDLIB_HAS_FILTER = hasattr(tarfile, "data_filter")
REFUSED = "refused"


@dataclass(frozen=True)
class Case:
    """A member and what the filter makes of it: REFUSED, or the resulting mode."""

    id: str
    name: str
    kind: str  # file, dir, sym, hard, blk, chr, fifo
    expected: int | str | None
    mode: int = 0o644
    linkname: str = ""

    def member(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "sym": tarfile.SYMTYPE,
            "hard": tarfile.LNKTYPE,
            "blk": tarfile.BLKTYPE,
            "chr": tarfile.CHRTYPE,
            "fifo": tarfile.FIFOTYPE,
        }[self.kind]
        info.mode, info.linkname = self.mode, self.linkname
        info.uid, info.gid, info.uname, info.gname = 1234, 5678, "someone", "staff"
        return info


HOSTILE = [
    Case("absolute path", "/etc/cron.d/evil", "file", REFUSED),
    Case("dot-dot", "../x", "file", REFUSED),
    Case("dot-dot after a directory", "a/../../x", "file", REFUSED),
    Case("symlink to an absolute path", "passwd", "sym", REFUSED, linkname="/etc/passwd"),
    Case("symlink up and out", "a", "sym", REFUSED, linkname="../../x"),
    Case("symlink in a directory up and out", "deep/link", "sym", REFUSED, linkname="../../outside"),
    Case("hard link to an absolute path", "shadow", "hard", REFUSED, linkname="/etc/shadow"),
    Case("hard link outside", "h", "hard", REFUSED, linkname="../outside"),
    Case("block device", "sda", "blk", REFUSED),
    Case("character device", "dev/null", "chr", REFUSED),
    Case("FIFO", "pipe", "fifo", REFUSED),
]
BENIGN = [
    Case("plain file", "plain.txt", "file", 0o644),
    Case("setuid and setgid file", "tool", "file", 0o755, mode=0o6755),
    Case("group- and other-writable file", "shared.txt", "file", 0o644, mode=0o666),
    Case("group exec without owner exec", "half.sh", "file", 0o644, mode=0o654),
    Case("read-only file", "ro.txt", "file", 0o600, mode=0o400),
    Case("executable file", "run.sh", "file", 0o755, mode=0o775),
    Case("owner-only executable", "own.sh", "file", 0o700, mode=0o700),
    Case("directory", "src", "dir", None, mode=0o755),
    Case("sticky world-writable directory", "tmp", "dir", None, mode=0o1777),
    Case("symlink inside", "docs/link", "sym", None, mode=0o777, linkname="../src/main.py"),
    Case("symlink to its own directory", "here", "sym", None, mode=0o777, linkname="."),
    Case("hard link inside", "again.txt", "hard", 0o644, mode=0o664, linkname="plain.txt"),
    Case("dot-dot that stays inside", "a/../b.txt", "file", 0o644),
]
CASES = [pytest.param(case, id=case.id) for case in HOSTILE + BENIGN]


@pytest.mark.parametrize("case", CASES)
def test_our_filter(case: Case, tmp_path: Path) -> None:
    if case.expected == REFUSED:
        with pytest.raises(UnsafeMember, match=repr(case.name)):
            portable_data_filter(case.member(), tmp_path)
        return
    member = case.member()
    safe = portable_data_filter(member, tmp_path)
    assert safe.mode == case.expected
    assert [getattr(safe, owner) for owner in ("uid", "gid", "uname", "gname")] == [None] * 4
    assert (safe.name, safe.linkname, safe.type) == (member.name, member.linkname, member.type)
    assert (member.mode, member.uid) == (case.mode, 1234)  # the member itself is left alone


@pytest.mark.skipif(not STDLIB_HAS_FILTER, reason="this Python has no tarfile.data_filter")
@pytest.mark.parametrize("case", CASES)
def test_the_stdlib_filter_agrees(case: Case, tmp_path: Path) -> None:
    try:
        theirs: int | str | None = tarfile.data_filter(case.member(), str(tmp_path)).mode
    except tarfile.FilterError:
        theirs = REFUSED
    if case.id == "absolute path":  # deliberately stricter: the stdlib strips the leading "/"
        assert theirs == case.mode
    else:
        assert theirs == case.expected


@pytest.mark.parametrize("case", CASES)
def test_data_filter_gives_the_same_everywhere(case: Case, tmp_path: Path) -> None:
    if case.expected == REFUSED:
        with pytest.raises(UnsafeMember):
            data_filter(case.member(), tmp_path)
    else:
        assert data_filter(case.member(), tmp_path).mode == case.expected


@pytest.mark.skipif(not STDLIB_HAS_FILTER, reason="this Python has no tarfile.FilterError")
def test_a_refusal_by_the_stdlib_filter_is_ours_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        raise tarfile.FilterError("no, thanks")

    monkeypatch.setattr(safetar, "_STDLIB_DATA_FILTER", refuse)
    with pytest.raises(UnsafeMember, match=r"'plain\.txt' is refused by tarfile's data filter: no, thanks"):
        data_filter(Case("", "plain.txt", "file", 0o644).member(), tmp_path)


def test_a_path_through_a_loop_of_links_is_refused(tmp_path: Path) -> None:
    (tmp_path / "one").symlink_to("two")
    (tmp_path / "two").symlink_to("one")
    with pytest.raises(UnsafeMember, match="cannot be resolved safely"):
        data_filter(Case("", "one/file", "file", 0o644).member(), tmp_path)


def test_an_unexaminable_component_is_refused_not_guessed(tmp_path: Path) -> None:
    with pytest.raises(UnsafeMember, match="cannot be resolved safely"):
        data_filter(Case("", "x" * 300, "file", 0o644).member(), tmp_path)


# ------------------------------------------------------------------ extraction


def build(*members: tuple[tarfile.TarInfo, bytes]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r:")


def file(name: str, data: bytes = b"data", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.uid, info.gid = mode, 1_600_000_000, 4321, 4321
    return info, data


def entry(name: str, kind: bytes, linkname: str = "", mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, mode, 1_500_000_000
    return info, b""


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """An empty destination two levels down, so that an escape has somewhere to land."""
    path = tmp_path / "outer" / "dest"
    path.mkdir(parents=True)
    return path


def assert_nothing_outside(dest: Path) -> None:
    """Nothing was written beside ``dest``, and no link in it leads out."""
    assert sorted(p.name for p in dest.parent.parent.rglob("*") if dest not in (p, *p.parents)) == ["outer"]
    for path in dest.rglob("*"):
        if path.is_symlink():
            assert dest.resolve() in (path.resolve(), *path.resolve().parents), path


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in HOSTILE])
def test_a_hostile_archive_writes_nothing(case: Case, dest: Path) -> None:
    archive = build(file("first.txt"), (case.member(), b"evil"), file("after.txt"))
    with pytest.raises(UnsafeMember, match=repr(case.name)):
        extract_all(archive, dest)
    assert os.listdir(dest) == []  # every member is checked before anything is written
    assert_nothing_outside(dest)


def test_a_link_made_earlier_cannot_carry_a_later_member_out(dest: Path) -> None:
    # "l/../x" is inside while "l" is not there; once "l -> ." is, it is "../x".
    archive = build(file("first.txt"), entry("l", tarfile.SYMTYPE, "."), file("l/../x"), file("after.txt"))
    with pytest.raises(UnsafeMember, match=r"'l/\.\./x' would be extracted outside"):
        extract_all(archive, dest)
    assert sorted(os.listdir(dest)) == ["first.txt", "l"]
    assert_nothing_outside(dest)


def test_a_link_redirected_by_a_later_link_is_removed(dest: Path) -> None:
    # "q -> m/k/../.." leads to dest while "m" is not there; "m -> ." makes it lead to dest's parent.
    archive = build(entry("q", tarfile.SYMTYPE, "m/k/../.."), entry("m", tarfile.SYMTYPE, "."), file("ok"))
    with pytest.raises(UnsafeMember, match="'q' is a link leading outside"):
        extract_all(archive, dest)
    assert sorted(os.listdir(dest)) == ["m", "ok"]
    assert_nothing_outside(dest)


def test_a_loop_of_links_is_refused_at_the_end(dest: Path) -> None:
    archive = build(entry("a", tarfile.SYMTYPE, "b"), entry("b", tarfile.SYMTYPE, "a"))
    with pytest.raises(UnsafeMember, match="'a' is a link that cannot be resolved"):
        extract_all(archive, dest)
    assert os.listdir(dest) == ["b"]  # dangling once "a" is gone, and inside


def test_paths_too_long_for_realpath_are_refused(dest: Path) -> None:
    """CVE-2025-4517: short links to long directories make a path that
    os.path.realpath cannot examine; it guesses, the kernel does not."""
    long, steps = "d" * 247, "abcdefghijklmnop"
    members, via = [], ""
    for step in steps:
        members += [entry(f"{via}{long}", tarfile.DIRTYPE), entry(f"{via}{step}", tarfile.SYMTYPE, long)]
        via += f"{step}/"
    lever = f"{via}{'l' * 254}"
    members += [
        entry(lever, tarfile.SYMTYPE, "../" * len(steps)),
        entry("escape", tarfile.SYMTYPE, f"{lever}/../.."),
        file("escape/written-outside"),
    ]
    with pytest.raises(UnsafeMember, match="cannot be resolved safely"):
        extract_all(build(*members), dest)
    assert_nothing_outside(dest)
    assert not (dest / "escape").exists()


def test_a_hard_link_only_to_a_file_extracted_before_it(dest: Path) -> None:
    for target in ("later.txt", "alias", "dir"):
        archive = build(
            entry("dir", tarfile.DIRTYPE),
            entry("alias", tarfile.SYMTYPE, "dir/../first.txt"),
            entry("link", tarfile.LNKTYPE, target),
            file("later.txt"),
        )
        with pytest.raises(UnsafeMember, match=f"'link' is a hard link to '{target}', not a file"):
            extract_all(archive, dest / target)
        assert not (dest / target / "link").exists()


def test_a_benign_archive_round_trips_with_filtered_modes(dest: Path) -> None:
    archive = build(
        entry("src", tarfile.DIRTYPE, mode=0o700),
        file("src/main.py", b"print(1)\n", mode=0o4775),
        file("src/data.txt", b"numbers", mode=0o666),
        file("src/ro.txt", b"frozen", mode=0o444),
        entry("src/alias.py", tarfile.SYMTYPE, "main.py"),
        entry("src/again.py", tarfile.LNKTYPE, "src/main.py", mode=0o755),
        file("docs/deep/readme", b"implicit parents"),
        file("src/data.txt", b"the later one wins", mode=0o600),
    )
    umask = os.umask(0o022)
    try:
        extract_all(archive, dest)
    finally:
        os.umask(umask)
    src = dest / "src"
    assert (src / "main.py").read_bytes() == b"print(1)\n"
    assert (src / "data.txt").read_bytes() == b"the later one wins"
    assert (dest / "docs" / "deep" / "readme").read_bytes() == b"implicit parents"
    modes = {p: stat.S_IMODE(os.lstat(src / p).st_mode) for p in ("main.py", "data.txt", "ro.txt")}
    assert modes == {"main.py": 0o755, "data.txt": 0o600, "ro.txt": 0o644}
    assert stat.S_IMODE(src.stat().st_mode) == 0o755  # no mode of its own: the umask's
    assert os.readlink(src / "alias.py") == "main.py"
    assert (src / "again.py").samefile(src / "main.py")
    assert (src / "ro.txt").stat().st_mtime == 1_600_000_000
    assert src.stat().st_mtime == 1_500_000_000
    assert (src / "main.py").stat().st_uid == os.getuid()
    assert_nothing_outside(dest)


def test_a_file_replaces_a_link_instead_of_writing_through_it(dest: Path) -> None:
    archive = build(file("target.txt", b"keep"), entry("l", tarfile.SYMTYPE, "target.txt"), file("l", b"new"))
    extract_all(archive, dest)
    assert (dest / "target.txt").read_bytes() == b"keep"
    assert not (dest / "l").is_symlink()
    assert (dest / "l").read_bytes() == b"new"
