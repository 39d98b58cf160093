"""Validation of what users send. Every refusal names the field and the rule."""

from __future__ import annotations

import posixpath
import re
from datetime import timedelta

from testhide.common.identity import NAME_RE
from testhide.controlplane.errors import InvalidArgument, quoted
from testhide.controlplane.jobs.model import JobSpec, Resources, ServiceSpec

# The grammar of github.com/distribution/reference, with an optional digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
# As in Docker, a first component is a registry only if it has a '.' or a port, or is localhost;
# otherwise it is part of the (lowercase) repository path.
_DOMAIN = rf"(?:localhost(?::[0-9]+)?|{_LABEL}(?:\.{_LABEL})+(?::[0-9]+)?|{_LABEL}:[0-9]+)"
# \Z, not $: $ also matches before a final newline.
IMAGE_RE = re.compile(
    rf"\A(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?\Z",
    re.ASCII,
)
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
LABEL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z")

SECRET_NAME_RE = re.compile(r"\A[A-Z_][A-Z0-9_]{0,127}\Z")
WORKSPACE_ID_RE = re.compile(r"\Ab[0-9a-f]{24}\Z")
# model.new_job_id: 'j', 12 hex digits of milliseconds, 12 random ones.
JOB_ID_RE = re.compile(r"\Aj[0-9a-f]{24}\Z")
# Control characters (C0, DEL, C1): nothing a label value or a display string needs.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
RUNTIMES = ("", "runc", "runsc")

MAX_IMAGE = 255
MAX_ARGS = 1024
MAX_COMMAND_BYTES = 128 * 1024
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
MAX_TIMEOUT = timedelta(hours=24)
MAX_RETRIES = 10
# An agent announces at most 64 labels (rpc/agent.py): a job asking for more can never run.
MAX_LABELS = 64
MAX_LABEL_VALUE_BYTES = 256
# Docker's smallest CPU limit; below it nano_cpus rounds to 0, which Docker reads as "no limit".
MIN_CPUS = 0.01
LIMITS = Resources(cpus=64, memory_bytes=256 * 1024**3, pids=65536)
MAX_FETCH_BYTES = 8 * 1024
CACHE_KEY_RE = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z", re.ASCII)
MAX_SERVICES = 8
SERVICE_NAME_RE = re.compile(r"\A[a-z][a-z0-9-]{0,30}\Z", re.ASCII)
MAX_TMPFS = 8
_TMPFS_RE = re.compile(r"\A(?:/[A-Za-z0-9._@+-]+)+\Z", re.ASCII)
# Where a tmpfs would hide what the kernel or the runtime put there.
_KERNEL_DIRS = ("/proc", "/sys", "/dev")
# Epochs, sequence numbers, offsets and sizes: far beyond any real one, yet a few more
# increments still fit the store's signed 64-bit integers.
MAX_COUNTER = 2**62


