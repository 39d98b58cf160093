"""The engineer's stored session: the servers (replicas of one control
plane, tried in order), CA, and the current access and refresh tokens, in a
0600 file. The API key or password used to log in is never stored."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from testhide.cli.errors import NotLoggedIn


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "testhide"


@dataclass(frozen=True)
class Login:
    servers: tuple[str, ...]
    """HOST:PORT of the control plane's API port, one per replica, in the order they are tried."""
    ca_pem: str | None
    access_token: str = ""
    access_expires_at: float = 0.0
    refresh_token: str = ""

    def __post_init__(self) -> None:
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ValueError("servers must be a non-empty list of HOST:PORT")

    @classmethod
    def load(cls) -> Login:
        path = config_dir() / "credentials.json"
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise TypeError("not a JSON object")
            if "server" in stored:  # saved before several servers: one
                stored["servers"] = [stored.pop("server")]
            if not isinstance(stored.get("servers"), list):
                raise TypeError("servers is not a list")
            return cls(**{**stored, "servers": tuple(stored["servers"])})
        except FileNotFoundError:
            raise NotLoggedIn(
                "not logged in: run 'testhide login --server HOST:PORT --api-key KEY'"
            ) from None
        except (ValueError, TypeError, KeyError) as exc:
            raise NotLoggedIn(f"{path} is damaged ({exc}); run 'testhide login' again") from exc

    def save(self) -> Path:
        directory = config_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / "credentials.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle)
        os.replace(tmp, path)
        return path
