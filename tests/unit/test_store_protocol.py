"""Both backends, SQLite and PostgreSQL, implement every storage protocol: the
small ones each package declares for itself, and ``Store``, their union plus
the operator's calls. Checked twice: by mypy (the assignments below) and here,
method by method, with the same parameters. Structural only: no database is
opened (the behaviour is tests/integration/test_store.py's)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from testhide.controlplane.auth.store import AuditStore, CredentialStore
from testhide.controlplane.ca.store import AgentStore, CertificatePolicyStore, EnrollmentStore
from testhide.controlplane.jobs.store import (
    BlobIndex,
    BlobStore,
    JobStore,
    LeaseStore,
    LogStore,
    QueueStore,
    SecretStore,
)
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore

SMALL_PROTOCOLS: tuple[type, ...] = (
    QueueStore,
    JobStore,
    BlobIndex,
    LeaseStore,
    LogStore,
    BlobStore,
    SecretStore,
    CredentialStore,
    AuditStore,
    EnrollmentStore,
    AgentStore,
    CertificatePolicyStore,
)


BACKENDS: tuple[type, ...] = (SqliteStore, PgStore)


def _static_conformance(store: SqliteStore | PgStore) -> list[object]:
    """Never called: mypy --strict checks that each backend satisfies each protocol."""
    queue: QueueStore = store
    jobs: JobStore = store
    leases: LeaseStore = store
    logs: LogStore = store
    blobs: BlobStore = store
    secrets: SecretStore = store
    credentials: CredentialStore = store
    audit: AuditStore = store
    enrollment: EnrollmentStore = store
    agents: AgentStore = store
    everything: Store = store
    return [queue, jobs, leases, logs, blobs, secrets, credentials, audit, enrollment, agents, everything]


def _methods(protocol: type) -> dict[str, Callable[..., object]]:
    """Every coroutine method the protocol declares, its bases' included."""
    found: dict[str, Callable[..., object]] = {}
    for cls in reversed(protocol.__mro__):
        found.update({n: m for n, m in vars(cls).items() if inspect.iscoroutinefunction(m)})
    return found


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("protocol", [*SMALL_PROTOCOLS, Store], ids=lambda p: p.__name__)
def test_each_backend_implements_every_protocol_method(protocol: type, backend: type) -> None:
    wanted = _methods(protocol)
    assert wanted, protocol
    for name, declared in sorted(wanted.items()):
        implementation = getattr(backend, name, None)
        assert implementation is not None, name
        assert inspect.iscoroutinefunction(implementation), name
        assert list(inspect.signature(implementation).parameters) == list(
            inspect.signature(declared).parameters
        ), name


def test_store_is_the_union_of_the_small_protocols() -> None:
    everything = _methods(Store)
    assert len(everything) > 50
    for protocol in SMALL_PROTOCOLS:
        assert protocol in Store.__mro__, protocol.__name__
    # A method declared twice (held_job, set_job_status) means the same thing in each.
    for protocol in SMALL_PROTOCOLS:
        for name, declared in _methods(protocol).items():
            assert inspect.signature(declared) == inspect.signature(everything[name]), name


def test_each_package_protocol_stays_small() -> None:
    for protocol in SMALL_PROTOCOLS:
        assert len(_methods(protocol)) <= 16, protocol.__name__