def in_range(field: str, value: int, low: int, high: int = MAX_COUNTER) -> int:
    """A number from the wire, checked before anything converts or stores it."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}, not {value}")
    return value


def validate_job_id(field: str, value: str) -> str:
    if not JOB_ID_RE.match(value):
        raise InvalidArgument(f"{field} {quoted(value)} is not a job id ('j' and 24 hex digits)")
    return value


def validate_name(field: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise InvalidArgument(f"{field} {quoted(value)} must be 1-63 lowercase letters, digits or '-'")
    return value


def validate_spec(spec: JobSpec) -> JobSpec:
    if not spec.image or len(spec.image) > MAX_IMAGE or not IMAGE_RE.match(spec.image):
        raise InvalidArgument(f"image {quoted(spec.image)} is not a valid image reference")
    if not spec.command or not spec.command[0]:
        raise InvalidArgument("command must not be empty")
    _validate_command("command", spec.command)
    _validate_env("", spec.env)
    validate_name("pool", spec.pool)
    if not timedelta(seconds=1) <= spec.timeout <= MAX_TIMEOUT:
        raise InvalidArgument("timeout must be between 1s and 24h")
    if not 0 <= spec.retries <= MAX_RETRIES:
        raise InvalidArgument(f"retries must be between 0 and {MAX_RETRIES}")
    r = spec.resources
    if not MIN_CPUS <= r.cpus <= LIMITS.cpus:
        raise InvalidArgument(f"cpus must be between {MIN_CPUS} and {LIMITS.cpus}")
    if not 6 * 1024**2 <= r.memory_bytes <= LIMITS.memory_bytes:
        raise InvalidArgument("memory must be between 6 MiB and 256 GiB")
    if not 8 <= r.pids <= LIMITS.pids:
        raise InvalidArgument(f"pids must be between 8 and {LIMITS.pids}")
    if not spec.workdir.startswith("/") or ".." in spec.workdir.split("/") or len(spec.workdir) > 1024:
        raise InvalidArgument("workdir must be an absolute path without '..'")
    validate_labels(spec.labels)
    if len(spec.secrets) > MAX_ENV or len(set(spec.secrets)) != len(spec.secrets):
        raise InvalidArgument("secrets must be distinct and at most 256")
    for name in spec.secrets:
        if not SECRET_NAME_RE.match(name):
            raise InvalidArgument(f"secret name {quoted(name)} is invalid")
        if name in spec.env:
            raise InvalidArgument(f"{name} is both an environment variable and a secret")
    if spec.runtime not in RUNTIMES:
        raise InvalidArgument(f"runtime must be one of {', '.join(r for r in RUNTIMES if r)}")
    for kind, globs in (("artifact", spec.artifact_globs), ("junit", spec.junit_globs)):
        if len(globs) > 64:
            raise InvalidArgument(f"at most 64 {kind} globs")
        for glob in globs:
            validate_relative_path(f"{kind} glob", glob)
    if spec.workspace_id and not WORKSPACE_ID_RE.match(spec.workspace_id):
        raise InvalidArgument("workspace_id is malformed")
    _validate_fetch(spec)
    _validate_services(spec.services)
    return spec


def _validate_command(field: str, command: tuple[str, ...]) -> None:
    if len(command) > MAX_ARGS or sum(len(a.encode()) for a in command) > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"{field} is too long (at most {MAX_ARGS} arguments, {MAX_COMMAND_BYTES} bytes)"
        )
    if any("\x00" in a for a in command):
        raise InvalidArgument(f"{field} arguments must not contain NUL bytes")


def _validate_env(within: str, env: dict[str, str]) -> None:
    """``within``: the service whose environment it is ("" for the job's)."""
    if len(env) > MAX_ENV:
        raise InvalidArgument(f"{within}at most {MAX_ENV} environment variables")
    for name, value in env.items():
        if not ENV_NAME_RE.match(name):
            raise InvalidArgument(f"{within}environment variable name {quoted(name)} is invalid")
        if len(value.encode()) > MAX_ENV_VALUE or "\x00" in value:
            raise InvalidArgument(f"{within}environment variable {name} is too long or contains NUL")


def _validate_fetch(spec: JobSpec) -> None:
    if len(spec.fetch.encode()) > MAX_FETCH_BYTES or "\x00" in spec.fetch:
        raise InvalidArgument(f"fetch must be at most {MAX_FETCH_BYTES} bytes, without NUL")
    if len(spec.fetch_secrets) > MAX_ENV or len(set(spec.fetch_secrets)) != len(spec.fetch_secrets):
        raise InvalidArgument(f"fetch_secrets must be distinct and at most {MAX_ENV}")
    for name in spec.fetch_secrets:
        if not SECRET_NAME_RE.match(name):
            raise InvalidArgument(f"fetch secret name {quoted(name)} is invalid")
        if name in spec.env:
            raise InvalidArgument(f"{name} is both an environment variable and a fetch secret")
    if spec.fetch_secrets and not spec.fetch:
        raise InvalidArgument("fetch_secrets needs fetch: only the fetch step is given them")
    if spec.cache and not CACHE_KEY_RE.match(spec.cache):
        raise InvalidArgument(
            f"cache key {quoted(spec.cache)} must be 1-128 of letters, digits, '.', '_' or '-'"
        )
    if spec.cache.startswith("job."):
        # The agent names a job's own /cache (no --cache) job.JOB_ID.
        raise InvalidArgument(
            f"cache key {quoted(spec.cache)} must not start with 'job.': those are the agent's"
        )
    if spec.cache and not spec.fetch:
        raise InvalidArgument("--cache needs --fetch: the fetch step is what fills the cache")


def _validate_services(services: tuple[ServiceSpec, ...]) -> None:
    if len(services) > MAX_SERVICES:
        raise InvalidArgument(f"at most {MAX_SERVICES} services, not {len(services)}")
    seen: set[str] = set()
    for service in services:
        name = service.name
        if not SERVICE_NAME_RE.match(name):
            raise InvalidArgument(
                f"service name {quoted(name)} must be 1-31 lowercase letters, digits or '-', "
                "starting with a letter"
            )
        if name in seen:
            raise InvalidArgument(f"service {name} is named twice")
        seen.add(name)
        image = service.image
        if not image:
            raise InvalidArgument(f"service {name}: an image is required")
        if len(image) > MAX_IMAGE or not IMAGE_RE.match(image):
            raise InvalidArgument(f"service {name}: image {quoted(image)} is not a valid image reference")
        _validate_command(f"service {name}: command", service.command)
        _validate_env(f"service {name}: ", service.env)
        _validate_tmpfs(name, service.tmpfs)


def _validate_tmpfs(service: str, paths: tuple[str, ...]) -> None:
    if len(paths) > MAX_TMPFS or len(set(paths)) != len(paths):
        raise InvalidArgument(f"service {service}: at most {MAX_TMPFS} tmpfs paths, each once")
    for path in paths:
        if path == "/":
            raise InvalidArgument(f"service {service}: tmpfs must not be / (the root stays read-only)")
        if len(path) > 1024 or not _TMPFS_RE.match(path) or posixpath.normpath(path) != path:
            raise InvalidArgument(
                f"service {service}: tmpfs {quoted(path)} must be an absolute path without '.' or '..' "
                "(letters, digits, '.', '_', '@', '+', '-')"
            )
        if any(path == d or path.startswith(f"{d}/") for d in _KERNEL_DIRS):
            raise InvalidArgument(
                f"service {service}: tmpfs {quoted(path)} must not be under /proc, /sys or /dev"
            )


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """What a job asks of its agent's host, bounded as an agent's announcement is."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels, not {len(labels)}")
    for key, value in labels.items():
        if not LABEL_RE.match(key):
            raise InvalidArgument(
                f"label {quoted(key)} must be 1-63 of letters, digits, '.', '_', '/' or '-', "
                "starting with a letter or digit"
            )
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES or _CONTROL_RE.search(value):
            raise InvalidArgument(
                f"label {key}: its value must be at most {MAX_LABEL_VALUE_BYTES} bytes, "
                "without control characters"
            )
    return labels


def validate_relative_path(field: str, path: str) -> str:
    """A path (or glob) inside /workspace: relative, no '..', no NUL."""
    parts = path.split("/")
    if not path or len(path) > 1024 or path.startswith("/") or ".." in parts or "\x00" in path:
        raise InvalidArgument(
            f"{field} {quoted(path)} must be a relative path inside the workspace, without '..'"
        )
    return path
