"""The master key ring wrapped by a key that lives in a hardware security
module, reached through PKCS#11 (python-pkcs11).

The HSM holds one AES-256 key, created by ``init --master-key pkcs11:...``:
sensitive, never extractable, good for encryption and decryption only. It
never leaves the module; it encrypts the key ring with AES-GCM inside the
module, and the result is ``DIR/keyring.pkcs11`` (0600):

    {"format": 1, "uri": "pkcs11:...", "nonce": b64, "ring": b64(ciphertext+tag)}

where the plaintext is the ring's keys, 32 bytes each, current first. The
unwrapped ring lives only in the memory of the process that asked the HSM to
open it; the file is useless without the HSM and its PIN. The URI names the
token, the key and the module (RFC 7512, the subset below) and, by reference,
the PIN: ``pin-source=file:/PATH`` (a 0600 file), else ``TESTHIDE_PKCS11_PIN``.
A PIN written into the URI (``pin-value``) is refused: the URI is recorded in
the data dir and shows on command lines.

    pkcs11:token=LABEL;object=KEYLABEL[;type=secret-key][;serial=SERIAL]
        ?module-path=/usr/lib/softhsm/libsofthsm2.so[&pin-source=file:/etc/testhide/pin]
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testhide.common.files import atomic_write
from testhide.controlplane.atrest import MasterKey, read_key_file
from testhide.controlplane.errors import ConfigError, IntegrityError

KEYRING_FILE = "keyring.pkcs11"
PIN_ENV = "TESTHIDE_PKCS11_PIN"
SCHEME = "pkcs11:"
_FORMAT = 1
_AAD = b"testhide pkcs11 key ring v1"
_NONCE = 12
_KEY = 32
_PATH_ATTRIBUTES = ("token", "object", "type", "serial")
_QUERY_ATTRIBUTES = ("module-path", "pin-source")
# RFC 7512's characters allowed unencoded in a value (beyond unreserved ones).
_PATH_SAFE = ":[]@!$'()*+,="
_QUERY_SAFE = _PATH_SAFE + "/?|"
_HEX = set("0123456789abcdefABCDEF")


@dataclass(frozen=True)
class Pkcs11Uri:
    """Which HSM key wraps the ring, in which token of which module, and where its PIN is."""

    token: str
    object: str
    module_path: Path
    pin_source: Path | None = None
    serial: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """A URI of the supported subset of RFC 7512, or a ConfigError that says what is wrong."""
        if not text.lower().startswith(SCHEME):
            raise ConfigError(f"a PKCS#11 URI starts with {SCHEME!r}: {_shown(text)}")
        path_part, _, query_part = text[len(SCHEME) :].partition("?")
        path = _attributes(path_part, ";", _PATH_ATTRIBUTES, text)
        query = _attributes(query_part, "&", _QUERY_ATTRIBUTES, text)
        for name in ("token", "object"):
            if not path.get(name):
                raise ConfigError(f"the PKCS#11 URI names no {name} ({name}=LABEL): {_shown(text)}")
        if path.get("type", "secret-key") != "secret-key":
            raise ConfigError(f"the PKCS#11 URI's type must be secret-key, not {path['type']!r}")
        module = query.get("module-path")
        if not module:
            raise ConfigError(
                "the PKCS#11 URI names no module (?module-path=/usr/lib/softhsm/libsofthsm2.so):"
                f" {_shown(text)}"
            )
        if not Path(module).is_absolute():
            raise ConfigError(f"the PKCS#11 URI's module-path must be absolute, not {module!r}")
        return cls(
            path["token"],
            path["object"],
            Path(module),
            _pin_path(query.get("pin-source")),
            path.get("serial"),
        )

    def __str__(self) -> str:
        path = [("token", self.token), ("object", self.object)]
        if self.serial is not None:
            path.append(("serial", self.serial))
        query = [("module-path", str(self.module_path))]
        if self.pin_source is not None:
            query.append(("pin-source", f"file:{self.pin_source}"))
        return (
            SCHEME
            + ";".join(f"{k}={quote(v, safe=_PATH_SAFE)}" for k, v in path)
            + "?"
            + "&".join(f"{k}={quote(v, safe=_QUERY_SAFE)}" for k, v in query)
        )

    def describe(self) -> str:
        return f"key {self.object!r} in token {self.token!r} of {self.module_path}"

    def pin(self) -> str:
        if self.pin_source is not None:
            try:
                return read_key_file(self.pin_source).rstrip("\r\n")
            except ConfigError:
                raise ConfigError(
                    f"the PIN file {self.pin_source} (pin-source) is missing or readable by group or"
                    " others (it must be 0600)"
                ) from None
        pin = os.environ.get(PIN_ENV)
        if not pin:
            raise ConfigError(
                f"no PIN for PKCS#11 token {self.token!r}: add pin-source=file:/PATH to the URI"
                f" or set {PIN_ENV}"
            )
        return pin


def master_key_choice(option: str | None) -> Path | Pkcs11Uri | None:
    """``--master-key``: a ring file (``file:PATH``), an HSM key (a ``pkcs11:`` URI), or None."""
    if option is None or not option.strip():
        return None
    if option.lower().startswith(SCHEME):
        return Pkcs11Uri.parse(option)
    if option.startswith("file:") and len(option) > len("file:"):
        return Path(option.removeprefix("file:"))
    # Not echoed: it may be a key given where its file belongs.
    raise ConfigError("--master-key takes file:PATH or a pkcs11: URI; the value given is neither")


def _shown(text: str) -> str:
    """The URI for an error message, without a PIN that may be in it."""
    return text.split("pin-value=")[0] + ("pin-value=..." if "pin-value=" in text else "")


def _attributes(part: str, separator: str, allowed: tuple[str, ...], text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    if not part:
        return found
    for item in part.split(separator):
        name, equals, value = item.partition("=")
        if name == "pin-value":
            raise ConfigError(
                f"the PKCS#11 URI holds the PIN itself (pin-value); give pin-source=file:/PATH (a 0600 file)"
                f" or set {PIN_ENV} instead"
            )
        if not equals:
            raise ConfigError(f"the PKCS#11 URI has {item!r} where NAME=VALUE belongs: {_shown(text)}")
        if name not in allowed:
            raise ConfigError(
                f"the PKCS#11 URI attribute {name!r} is not supported here (only {', '.join(allowed)})"
            )
        if name in found:
            raise ConfigError(f"the PKCS#11 URI gives {name} twice")
        pieces = value.split("%")
        if any(len(p) < 2 or not set(p[:2]) <= _HEX for p in pieces[1:]):
            raise ConfigError(f"the PKCS#11 URI's {name} has a bad percent-encoding: {value!r}")
        found[name] = unquote(value, errors="strict")
    return found


def _pin_path(source: str | None) -> Path | None:
    if source is None:
        return None
    path = source.removeprefix("file:")
    if not Path(path).is_absolute():
        raise ConfigError(f"pin-source must name a file by its absolute path (file:/PATH), not {source!r}")
    return Path(path)


# ---------------------------------------------------------------- the module

_modules: dict[Path, Any] = {}  # pkcs11.lib by path: loaded and initialised once
# One logged-in session at a time: a token's login is shared by all of a process's sessions.
_hsm_lock = threading.Lock()


def _library() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise ConfigError(
            "a master key in an HSM needs python-pkcs11: pip install 'testhide[pkcs11]'"
        ) from None
    return pkcs11


def _module(path: Path) -> Any:
    pkcs11 = _library()
    if path not in _modules:
        if not path.is_file():
            raise ConfigError(f"the PKCS#11 module {path} does not exist (module-path in the URI)")
        try:
            _modules[path] = pkcs11.lib(str(path))
        except pkcs11.PKCS11Error as exc:
            raise ConfigError(f"cannot load the PKCS#11 module {path}: {exc}") from exc
    return _modules[path]


@contextmanager
def _session(uri: Pkcs11Uri, rw: bool = False) -> Iterator[Any]:
    """A logged-in session on the URI's token; PKCS#11 failures become one-line ConfigErrors."""
    pkcs11 = _library()
    errors = pkcs11.exceptions
    pin = uri.pin()
    token_name = f"token {uri.token!r} of {uri.module_path}"
    with _hsm_lock:
        module = _module(uri.module_path)
        try:
            serial = {"token_serial": uri.serial.encode()} if uri.serial is not None else {}
            token = module.get_token(token_label=uri.token, **serial)
        except errors.NoSuchToken:
            raise ConfigError(f"no {token_name} (is the HSM connected and the token initialised?)") from None
        except errors.MultipleTokensReturned:
            raise ConfigError(
                f"several tokens are labelled {uri.token!r}: add serial=... to the URI"
            ) from None
        except errors.PKCS11Error as exc:
            raise ConfigError(f"{token_name} cannot be reached: {_name(exc)}") from exc
        try:
            session = token.open(user_pin=pin, rw=rw)
        except errors.PinIncorrect:
            raise ConfigError(f"the PIN of {token_name} is wrong") from None
        except errors.PinLocked:
            raise ConfigError(f"the PIN of {token_name} is locked (too many wrong PINs)") from None
        except errors.PKCS11Error as exc:
            raise ConfigError(f"cannot log in to {token_name}: {_name(exc)}") from exc
        try:
            yield session
        except errors.PKCS11Error as exc:  # what the caller did not expect: the device, the session
            raise ConfigError(f"{token_name} failed: {_name(exc)}") from exc
        finally:
            session.close()


