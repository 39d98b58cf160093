"""Hostile workspace archives and artifact collection, on archives built here."""

from __future__ import annotations

import io
import tarfile

import pytest

from testhide.agent.jobfiles import UnsafeArchive, collect, repack_workspace


def archive(*members: tuple[str, str, bytes | str]) -> io.BytesIO:
    """(name, kind, data-or-linkname) with kind in file, dir, sym, hard, chr, fifo."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "hard": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            if kind in ("sym", "hard"):
                assert isinstance(payload, str)
                info.linkname = payload
            tar.addfile(info)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    "member",
    [
        ("../escape.txt", "file", b"x"),
        ("a/../../escape.txt", "file", b"x"),
        ("/etc/cron.d/evil", "file", b"x"),
        ("etc-link", "sym", "/etc"),
        ("sneaky", "sym", "../../etc/passwd"),
        ("deep/link", "sym", "../../outside"),
        ("hard", "hard", "/etc/shadow"),
        ("dev/null", "chr", ""),
        ("pipe", "fifo", ""),
    ],
)
def test_hostile_members_are_refused(member: tuple[str, str, bytes | str]) -> None:
    with pytest.raises(UnsafeArchive, match="refused"):
        repack_workspace(archive(("ok.txt", "file", b"fine"), member), 65534, 65534)


def test_safe_archives_are_repacked_for_the_job_user() -> None:
    packed = repack_workspace(
        archive(
            ("src", "dir", b""),
            ("src/main.py", "file", b"print(1)\n"),
            ("src/alias.py", "sym", "main.py"),
            ("docs/link", "sym", "../src/main.py"),
        ),
        1000,
        1001,
    )
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"src", "src/main.py", "src/alias.py", "docs/link"}
        assert all((m.uid, m.gid) == (1000, 1001) for m in members.values())
        main = tar.extractfile("src/main.py")
        assert main is not None
        assert main.read() == b"print(1)\n"
        assert members["src/alias.py"].linkname == "main.py"
        # The filter leaves directories and links without a mode; the repacked archive gives them one.
        assert [members[n].mode for n in ("src", "src/main.py", "src/alias.py")] == [0o755, 0o644, 0o777]


def test_garbage_is_not_an_archive() -> None:
    with pytest.raises(UnsafeArchive, match="not a valid tar"):
        repack_workspace(io.BytesIO(b"definitely not a tarball" * 100), 1, 1)


def test_collection_follows_no_links_and_respects_caps() -> None:
    workspace = archive(
        ("workspace/out", "dir", b""),
        ("workspace/out/report.txt", "file", b"results"),
        ("workspace/out/passwd", "sym", "/etc/passwd"),
        ("workspace/out/big.bin", "file", b"x" * 2048),
        ("workspace/reports/junit.xml", "file", b"<testsuite/>"),
        ("workspace/src/main.py", "file", b"ignored"),
    )
    found = collect(workspace, ("out/**",), ("reports/*.xml",), max_file=1024, max_total=10_000)
    assert [(f.path, f.kind, f.data) for f in found.files] == [
        ("out/report.txt", "artifact", b"results"),
        ("reports/junit.xml", "junit", b"<testsuite/>"),
    ]
    assert any("out/passwd" in s and "not a regular file" in s for s in found.skipped)
    assert any("out/big.bin" in s for s in found.skipped)
