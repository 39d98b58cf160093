"""Statement-signing keys and jobs' signed statements in the store, on SQLite and PostgreSQL:
keys kept oldest first and retired once, the first made once however many results ask at once
(and by two replicas at once, neither retiring the other's), a job's first statement kept (a
replayed result does not replace it) and only for a job of its organisation, read back only by
that organisation, master-key rotation re-wrapping a key's data key so that it still signs, and
a move to PostgreSQL with the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from testhide.common.statement import PAYLOAD_TYPE, pae, signature_valid
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.statement_keys import StatementKeys, new_statement_key, rotate, unseal_key
from testhide.controlplane.ca.statement_store import JobStatementRecord
from testhide.controlplane.masterkey import rewrap_data_keys
from testhide.controlplane.store.base import Store
from testhide.controlplane.store.pg_copy import SqliteSnapshot, copy_store
from testhide.controlplane.store.postgres import PgStore
from testhide.controlplane.store.sqlite import SqliteStore
from tests.integration.test_store import NOW, POSTGRES, SQLITE, empty_store, make_job, populate


@pytest.fixture(params=[SQLITE, POSTGRES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        yield s


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test.local")


def kept(
    job_id: str, payload: bytes = b"{}", org: str = "acme", key: str | None = None
) -> JobStatementRecord:
    return JobStatementRecord(
        job_id, org, payload, b"agent-sig", b"agent-cert", NOW, b"counter" if key else None, key
    )


async def test_keys_are_kept_oldest_first_and_retired_once(store: Store, ca: CertificateAuthority) -> None:
    master = MasterKey.generate()
    first = new_statement_key(ca, master, NOW)
    second = new_statement_key(ca, master, NOW + timedelta(days=1))
    await store.add_statement_key(second)
    await store.add_statement_key(first)
    assert [k.id for k in await store.statement_keys()] == [first.id, second.id]
    assert await store.retire_statement_key(first.id, NOW + timedelta(days=1))
    assert not await store.retire_statement_key(first.id, NOW + timedelta(days=2))
    stored = await store.statement_keys()
    assert stored[0].retired_at == NOW + timedelta(days=1)
    assert stored[1].retired_at is None
    assert (stored[1].certificate, stored[1].active_until) == (second.certificate, second.active_until)


async def test_the_first_statement_of_a_job_stays(store: Store, ca: CertificateAuthority) -> None:
    master = MasterKey.generate()
    key = new_statement_key(ca, master, NOW)
    await store.add_statement_key(key)
    await store.create_job(make_job("j1"), b"wrapped")
    first, replayed = kept("j1", b'{"first":1}', key=key.id), kept("j1", b'{"replayed":1}')
    assert await store.add_job_statements([first, replayed]) == [True, False]  # one transaction
    assert await store.add_job_statements([replayed]) == [False]
    found = await store.job_statement("acme", "j1")
    assert found is not None
    assert (found.payload, found.countersignature, found.signing_key_id) == (
        b'{"first":1}',
        b"counter",
        key.id,
    )
    assert await store.job_statement("other", "j1") is None  # scoped by organisation


async def test_a_statement_for_another_organisations_job_is_not_kept(store: Store) -> None:
    await store.create_job(make_job("j1"), b"wrapped")
    mismatched = JobStatementRecord("j1", "acme", b"{}", b"s", b"c", NOW, mismatch="exit_code: differs")
    assert await store.add_job_statements([kept("j1", org="other"), mismatched]) == [False, True]
    assert await store.job_statement("other", "j1") is None
    found = await store.job_statement("acme", "j1")
    assert found is not None
    assert found.countersignature is None
    assert found.mismatch == "exit_code: differs"


async def test_master_key_rotation_rewraps_a_statement_key_which_still_signs(
    store: Store, ca: CertificateAuthority
) -> None:
    master = MasterKey.generate()
    keys = StatementKeys(store, master, lambda: ca)
    signing = await keys.current()  # made: there was none
    rotated = master.with_new_current()
    sweep = await rewrap_data_keys(store, rotated)
    assert (sweep.changed, sweep.damaged) == (1, ())
    record = (await store.statement_keys())[0]
    assert rotated.is_current(record.data_key)
    reopened = unseal_key(record, rotated.only_current())
    assert reopened.id == signing.id
    cert = x509.load_der_x509_certificate(record.certificate)
    assert signature_valid(cert, b"payload", reopened.countersign(b"payload"))
    assert pae(PAYLOAD_TYPE, b"payload").startswith(b"DSSEv1 ")


async def test_a_rotation_retires_the_key_before_and_a_running_control_plane_takes_the_new_one(
    store: Store, ca: CertificateAuthority
) -> None:
    master = MasterKey.generate()
    keys = StatementKeys(store, master, lambda: ca)
    before = await keys.current()
    record, retired = await rotate(store, ca, master, datetime.now(UTC))
    assert retired == [before.id]
    fresh = StatementKeys(store, master, lambda: ca)
    assert (await fresh.current()).id == record.id
    assert len(await fresh.certificates()) == 2  # the old one's still published


async def test_the_files_of_a_batch_of_jobs_are_read_at_once_within_the_organisation(store: Store) -> None:
    for job_id, org in (("j1", "acme"), ("j2", "acme"), ("j3", "other")):
        await store.create_job(make_job(job_id, org), b"wrapped")
    for n, (org, job_id, kind, path, complete) in enumerate(
        [
            ("acme", "j1", "artifact", "b.txt", True),
            ("acme", "j1", "artifact", "a.txt", True),
            ("acme", "j1", "junit", "report.xml", True),
            ("acme", "j1", "workspace", "ws.tar", True),  # not asked for
            ("acme", "j2", "service_log", "services/db.log", True),
            ("acme", "j2", "artifact", "partial.bin", False),  # never completed
            ("other", "j3", "artifact", "theirs.txt", True),
        ]
    ):
        blob_id = f"b{n}"
        await store.create_blob(blob_id, org, kind, job_id, path, b"key", NOW)
        if complete:
            await store.complete_blob(blob_id, n, f"{n:064x}")
    found = await store.jobs_blobs("acme", ["j1", "j2", "j3"], ("artifact", "junit", "service_log"))
    assert {job_id: [(b.kind, b.path) for b in blobs] for job_id, blobs in found.items()} == {
        "j1": [("artifact", "a.txt"), ("artifact", "b.txt"), ("junit", "report.xml")],
        "j2": [("service_log", "services/db.log")],
    }


async def test_the_first_key_is_made_once_for_a_batch_of_results_at_once(
    store: Store, ca: CertificateAuthority
) -> None:
    """The results of one group commit ask for the key together before there is one."""
    keys = StatementKeys(store, MasterKey.generate(), lambda: ca)
    asked = await asyncio.gather(*(keys.current() for _ in range(20)))
    assert len({k.id for k in asked}) == 1
    [record] = await store.statement_keys()
    assert (record.id, record.retired_at) == (asked[0].id, None)


async def test_two_replicas_making_a_first_key_at_once_both_keep_a_usable_one(
    store: Store, ca: CertificateAuthority
) -> None:
    master = MasterKey.generate()
    one, two = StatementKeys(store, master, lambda: ca), StatementKeys(store, master, lambda: ca)
    first, second = await asyncio.gather(one.current(), two.current())
    records = {r.id: r for r in await store.statement_keys()}
    assert {first.id, second.id} <= set(records)
    assert all(record.retired_at is None for record in records.values())  # adding retires nothing


async def test_statements_and_keys_move_to_postgresql(
    tmp_path: Path, pg_url: str, ca: CertificateAuthority
) -> None:
    master = MasterKey.generate()
    sqlite = await SqliteStore.open(tmp_path / "testhide.db")
    try:
        await populate(sqlite)
        key = new_statement_key(ca, master, NOW)
        await sqlite.add_statement_key(key)
        await sqlite.create_job(make_job("j1"), b"wrapped")
        await sqlite.add_job_statements([kept("j1", key=key.id)])
    finally:
        await sqlite.close()
    snapshot, postgres = await SqliteSnapshot.open(tmp_path / "testhide.db"), await PgStore.open(pg_url)
    try:
        copied = await copy_store(snapshot, postgres)
        assert (copied["statement_keys"], copied["job_statements"]) == (1, 1)
        moved = (await postgres.statement_keys())[0]
        assert unseal_key(moved, master).id == key.id
        found = await postgres.job_statement("acme", "j1")
        assert found is not None
        assert found.signing_key_id == key.id
    finally:
        await snapshot.close()
        await postgres.close()
