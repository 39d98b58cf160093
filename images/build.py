"""Build the local job images without any registry: root filesystems made here
and loaded with ``docker import``.

- testhide/busybox:1  FROM-scratch style: Debian's static busybox and its applets.
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import docker

BUSYBOX_IMAGE = "testhide/busybox:1"
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
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("proc", 0o755), ("sys", 0o755),
                           ("dev", 0o755), ("root", 0o700)):
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
    client.api.import_image_from_data(busybox_rootfs(), repository=repository, tag=tag,
                                      changes=["ENV PATH=/bin", "CMD [\"/bin/sh\"]"])
    print(f"{BUSYBOX_IMAGE} built")


if __name__ == "__main__":
    build(docker.from_env(), force="--force" in sys.argv)