def _name(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _key(session: Any, uri: Pkcs11Uri) -> Any:
    errors = _library().exceptions
    from pkcs11 import KeyType, ObjectClass

    try:
        return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=uri.object)
    except errors.NoSuchKey:
        raise ConfigError(
            f"token {uri.token!r} has no AES key labelled {uri.object!r}"
            " ('testhide-controlplane init --master-key URI' creates it)"
        ) from None
    except errors.MultipleObjectsReturned:
        raise ConfigError(f"token {uri.token!r} has several keys labelled {uri.object!r}") from None


def ensure_key(uri: Pkcs11Uri) -> bool:
    """The URI's key, created in the token if it has none by that label; True if created.
    Sensitive and never extractable: it can only encrypt and decrypt inside the module."""
    pkcs11 = _library()
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

    with _session(uri, rw=True) as session:
        try:
            session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=uri.object)
            return False
        except pkcs11.exceptions.NoSuchKey:
            pass
        except pkcs11.exceptions.MultipleObjectsReturned:
            raise ConfigError(f"token {uri.token!r} has several keys labelled {uri.object!r}") from None
        try:
            session.generate_key(
                KeyType.AES,
                256,
                label=uri.object,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                },
            )
        except pkcs11.PKCS11Error as exc:
            raise ConfigError(f"token {uri.token!r} refused to create the AES key: {_name(exc)}") from exc
    return True


