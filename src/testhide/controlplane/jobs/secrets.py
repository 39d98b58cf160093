"""Organisation secrets: sealed under their own data keys, readable only by
the scheduler when it hands a job to the agent that runs it."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime

from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.errors import InvalidArgument, NotFound
from testhide.controlplane.jobs.model import SecretInfo
from testhide.controlplane.jobs.store import SecretStore
from testhide.controlplane.jobs.validation import SECRET_NAME_RE

MAX_SECRET_BYTES = 64 * 1024


def secret_aad(org: str, name: str) -> bytes:
    return f"secret:{org}:{name}".encode()


def validate_secret_name(name: str) -> str:
    if not SECRET_NAME_RE.match(name):
        raise InvalidArgument(
            f"secret name {name[:64]!r} must be 1-128 of A-Z, 0-9 and _, not starting with a digit"
        )
    return name


class SecretVault:
    def __init__(self, store: SecretStore, master: MasterKey) -> None:
        self._store = store
        self._master = master

    async def set(self, org: str, name: str, value: bytes) -> datetime:
        validate_secret_name(name)
        if not value or len(value) > MAX_SECRET_BYTES:
            raise InvalidArgument(f"a secret value must be 1 to {MAX_SECRET_BYTES} bytes")
        try:
            value.decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                "a secret value must be UTF-8 text (it becomes an environment variable)"
            ) from exc
        data_key, wrapped = self._master.new_data_key(aad=secret_aad(org, name))
        now = datetime.now(UTC)
        await self._store.put_secret(org, name, wrapped, seal(data_key, value, secret_aad(org, name)), now)
        return now

    async def list(self, org: str) -> list[SecretInfo]:
        return await self._store.list_secrets(org)

    async def delete(self, org: str, name: str) -> datetime:
        validate_secret_name(name)
        deleted = await self._store.delete_secret(org, name)
        if deleted is None:
            raise NotFound(f"secret {name} not found")
        return deleted

    async def missing(self, org: str, names: tuple[str, ...]) -> builtins.list[str]:
        found = await self._store.get_secrets(org, names)
        return [n for n in names if n not in found]

    async def resolve(self, org: str, names: tuple[str, ...], job_id: str = "") -> dict[str, str]:
        """Plaintext values for an assignment; a deleted secret fails the job. With
        ``job_id``, each is recorded as last used by that job, now (what `ListSecrets` shows)."""
        found = await self._store.get_secrets(org, names)
        missing = [n for n in names if n not in found]
        if missing:
            raise NotFound(f"secrets not found: {', '.join(missing)}")
        if job_id and names:
            await self._store.record_secret_use(org, names, job_id, datetime.now(UTC))
        values = {}
        for name, (wrapped, sealed) in found.items():
            data_key = self._master.unwrap_data_key(wrapped, aad=secret_aad(org, name))
            values[name] = unseal(data_key, sealed, secret_aad(org, name)).decode()
        return values
