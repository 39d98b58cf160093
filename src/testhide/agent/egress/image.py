"""The egress proxy's image, built on this host from Debian's squid as
installed here (``apt-get install squid``): FROM scratch, holding only the
squid binary, the libraries ``ldd`` names for it and for unlinkd, the icons
and error templates squid serves in its refusals, the MIME table it reads at
start, and a passwd/group naming the ``proxy`` user it runs as. Nothing is
pulled: the proxy is exactly the squid this host's package manager keeps
patched, and a new package gives a new tag (squid's version and a hash of
every file that goes in), built by the first job that needs it."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import docker
import docker.errors

from testhide.agent.egress.squid import CONFIG_DIR, CONFIG_PATH, ERRORS_DIR, MIME_TABLE
from testhide.agent.errors import JobSetupError

SQUID = Path("/usr/sbin/squid")
UNLINKD = Path("/usr/lib/squid/unlinkd")
ICONS = Path("/usr/share/squid/icons")
TEMPLATES = Path("/usr/share/squid-langpack/templates")
MIME = Path("/usr/share/squid/mime.conf")
PROXY_USER = "13:13"
"""Debian's ``proxy`` user and group."""
REPOSITORY = "testhide/egress-proxy"
IMAGE_LABEL = "dev.testhide.egress-proxy"
"""On the image: the squid version it holds."""
MISSING = "the egress proxy needs Debian's squid on this host (apt-get install squid)"

_PASSWD = b"root:x:0:0:root:/nonexistent:/nonexistent\nproxy:x:13:13:proxy:/nonexistent:/nonexistent\n"
_GROUP = b"root:x:0:\nproxy:x:13:\n"
_DOCKERFILE = f"""FROM scratch
COPY rootfs/ /
USER {PROXY_USER}
ENTRYPOINT ["{SQUID}", "-N", "-f", "{CONFIG_PATH}"]
""".encode()
_VERSION_RE = re.compile(r"Version (\S+)")

_ready: list[str] = []
"""The tag built or found by this process: the host's files are read once."""
_build_lock = threading.Lock()


@dataclass(frozen=True)
class ImageInputs:
    version: str
    """squid's own version (``squid -v``)."""
    files: tuple[tuple[str, bytes], ...]
    """(path in the image, contents), sorted by path."""

    @property
    def tag(self) -> str:
        digest = hashlib.sha256(_DOCKERFILE)
        for path, data in self.files:
            digest.update(f"{path}\0{len(data)}\0".encode())
            digest.update(data)
        return f"{REPOSITORY}:{self.version}-{digest.hexdigest()[:12]}"


def ensure_image(client: docker.DockerClient) -> str:
    """The proxy image's tag, built if missing (once per process). Blocks:
    call it in a thread. JobSetupError when squid is not installed or the
    build fails."""
    with _build_lock:
        if _ready:
            return _ready[0]
        inputs = host_inputs()
        tag = inputs.tag
        try:
            client.images.get(tag)
        except docker.errors.ImageNotFound:
            _build(client, inputs, tag)
        except docker.errors.DockerException as exc:
            raise JobSetupError(f"could not look up the egress proxy image {tag}: {exc}") from exc
        _ready.append(tag)
        return tag


def forget_image() -> None:
    """The image went away (removed by hand): the next ``ensure_image`` looks again."""
    with _build_lock:
        _ready.clear()


def _build(client: docker.DockerClient, inputs: ImageInputs, tag: str) -> None:
    try:
        client.images.build(
            fileobj=io.BytesIO(build_context(inputs)),
            custom_context=True,
            tag=tag,
            labels={IMAGE_LABEL: inputs.version},
            pull=False,
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        raise JobSetupError(f"could not build the egress proxy image {tag}: {exc.msg}") from exc
    except docker.errors.DockerException as exc:
        raise JobSetupError(f"could not build the egress proxy image {tag}: {exc}") from exc


def host_inputs() -> ImageInputs:
    """What goes into the image, read from this host (symlinks followed)."""
    if not os.access(SQUID, os.X_OK):
        raise JobSetupError(MISSING)
    try:
        version = _squid_version()
        files: dict[str, bytes] = {
            str(SQUID): SQUID.read_bytes(),
            str(UNLINKD): UNLINKD.read_bytes(),
            MIME_TABLE: MIME.read_bytes(),
            "/etc/passwd": _PASSWD,
            "/etc/group": _GROUP,
        }
        for binary in (SQUID, UNLINKD):
            for library in _libraries(binary):
                files[library] = Path(library).read_bytes()
        for source, target in ((ICONS, "/usr/share/squid/icons"), (TEMPLATES, ERRORS_DIR)):
            for path in _tree(source):
                files[str(PurePosixPath(target) / path.relative_to(source))] = path.read_bytes()
    except (OSError, subprocess.SubprocessError) as exc:
        raise JobSetupError(f"{MISSING}: {exc}") from exc
    return ImageInputs(version, tuple(sorted(files.items())))


def _squid_version() -> str:
    output = subprocess.run([str(SQUID), "-v"], capture_output=True, text=True, check=True, timeout=30)
    match = _VERSION_RE.search(output.stdout)
    if match is None:
        raise subprocess.SubprocessError(f"{SQUID} -v did not say its version")
    return match.group(1)


def _libraries(binary: Path) -> list[str]:
    """The shared objects the dynamic loader maps for ``binary``, as ldd names them."""
    output = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=30)
    libraries = []
    for line in output.stdout.splitlines():
        if "not found" in line:
            raise subprocess.SubprocessError(f"{binary}: {line.strip()}")
        libraries += [word for word in line.split() if word.startswith("/")]
    return libraries


def _tree(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root, followlinks=True):
        for name in names:
            yield Path(directory) / name


def build_context(inputs: ImageInputs) -> bytes:
    """A tar: the Dockerfile, and the image's files under rootfs/ (root-owned,
    read-only but for the binaries, timestamps zeroed)."""
    buffer = io.BytesIO()
    executables = {str(SQUID), str(UNLINKD)}
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        _add_file(archive, "Dockerfile", _DOCKERFILE, 0o644)
        directories = {CONFIG_DIR}
        for path, _ in inputs.files:
            directories.update(str(parent) for parent in PurePosixPath(path).parents)
        for directory in sorted(directories - {"/"}):
            info = tarfile.TarInfo(f"rootfs{directory}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        for path, data in inputs.files:
            is_code = path in executables or ".so" in PurePosixPath(path).name
            _add_file(archive, f"rootfs{path}", data, 0o755 if is_code else 0o444)
    return buffer.getvalue()


def _add_file(archive: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(info, io.BytesIO(data))