def _gcm(uri: Pkcs11Uri, data: bytes, nonce: bytes, decrypt: bool) -> bytes:
    pkcs11 = _library()
    from pkcs11 import Mechanism
    from pkcs11.mechanisms import GCMParams

    with _session(uri) as session:
        key = _key(session, uri)
        try:
            operation = key.decrypt if decrypt else key.encrypt
            result = operation(data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, _AAD, 128))
        except pkcs11.exceptions.MechanismInvalid:
            raise ConfigError(f"the PKCS#11 module {uri.module_path} does not offer AES-GCM") from None
        except _unavailable(pkcs11.exceptions):
            raise  # not the ring's fault: _session says what failed
        except pkcs11.PKCS11Error as exc:
            if decrypt:  # modules differ in the code they give a failed tag (SoftHSM: CKR_GENERAL_ERROR)
                raise IntegrityError(
                    f"the key ring in {KEYRING_FILE} failed authentication in the HSM"
                    f" (tampered, or wrapped by another key than {uri.describe()})"
                ) from exc
            raise ConfigError(f"the HSM refused to encrypt with {uri.describe()}: {_name(exc)}") from exc
    assert isinstance(result, bytes)
    return result


def _unavailable(errors: Any) -> tuple[type[Exception], ...]:
    """PKCS#11 failures of the device or the session, never of the data."""
    return (
        errors.DeviceError,
        errors.DeviceMemory,
        errors.DeviceRemoved,
        errors.TokenNotPresent,
        errors.SessionClosed,
        errors.SessionHandleInvalid,
        errors.HostMemory,
        errors.UserNotLoggedIn,
        errors.FunctionCancelled,
        errors.KeyHandleInvalid,
    )


