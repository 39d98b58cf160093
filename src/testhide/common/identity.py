"""The agent identity carried in a certificate's URI SAN:
``spiffe://<trust-domain>/org/<org>/pool/<pool>/agent/<agent-id>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509

# Agent certificates are backdated by this much (the TLS handshake has no skew
# tolerance). Agents subtract it to learn the lifetime the control plane meant.
AGENT_CERT_BACKDATE = timedelta(seconds=30)

NAME_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_URI_RE = re.compile(
    r"\Aspiffe://(?P<td>[a-z0-9.-]+)/org/(?P<org>[^/]+)/pool/(?P<pool>[^/]+)/agent/(?P<agent>[^/]+)\Z"
)


class IdentityError(ValueError):
    """A certificate does not carry a valid agent identity."""


@dataclass(frozen=True)
class AgentIdentity:
    trust_domain: str
    org: str
    pool: str
    agent_id: str

    def __post_init__(self) -> None:
        for field, value in (("org", self.org), ("pool", self.pool), ("agent_id", self.agent_id)):
            if not NAME_RE.match(value):
                raise IdentityError(f"invalid {field} {value!r} in agent identity")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/org/{self.org}/pool/{self.pool}/agent/{self.agent_id}"

    @classmethod
    def from_uri(cls, uri: str) -> AgentIdentity:
        match = _URI_RE.match(uri)
        if not match:
            raise IdentityError(f"not an agent identity: {uri!r}")
        return cls(match["td"], match["org"], match["pool"], match["agent"])

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> AgentIdentity:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise IdentityError("certificate has no subject alternative name") from exc
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise IdentityError(f"expected exactly one URI SAN, found {len(uris)}")
        return cls.from_uri(uris[0])
