"""Passwords: bcrypt, and rules a password must meet before it is stored."""

from __future__ import annotations

import bcrypt

from testhide.controlplane.errors import InvalidArgument

MIN_LENGTH = 12
MAX_BYTES = 72  # bcrypt's limit; longer input would be silently cut, so it is refused
# Compared against when the account does not exist, so that timing does not tell.
_DUMMY = bcrypt.hashpw(b"testhide-dummy-password", bcrypt.gensalt())


def check_complexity(password: str, user: str) -> None:
    if len(password) < MIN_LENGTH:
        raise InvalidArgument(f"the password must have at least {MIN_LENGTH} characters")
    if len(password.encode()) > MAX_BYTES:
        raise InvalidArgument(f"the password must be at most {MAX_BYTES} bytes")
    classes = sum(
        any(test(ch) for ch in password)
        for test in (str.islower, str.isupper, str.isdigit, lambda ch: not ch.isalnum())
    )
    if classes < 3:
        raise InvalidArgument(
            "the password must mix at least three of: lowercase, uppercase, digits, symbols"
        )
    if user.lower() in password.lower():
        raise InvalidArgument("the password must not contain the user name")


def hash_password(password: str) -> bytes:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=12))


def verify_password(password: str, hashed: bytes | None) -> bool:
    candidate = password.encode()[:MAX_BYTES]
    if hashed is None:
        bcrypt.checkpw(candidate, _DUMMY)
        return False
    return bcrypt.checkpw(candidate, hashed)