# ---------------------------------------------------------------- the wrapped ring


@dataclass(frozen=True)
class WrappedRing:
    """The key ring as the HSM wrapped it, and the URI of the key that did."""

    uri: Pkcs11Uri
    nonce: bytes
    sealed: bytes

    @classmethod
    def wrap(cls, uri: Pkcs11Uri, keys: Sequence[bytes]) -> WrappedRing:
        nonce = os.urandom(_NONCE)
        return cls(uri, nonce, _gcm(uri, b"".join(keys), nonce, decrypt=False))

    def unwrap(self) -> tuple[bytes, ...]:
        plain = _gcm(self.uri, self.sealed, self.nonce, decrypt=True)
        if not plain or len(plain) % _KEY:
            raise IntegrityError(f"the key ring in {KEYRING_FILE} is malformed")
        return tuple(plain[i : i + _KEY] for i in range(0, len(plain), _KEY))

    def encode(self) -> bytes:
        return json.dumps(self.as_json(), indent=2).encode() + b"\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "uri": str(self.uri),
            "nonce": base64.b64encode(self.nonce).decode(),
            "ring": base64.b64encode(self.sealed).decode(),
            "note": "the master key ring, encrypted by a key that never leaves the HSM the URI names",
        }

    @classmethod
    def decode(cls, raw: bytes | dict[str, Any], origin: str) -> WrappedRing:
        try:
            data = json.loads(raw) if isinstance(raw, bytes) else raw
            if data.get("format") != _FORMAT:
                raise ConfigError(f"{origin} has an unsupported format {data.get('format')!r}")
            return cls(
                Pkcs11Uri.parse(str(data["uri"])),
                base64.b64decode(data["nonce"], validate=True),
                base64.b64decode(data["ring"], validate=True),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{origin} is damaged") from exc


class Pkcs11RingFile:
    """``DIR/keyring.pkcs11``: a ``RingFile`` whose keys the HSM unwraps on every read.
    ``uri``: the key to use instead of the one the file records (another module path or
    PIN source on this machine; the key must be the same)."""

    kind = "pkcs11"

    def __init__(self, path: Path, uri: Pkcs11Uri | None = None) -> None:
        self.path, self._uri = path, uri

    def _read_wrapped(self) -> WrappedRing:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is missing: the HSM-wrapped master key ring is gone") from None
        wrapped = WrappedRing.decode(raw, str(self.path))
        return wrapped if self._uri is None else replace(wrapped, uri=self._uri)

    def uri(self) -> Pkcs11Uri:
        return self._uri or self._read_wrapped().uri

    def describe(self) -> str:
        try:
            return f"{self.path}, wrapped by {self.uri().describe()}"
        except (ConfigError, IntegrityError):
            return str(self.path)

    def read(self) -> tuple[bytes, ...]:
        return self._read_wrapped().unwrap()

    def write(self, keys: Sequence[bytes]) -> None:
        atomic_write(self.path, WrappedRing.wrap(self.uri(), keys).encode(), 0o600)

    def snapshot(self) -> tuple[WrappedRing, MasterKey]:
        """The wrapped ring as the file has it now, and the ring it opens to: one consistent pair."""
        wrapped = self._read_wrapped()
        return wrapped, MasterKey(*wrapped.unwrap(), ring_file=self)


def create_ring(path: Path, uri: Pkcs11Uri) -> MasterKey:
    """A new ring, wrapped by the URI's key (created in the token if absent), saved at ``path``."""
    ensure_key(uri)
    master = MasterKey(AESGCM.generate_key(bit_length=256), ring_file=Pkcs11RingFile(path, uri))
    master.persist()
    opened = MasterKey.from_ring_file(Pkcs11RingFile(path))  # the HSM opens what it wrapped
    if opened.key_ids != master.key_ids:
        raise IntegrityError(f"the HSM did not give back the key ring it wrapped into {path}")
    return opened


def install_ring(path: Path, wrapped: WrappedRing) -> MasterKey:
    """Write ``wrapped`` (from a backup) as ``path`` once the HSM opens it."""
    keys = wrapped.unwrap()
    atomic_write(path, wrapped.encode(), 0o600)
    return MasterKey(*keys, ring_file=Pkcs11RingFile(path))
