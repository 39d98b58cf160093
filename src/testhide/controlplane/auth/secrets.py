"""Bearer secrets for API keys and enrollment tokens: random, shown once,
stored only as a hash. They carry 256 bits of entropy, so a plain sha256 (as
GitHub does for its tokens) is enough; passwords, which do not, use bcrypt."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from testhide.common.enrollment_token import EnrollmentToken
from testhide.controlplane.errors import Unauthenticated

API_KEY_PREFIX = "thk"
_API_KEY_RE = re.compile(r"\Athk_([0-9a-f]{16})_([0-9a-f]{64})\Z")


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


ParsedEnrollmentToken = EnrollmentToken


def new_enrollment_token(ca_fingerprint: str) -> tuple[str, EnrollmentToken]:
    token = EnrollmentToken(secrets.token_hex(8), secrets.token_hex(32), ca_fingerprint)
    return str(token), token


def parse_enrollment_token(text: str) -> EnrollmentToken:
    try:
        return EnrollmentToken.parse(text)
    except ValueError as exc:
        raise Unauthenticated(str(exc)) from None
