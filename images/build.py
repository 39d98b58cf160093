"""Build the local job images without any registry: root filesystems made here
and loaded with ``docker import``.

- testhide/busybox:1  FROM-scratch style: Debian's static busybox and its applets.
- testhide/python:1   a minimal Debian (debootstrap) with python3 and pytest, for
                      real test suites; built only when asked (--python), ~50 s.
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import docker

BUSYBOX_IMAGE = "testhide/busybox:1"
PYTHON_IMAGE = "testhide/python:1"
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
    import subprocess
    import tempfile

    try:
        client.images.get(PYTHON_IMAGE)
        if not force:
            print(f"{PYTHON_IMAGE} present")
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
                "--include=python3,python3-pytest",
                "bookworm",
                root,
                debian_mirror(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        repository, tag = PYTHON_IMAGE.split(":")
        client.api.import_image(
            src=tar.stdout,
            repository=repository,
            tag=tag,
            changes=["ENV PATH=/usr/local/bin:/usr/bin:/bin", 'CMD ["/usr/bin/python3"]'],
        )
        tar.wait()
    print(f"{PYTHON_IMAGE} built")


if __name__ == "__main__":
    engine = docker.from_env()
    build(engine, force="--force" in sys.argv)
    if "--python" in sys.argv:
        build_python(engine, force="--force" in sys.argv)
