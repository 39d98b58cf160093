"""The enrollment token format, shared by the control plane that issues it and
the agent that presents it: ``th1.<id>.<secret>.<ca-sha256>``. The secret is
what the control plane stores hashed; the CA fingerprint lets the agent pin
the server before it trusts anything."""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "th1"
_TOKEN_RE = re.compile(r"\Ath1\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{64})\Z")


@dataclass(frozen=True)
class EnrollmentToken:
    token_id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"

    @classmethod
    def parse(cls, text: str) -> EnrollmentToken:
        match = _TOKEN_RE.match(text.strip())
        if not match:
            raise ValueError("malformed enrollment token")
        return cls(match[1], match[2], match[3])
