"""Bearer secrets for API keys and enrollment tokens: random, shown once,
stored only as a hash. They carry 256 bits of entropy, so a plain sha256 (as
GitHub does for its tokens) is enough; passwords, which do not, use bcrypt."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from controlplane.errors import Unauthenticated

API_KEY_PREFIX = "thk"
ENROLL_PREFIX = "th1"
_API_KEY_RE = re.compile(r"\Athk_([0-9a-f]{16})_([0-9a-f]{64})\Z")
_ENROLL_RE = re.compile(r"\Ath1\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{64})\Z")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def same_hash(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class ParsedApiKey:
    key_id: str
    secret: str


def new_api_key() -> tuple[str, ParsedApiKey]:
    key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
    return f"{API_KEY_PREFIX}_{key_id}_{secret}", ParsedApiKey(key_id, secret)


def parse_api_key(text: str) -> ParsedApiKey:
    match = _API_KEY_RE.match(text)
    if not match:
        raise Unauthenticated("invalid API key")
    return ParsedApiKey(match[1], match[2])


@dataclass(frozen=True)
class ParsedEnrollmentToken:
    token_id: str
    secret: str
    ca_fingerprint: str


def new_enrollment_token(ca_fingerprint: str) -> tuple[str, ParsedEnrollmentToken]:
    token_id, secret = secrets.token_hex(8), secrets.token_hex(32)
    return (f"{ENROLL_PREFIX}.{token_id}.{secret}.{ca_fingerprint}",
            ParsedEnrollmentToken(token_id, secret, ca_fingerprint))


def parse_enrollment_token(text: str) -> ParsedEnrollmentToken:
    match = _ENROLL_RE.match(text.strip())
    if not match:
        raise Unauthenticated("malformed enrollment token")
    return ParsedEnrollmentToken(match[1], match[2], match[3])
