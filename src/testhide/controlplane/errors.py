"""Control-plane errors. Each maps to one gRPC status in ``rpc/status.py``.

ControlPlaneError
├── ConfigError              invalid configuration
├── DataDirError             missing, uninitialised or already initialised data dir
├── InvalidArgument          a request field fails validation
├── Unauthenticated          no, wrong or expired credential (never says which)
├── PermissionDenied         authenticated, but not allowed
├── RateLimited              too many requests or failed attempts; carries a retry hint
├── NotFound                 no such object in the caller's organisation
├── FailedPrecondition       the object is not in a state that allows this
├── StaleEpoch               an agent reported on an assignment it no longer holds
├── IntegrityError           stored data failed authentication (tampering, wrong key)
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


class FailedPrecondition(ControlPlaneError):
    pass


class StaleEpoch(FailedPrecondition):
    pass


class IntegrityError(ControlPlaneError):
    pass


class StorageUnavailable(ControlPlaneError):
    """Transient: nothing was changed; the same request succeeds once the condition clears."""


class BackgroundTaskFailed(ControlPlaneError):
    """The scheduler, the lease keeper or the watcher ended; its cause is chained (``__cause__``)."""
