"""What the statement-signing keys and jobs' signed statements need of the store
(``ca/statement_keys.py``, ``jobs/statements.py``); both backends implement it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class StatementKeyRecord:
    """A statement-signing key as stored: its private key sealed under its data key."""

    id: str
    """The DSSE key id: sha256 (hex) of its certificate's DER."""
    data_key: bytes
    """The key's data key, wrapped by the master key (associated data: the id)."""
    private_key: bytes
    """PKCS#8 DER, sealed under the data key."""
    certificate: bytes
    """DER, issued by the control plane's CA."""
    created_at: datetime
    active_until: datetime
    """When it stops signing (a new key takes over); its certificate lasts a retirement window longer."""
    retired_at: datetime | None = None
    """When an operator's rotation retired it early."""


@dataclass(frozen=True)
class JobStatementRecord:
    job_id: str
    org: str
    payload: bytes
    agent_signature: bytes
    agent_certificate: bytes
    """DER."""
    recorded_at: datetime
    countersignature: bytes | None = None
    signing_key_id: str | None = None
    mismatch: str = ""
    """The first field of the statement that disagreed with the stored job; empty: none."""


class StatementStore(Protocol):
    async def add_statement_key(self, record: StatementKeyRecord) -> None: ...

    async def statement_keys(self) -> list[StatementKeyRecord]:
        """Every statement-signing key, oldest first."""
        ...

    async def retire_statement_key(self, key_id: str, at: datetime) -> bool:
        """Retire a key not retired yet; whether it was."""
        ...

    async def add_job_statements(self, records: Sequence[JobStatementRecord]) -> list[bool]:
        """Keep jobs' statements, in one transaction; a job's first one kept stays (an agent
        replaying its result sends it again), and only for a job of the record's organisation.
        Whether each one was kept, in order."""
        ...

    async def job_statement(self, org: str, job_id: str) -> JobStatementRecord | None: ...
