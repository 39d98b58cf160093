"""The authenticated caller of an API RPC, and the scopes it may hold."""

from __future__ import annotations

from dataclasses import dataclass

from testhide.controlplane.errors import PermissionDenied

SCOPES = ("jobs:read", "jobs:write", "secrets:write", "agents:admin", "org:admin")


@dataclass(frozen=True)
class Principal:
    kind: str
    id: str
    org: str
    scopes: frozenset[str]
    amr: tuple[str, ...] = ()
    """How its session was authenticated, as RFC 8176 values (the access token's
    ``amr``): ``pwd`` a password; with ``mfa`` and ``otp`` a TOTP code, with
    ``mfa`` and ``kba`` a recovery code. Empty for an API key, a bearer secret
    that no RFC 8176 value describes."""

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"this credential lacks the {scope!r} scope")
