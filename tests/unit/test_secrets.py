"""controlplane/auth/secrets.py: API keys, enrollment tokens, secret hashes."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.controlplane.auth.secrets import (
    ParsedApiKey,
    ParsedEnrollmentToken,
    hash_secret,
    new_api_key,
    new_enrollment_token,
    parse_api_key,
    parse_enrollment_token,
    same_hash,
)
from testhide.controlplane.errors import Unauthenticated

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
FP = hashlib.sha256(b"ca").hexdigest()
ID, SECRET = "0123456789abcdef", "ab" * 32


def test_new_api_key_format_and_round_trip() -> None:
    text, parsed = new_api_key()
    assert re.fullmatch(r"thk_[0-9a-f]{16}_[0-9a-f]{64}", text)
    assert text == f"thk_{parsed.key_id}_{parsed.secret}"
    assert parse_api_key(text) == parsed


def test_api_keys_are_random() -> None:
    keys = {new_api_key()[0] for _ in range(20)}
    assert len(keys) == 20


def test_parse_api_key_fields() -> None:
    assert parse_api_key(f"thk_{ID}_{SECRET}") == ParsedApiKey(ID, SECRET)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "thk_",
        f"thk_{ID}",
        f"thk_{ID}_",
        f"thx_{ID}_{SECRET}",
        f"THK_{ID}_{SECRET}",
        f"thk-{ID}-{SECRET}",
        f"thk_{ID.upper()}_{SECRET}",
        f"thk_{ID}_{SECRET.upper()}",
        f"thk_{ID[:-1]}_{SECRET}",
        f"thk_{ID}0_{SECRET}",
        f"thk_{ID}_{SECRET[:-1]}",
        f"thk_{ID}_{SECRET}0",
        f"thk_{ID}_{SECRET}_x",
        f" thk_{ID}_{SECRET}",
        f"thk_{ID}_{SECRET[:10]} {SECRET[11:]}",
        f"Bearer thk_{ID}_{SECRET}",
        f"thk_{ID[:-1]}g_{SECRET}",
    ],
)
def test_parse_api_key_rejects_malformed(text: str) -> None:
    with pytest.raises(Unauthenticated):
        parse_api_key(text)


@PROPS
@given(st.text(max_size=120))
def test_parse_api_key_arbitrary_text(text: str) -> None:
    try:
        parsed = parse_api_key(text)
    except Unauthenticated:
        return
    assert text.startswith(f"thk_{parsed.key_id}_{parsed.secret}")


def test_new_enrollment_token_round_trip() -> None:
    text, parsed = new_enrollment_token(FP)
    assert re.fullmatch(r"th1\.[0-9a-f]{16}\.[0-9a-f]{64}\.[0-9a-f]{64}", text)
    assert parsed.ca_fingerprint == FP
    assert parse_enrollment_token(text) == parsed
    assert new_enrollment_token(FP)[0] != text


def test_enrollment_token_surrounding_whitespace_is_ignored() -> None:
    text = f"th1.{ID}.{SECRET}.{FP}"
    assert parse_enrollment_token(f"  {text}\n") == ParsedEnrollmentToken(ID, SECRET, FP)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "th1",
        f"th1.{ID}.{SECRET}",
        f"th1.{ID}.{SECRET}.",
        f"th2.{ID}.{SECRET}.{FP}",
        f"th1_{ID}_{SECRET}_{FP}",
        f"th1.{ID}.{SECRET}.{FP[:-1]}",
        f"th1.{ID}.{SECRET}.{FP}0",
        f"th1.{ID}.{SECRET}.{FP.upper()}",
        f"th1.{ID[:-1]}.{SECRET}.{FP}",
        f"th1.{ID}.{SECRET[:-2]}.{FP}",
        f"th1.{ID}.{SECRET}.{FP}.extra",
        f"th1.{ID} .{SECRET}.{FP}",
        f"thk_{ID}_{SECRET}",
    ],
)
def test_parse_enrollment_token_rejects_malformed(text: str) -> None:
    with pytest.raises(Unauthenticated, match="malformed"):
        parse_enrollment_token(text)


def test_hash_secret_is_sha256() -> None:
    assert hash_secret("abc") == hashlib.sha256(b"abc").digest()
    assert len(hash_secret("")) == 32
    assert hash_secret("a") != hash_secret("b")
    assert hash_secret("é") == hashlib.sha256("é".encode()).digest()


def test_same_hash() -> None:
    h = hash_secret(SECRET)
    assert same_hash(h, hash_secret(SECRET))
    assert not same_hash(h, hash_secret(SECRET[:-1] + "0"))
    assert not same_hash(h, h[:-1])
    assert not same_hash(h, b"")


@PROPS
@given(st.text(max_size=40), st.text(max_size=40))
def test_same_hash_property(a: str, b: str) -> None:
    assert same_hash(hash_secret(a), hash_secret(b)) == (a == b)
