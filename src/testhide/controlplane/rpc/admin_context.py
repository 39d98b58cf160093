"""What the Admin service's methods share (`rpc/admin.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.auth.passwords import PasswordChecks
from testhide.controlplane.ca.trust import CertificateState
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.scheduler import Scheduler
from testhide.controlplane.operations import Actor
from testhide.controlplane.operations.agents import StreamHolders
from testhide.controlplane.rpc.auth import client_address, current_principal
from testhide.controlplane.store.base import Store


@dataclass(frozen=True)
class AdminContext:
    store: Store
    auditor: Auditor
    passwords: PasswordChecks | None = None
    """bcrypt for `CreateUser` on the daemon's bounded pool (else a thread of its own)."""
    scheduler: Scheduler | None = None
    """Cuts a revoked agent's stream off at once; wakes the dispatch of a resumed pool."""
    certificates: CertificateState | None = None
    """The active CA, whose fingerprint an enrollment token carries."""
    stream_holders: StreamHolders | None = None
    """The processes holding agents' streams now, for whether each agent is connected."""
    logs: LogBook | None = None
    """Jobs' stored logs, whose hash chains an incident report recomputes."""


def actor(admin: AdminContext, context: grpc.aio.ServicerContext[Any, Any]) -> Actor:
    """The caller as the audit log records it (``user:NAME`` or ``api_key:ID``)."""
    principal = current_principal()
    return Actor(admin.store, admin.auditor, f"{principal.kind}:{principal.id}", client_address(context))


class AdminBase:
    """Gives the Admin service's method groups their context (set by `AdminServicer`)."""

    _admin: AdminContext
