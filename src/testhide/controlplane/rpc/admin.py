"""The Admin service: administration of the caller's organisation over the API port.

Each method decodes, calls an operation (`controlplane/operations/`) with the caller as
the actor and the caller's organisation as the only one it may touch, and encodes. The
interceptor has already checked the method's scope (`rpc/auth.py`, ``SCOPE_OF_METHOD``):
``agents:admin`` for the methods of `AgentsAdmin` (`rpc/admin_agents.py`), ``org:admin``
for those of `OrgAdmin` (`rpc/admin_org.py`).
"""

from __future__ import annotations

from testhide.controlplane.rpc.admin_agents import AgentsAdmin
from testhide.controlplane.rpc.admin_context import AdminContext
from testhide.controlplane.rpc.admin_org import OrgAdmin
from testhide.protos.v1 import admin_pb2_grpc


class AdminServicer(AgentsAdmin, OrgAdmin, admin_pb2_grpc.AdminServicer):
    def __init__(self, context: AdminContext) -> None:
        self._admin = context
