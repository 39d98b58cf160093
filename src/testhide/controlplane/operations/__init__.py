"""Operations: what an administrator can do to an organisation, one function each, each a
store call plus an audit entry. The operator's commands (`commands/`, with a data dir) and
the API's Admin service (`rpc/admin*.py`, with a scoped credential) call the same
functions, so the two cannot drift apart.

- `operations.agents`: enrollment tokens, agents, pools (the ``agents:admin`` scope).
- `operations.access`: organisations, users, API keys, the secrets listing (``org:admin``).
"""

from __future__ import annotations

from dataclasses import dataclass

from testhide.controlplane.auth.audit import Auditor
from testhide.controlplane.store.base import Store


@dataclass(frozen=True)
class Actor:
    """Who performs an operation, and with what."""

    store: Store
    auditor: Auditor
    name: str
    """As the audit log records it: ``operator:LOGIN`` for a command on the control-plane host,
    ``user:NAME`` or ``api_key:ID`` for a call to the Admin service."""
    source_ip: str = ""
