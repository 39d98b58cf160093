"""Access tokens: RS256 JWTs (RFC 9068 ``at+jwt``) signed by keys kept sealed in
the data dir. Verification pins the algorithm, requires every claim we rely
on, checks the ``typ`` header (PyJWT does not) and knows only our key ids.

Rotation keeps the previous key for verification, so tokens signed just before
a rotation stay valid until they expire (10 minutes); a second rotation drops
it."""

from __future__ import annotations

import json
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from testhide.common.files import atomic_write
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.auth.principal import Principal
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import Unauthenticated

ACCESS_TTL = timedelta(minutes=10)
LEEWAY = timedelta(seconds=30)
VERIFIED_CACHE = 4096
AUDIENCE = "testhide-api"
ACCESS_JWT_TYPE = "at+jwt"  # the "typ" header of an access token (RFC 9068)
KEPT_KEYS = 2


def issuer_for(trust_domain: str) -> str:
    return f"testhide://{trust_domain}"


@dataclass(frozen=True)
class AccessClaims:
    principal: Principal
    session: str
    expires_at: datetime


class SigningKeys:
    """The signing keys of a data dir: one active, the previous kept for verification."""

    def __init__(self, directory: DataDir, master: MasterKey) -> None:
        self._directory = directory
        self._master = master
        self._stamp = -1
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self.active = ""
        self.reload()

    def reload(self) -> bool:
        stamp = os.stat(self._directory.state_path).st_mtime_ns
        if stamp == self._stamp:
            return False
        state = self._directory.require_initialised()
        signing = state.get("signing")
        if not signing:
            rotate_signing_key(self._directory, self._master)
            state = self._directory.require_initialised()
            signing = state["signing"]
        keys = {}
        for kid in signing["keys"]:
            name = f"signing/{kid}.key.sealed"
            pem = self._master.unseal((self._directory.path / name).read_bytes(), aad=name.encode())
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, rsa.RSAPrivateKey)
            keys[kid] = key
        self._private, self.active = keys, signing["active"]
        self._stamp = os.stat(self._directory.state_path).st_mtime_ns
        return True

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        key = self._private.get(kid)
        return key.public_key() if key else None

    def trusts(self, kid: str) -> bool:
        return kid in self._private

    def signing_key(self) -> tuple[str, rsa.RSAPrivateKey]:
        return self.active, self._private[self.active]

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._private.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}


def rotate_signing_key(directory: DataDir, master: MasterKey) -> str:
    """A new active key; the one before it stays for verification, older ones go."""
    kid = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory.path / "signing").mkdir(mode=0o700, exist_ok=True)
    name = f"signing/{kid}.key.sealed"
    with directory.sealing():
        state = directory.require_initialised()
        atomic_write(directory.path / name, master.seal(pem, aad=name.encode()), 0o600)
        previous = list(state.get("signing", {}).get("keys", []))
        kept = [*previous, kid][-KEPT_KEYS:]
        state["signing"] = {"active": kid, "keys": kept}
        directory.write_state(state)
        for dropped in set(previous) - set(kept):
            (directory.path / f"signing/{dropped}.key.sealed").unlink(missing_ok=True)
    return kid


class AccessTokens:
    def __init__(self, keys: SigningKeys, issuer: str) -> None:
        self._keys = keys
        self._issuer = issuer
        self._verified: OrderedDict[str, tuple[AccessClaims, str]] = OrderedDict()
        """Tokens whose signature and claims checked out, with their kid: an RS256
        verification (about 1 ms with PyJWT) is not repeated on every call."""

    def issue(self, principal: Principal, session: str, now: datetime | None = None) -> tuple[str, datetime]:
        now = now or datetime.now(UTC)
        expires = now + ACCESS_TTL
        kid, key = self._keys.signing_key()
        claims = {
            "iss": self._issuer,
            "aud": AUDIENCE,
            "sub": f"{principal.kind}:{principal.id}",
            "org": principal.org,
            "scope": " ".join(sorted(principal.scopes)),
            "sid": session,
            "jti": secrets.token_hex(16),
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
        }
        if principal.amr:
            claims["amr"] = list(principal.amr)
        token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid, "typ": ACCESS_JWT_TYPE})
        return token, expires

    def verify(self, token: str, now: datetime | None = None) -> AccessClaims:
        now = now or datetime.now(UTC)
        cached = self._verified.get(token)
        if cached is not None:
            claims, kid = cached
            # Until it expires, while its key is still trusted (a rotated-out key ends it at once).
            if now < claims.expires_at + LEEWAY and self._keys.trusts(kid):
                self._verified.move_to_end(token)
                return claims
            del self._verified[token]
        verified, kid = self._verify(token, now)
        self._verified[token] = (verified, kid)
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return verified

    def _verify(self, token: str, now: datetime) -> tuple[AccessClaims, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("malformed access token") from exc
        if header.get("typ") != ACCESS_JWT_TYPE:
            raise Unauthenticated("not an access token")
        if header.get("alg") != "RS256":
            raise Unauthenticated("access tokens are RS256")
        public = self._keys.public_key(str(header.get("kid", "")))
        if public is None:
            raise Unauthenticated("access token signed by an unknown or retired key")
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=["RS256"],
                audience=AUDIENCE,
                issuer=self._issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "aud", "iss", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("access token expired; refresh it") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid access token: {exc}") from exc
        if claims["iat"] > (now + LEEWAY).timestamp():
            raise Unauthenticated("access token issued in the future")
        kind, _, principal_id = str(claims["sub"]).partition(":")
        if not principal_id or "org" not in claims or "sid" not in claims:
            raise Unauthenticated("access token lacks its subject, organisation or session")
        amr = claims.get("amr", [])
        if not isinstance(amr, list) or not all(isinstance(v, str) for v in amr):
            raise Unauthenticated("access token has a malformed amr claim")
        principal = Principal(
            kind,
            principal_id,
            str(claims["org"]),
            frozenset(str(claims.get("scope", "")).split()),
            tuple(amr),
        )
        expires = datetime.fromtimestamp(claims["exp"], UTC)
        return AccessClaims(principal, str(claims["sid"]), expires), str(header["kid"])
