"""Build the local job images without any registry: root filesystems made here
and loaded with ``docker import``.

- testhide/busybox:1  FROM-scratch style: Debian's static busybox and its applets.
- testhide/python:1   a minimal Debian (debootstrap) with python3 and pytest, for
                      real test suites; built only when asked (--python), ~50 s.
- testhide/agent-base:1  the same with python3 and python3-venv, trimmed: the base of
                      Dockerfile.agent (images/agent.py builds the agent image on it).
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import docker

BUSYBOX_IMAGE = "testhide/busybox:1"
PYTHON_IMAGE = "testhide/python:1"
AGENT_BASE_IMAGE = "testhide/agent-base:1"
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


def _busybox_path() -> str:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if shutil.which(candidate):
            return candidate
    raise SystemExit("busybox-static is not installed (apt-get install busybox-static)")


def busybox_rootfs() -> bytes:
    import subprocess

    busybox = _busybox_path()
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("tmp", 0o1777),
            ("proc", 0o755),
            ("sys", 0o755),
            ("dev", 0o755),
            ("root", 0o700),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            archive.addfile(info)
        archive.add(busybox, "bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            archive.addfile(link)
        for name, data in (("etc/passwd", _PASSWD), ("etc/group", _GROUP)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build(client: docker.DockerClient, force: bool = False) -> None:
    try:
        client.images.get(BUSYBOX_IMAGE)
        if not force:
            print(f"{BUSYBOX_IMAGE} present")
            return
    except docker.errors.ImageNotFound:
        pass
    repository, tag = BUSYBOX_IMAGE.split(":")
    client.api.import_image_from_data(
        busybox_rootfs(), repository=repository, tag=tag, changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]']
    )
    print(f"{BUSYBOX_IMAGE} built")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    import re
    from pathlib import Path

    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        if source.is_file():
            for match in re.finditer(
                r"(?:^deb|^URIs:)\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s*$|"
                r"(?:^deb|^URIs:)\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s",
                source.read_text(),
                re.M,
            ):
                return match.group(1) or match.group(2)
    raise SystemExit("no Debian mirror found in the apt sources")


def build_python(client: docker.DockerClient, force: bool = False) -> None:
    _build_debian(client, PYTHON_IMAGE, ["python3", "python3-pytest"], force=force)


def build_agent_base(client: docker.DockerClient, force: bool = False) -> None:
    """The base of Dockerfile.agent: Debian 12 minbase with python3 and python3-venv, without apt's
    package lists and cached .debs, documentation (copyright files kept), manuals and translations."""
    _build_debian(client, AGENT_BASE_IMAGE, ["python3", "python3-venv"], force=force, trim=True)


def _trim(root: str) -> None:
    """What a daemon never reads; what is left of the agent base is 125 MB."""
    from pathlib import Path

    top = Path(root)
    # apt's own directories stay, so `apt-get update` works in an image built on this one.
    patterns = ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb")
    doomed = [entry for pattern in patterns for entry in top.glob(pattern)]
    doomed += [entry for name in ("man", "info", "locale") for entry in (top / "usr/share" / name).glob("*")]
    # Not glob("*/*"): that would follow the doc directories that are symlinks to others.
    documented = [package for package in (top / "usr/share/doc").iterdir() if not package.is_symlink()]
    doomed += [
        entry
        for package in documented
        if package.is_dir()
        for entry in package.iterdir()
        if entry.name != "copyright"
    ]
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _build_debian(
    client: docker.DockerClient, image: str, packages: list[str], force: bool, trim: bool = False
) -> None:
    """``debootstrap --variant=minbase`` of bookworm with ``packages``, imported as ``image``."""
    import subprocess
    import tempfile

    try:
        client.images.get(image)
        if not force:
            print(f"{image} present")
            return
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="testhide-rootfs-") as root:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                "bookworm",
                root,
                debian_mirror(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        if trim:
            _trim(root)
        repository, tag = image.split(":")
        # As a context manager, so that the pipe is closed (an open one is a ResourceWarning in pytest).
        with subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE) as tar:
            assert tar.stdout is not None
            client.api.import_image(
                src=tar.stdout,
                repository=repository,
                tag=tag,
                changes=["ENV PATH=/usr/local/bin:/usr/bin:/bin", 'CMD ["/usr/bin/python3"]'],
            )
        if tar.returncode != 0:
            raise SystemExit(f"tar of the {image} root filesystem exited {tar.returncode}")
    print(f"{image} built")


if __name__ == "__main__":
    engine = docker.from_env()
    build(engine, force="--force" in sys.argv)
    if "--python" in sys.argv:
        build_python(engine, force="--force" in sys.argv)
