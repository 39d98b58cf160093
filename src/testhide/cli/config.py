"""The engineer's stored sessions, one per profile (a control plane: its
servers, replicas tried in order, CA, and the current access and refresh
tokens), each in its own 0600 file. The API key or password used to log in is
never stored.

The ``default`` profile lives in ``credentials.json``, where every session was
kept before profiles, so that an existing login goes on working; any other
profile NAME in ``profiles/NAME.json``. The profile a command uses is the
``--profile`` option's (or ``TESTHIDE_PROFILE``), set once by the command line
with `use_profile`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from testhide.cli.errors import CliError, NotLoggedIn

DEFAULT_PROFILE = "default"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_active: str | None = None


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "testhide"


def check_profile(name: str) -> str:
    """``name`` if it can name a profile (it becomes a file name); ValueError if not."""
    if not _PROFILE_NAME.fullmatch(name):
        raise ValueError(
            f"{name[:70]!r} is not a profile name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64"
        )
    return name


def use_profile(name: str) -> None:
    """The profile `Login.load` reads and a new login is saved to, for this process."""
    global _active
    _active = check_profile(name)


def active_profile() -> str:
    return _active or os.environ.get("TESTHIDE_PROFILE") or DEFAULT_PROFILE


def profile_path(name: str) -> Path:
    if name == DEFAULT_PROFILE:
        return config_dir() / "credentials.json"
    return config_dir() / "profiles" / f"{check_profile(name)}.json"


def stored_profiles() -> list[str]:
    """The profiles with a stored session, sorted (``default`` first)."""
    names = [DEFAULT_PROFILE] if profile_path(DEFAULT_PROFILE).is_file() else []
    directory = config_dir() / "profiles"
    if directory.is_dir():
        names += sorted(p.stem for p in directory.glob("*.json") if _PROFILE_NAME.fullmatch(p.stem))
    return names


def read_ca_file(path: Path) -> str:
    """The PEM text of ``login --ca-file``, checked here: gRPC's own refusal of a
    file that is not PEM is a few lines of its C core and a vague error."""
    from cryptography import x509  # only for a login with --ca-file

    try:
        data = path.read_bytes()
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
        return data.decode("ascii")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # cryptography's refusal, or text that is not ASCII
        raise CliError(f"{path} is not a PEM CA certificate (expected -----BEGIN CERTIFICATE-----)") from exc


def _login_hint(profile: str) -> str:
    option = "" if profile == DEFAULT_PROFILE else f" --profile {profile}"
    return f"testhide{option} login --server HOST:PORT --api-key-stdin (or --user NAME)"


@dataclass(frozen=True)
class Login:
    servers: tuple[str, ...]
    """HOST:PORT of the control plane's API port, one per replica, in the order they are tried."""
    ca_pem: str | None
    access_token: str = ""
    access_expires_at: float = 0.0
    refresh_token: str = ""
    refresh_expires_at: float = 0.0
    """When the session ends (its refresh token expires), in seconds since the epoch; 0 if unknown."""
    profile: str = field(default=DEFAULT_PROFILE, compare=False)
    """Which profile this is; the file's name, not stored in it."""

    def __post_init__(self) -> None:
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ValueError("servers must be a non-empty list of HOST:PORT")

    @classmethod
    def load(cls, profile: str | None = None) -> Login:
        """The session of ``profile`` (by default the active one)."""
        name = profile or active_profile()
        path = profile_path(name)
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise TypeError("not a JSON object")
            if "server" in stored:  # saved before several servers: one
                stored["servers"] = [stored.pop("server")]
            if not isinstance(stored.get("servers"), list):
                raise TypeError("servers is not a list")
            stored.pop("profile", None)
            return cls(**{**stored, "servers": tuple(stored["servers"]), "profile": name})
        except FileNotFoundError:
            raise NotLoggedIn(f"not logged in: run '{_login_hint(name)}'") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise NotLoggedIn(f"{path} is damaged ({exc}); run 'testhide login' again") from exc

    def for_profile(self, profile: str) -> Login:
        return replace(self, profile=check_profile(profile))

    def save(self) -> Path:
        path = profile_path(self.profile)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stored = asdict(self)
        del stored["profile"]
        with os.fdopen(fd, "w") as handle:
            json.dump(stored, handle)
        os.replace(tmp, path)
        return path

    def forget(self) -> bool:
        """Remove the stored session; whether there was one."""
        try:
            profile_path(self.profile).unlink()
        except FileNotFoundError:
            return False
        return True
