"""Control-plane errors. Each maps to one gRPC status in ``rpc/status.py``.

ControlPlaneError
├── ConfigError              invalid configuration
├── DataDirError             missing, uninitialised or already initialised data dir
├── InvalidArgument          a request field fails validation
├── Unauthenticated          no, wrong or expired credential (never says which)
├── PermissionDenied         authenticated, but not allowed
├── RateLimited              too many requests or failed attempts; carries a retry hint
├── NotFound                 no such object in the caller's organisation
│   └── NotHeld              an agent spoke about a job it does not hold at that epoch
├── FailedPrecondition       the object is not in a state that allows this
│   └── StaleEpoch           a fenced update found the job already at another epoch
├── IntegrityError           stored data failed authentication (tampering, wrong key)
│   └── DatabaseDamaged      the SQLite file is not a database, or is damaged: restore a backup
├── StorageUnavailable       the database is locked by another process, or the disk is full
└── BackgroundTaskFailed     a supervised task of the daemon died; the daemon stopped because of it
"""


class ControlPlaneError(Exception):
    """Base of every error the control plane raises on purpose."""


class ConfigError(ControlPlaneError):
    pass


class DataDirError(ControlPlaneError):
    pass


class InvalidArgument(ControlPlaneError):
    pass


class Unauthenticated(ControlPlaneError):
    pass


class PermissionDenied(ControlPlaneError):
    pass


class RateLimited(ControlPlaneError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(ControlPlaneError):
    pass


class NotHeld(NotFound):
    """An agent's message about a job it does not hold at the epoch it gave:
    the job is unknown, another agent's, or was taken back from this one. One
    answer for all of them, naming neither the holder nor the current epoch,
    so an agent cannot tell a job that exists from one that does not. The text
    does not echo the id either: the answer already carries it, where it has one."""

    def __init__(self, job_id: str) -> None:
        super().__init__("this agent does not hold the job at that epoch")
        self.job_id = job_id


class FailedPrecondition(ControlPlaneError):
    pass


class StaleEpoch(FailedPrecondition):
    pass


class IntegrityError(ControlPlaneError):
    pass


class DatabaseDamaged(IntegrityError):
    """SQLite's "file is not a database" or "database disk image is malformed":
    nothing the program can repair; the operator restores the newest backup."""


class StorageUnavailable(ControlPlaneError):
    """Transient: nothing was changed; the same request succeeds once the condition clears."""


class BackgroundTaskFailed(ControlPlaneError):
    """The scheduler, the lease keeper or the watcher ended; its cause is chained (``__cause__``)."""


def newer_schema(database: str, found: int, known: int) -> ConfigError:
    """A database a newer release migrated: this one would misread it (both stores say so alike)."""
    return ConfigError(
        f"{database} was migrated by a newer testhide (schema {found}, this one knows {known}):"
        " run that version, or restore a backup made before the upgrade"
    )


def behind_schema(found: int, known: int) -> FailedPrecondition:
    """A database an older release left: only ``serve`` and ``migrate`` bring it up to date."""
    return FailedPrecondition(
        f"the database schema is at version {found}, this testhide needs {known}:"
        " run `testhide-controlplane migrate` (it writes a backup first), or start serve"
    )


def quoted(value: str | bytes, limit: int = 64) -> str:
    """What a caller sent, for an error message: at most ``limit`` characters of it,
    repr-quoted (so control characters show), with its full length when cut. An error
    never echoes a megabyte back: its text travels in a trailer that clients cap at 16 KiB."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} {'bytes' if isinstance(value, bytes) else 'characters'})"
