"""A copy of a PostgreSQL data dir is all another machine needs: it serves as
a replica, and what an operator rotates through either copy (the server
certificate, the token signing keys, the CA, the master key) reaches the
other through the database, sealed under the master key."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from testhide.controlplane.datadir import DataDir
from testhide.protos.v1 import jobs_pb2, jobs_pb2_grpc
from tests.harness import REPO, RunningControlPlane, control_plane, eventually, free_port, operator, serving

pytestmark = pytest.mark.timeout(300)


def copy_data_dir(source: Path, target: Path) -> Path:
    """What an operator copies to another machine: the whole dir but what runs there."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("run", ".*.lock"))
    target.chmod(0o700)
    return target


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def served_serial(cp: RunningControlPlane) -> int:
    assert cp.daemon.certificates is not None
    return cp.daemon.certificates.current.server_certificate.serial_number


async def list_jobs_with(cp: RunningControlPlane, token: str) -> None:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        await jobs_pb2_grpc.JobsStub(channel).List(
            jobs_pb2.ListJobsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )


async def test_a_copy_of_the_data_dir_is_a_replica_that_follows_rotations_made_through_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    async with control_plane(tmp_path / "one", database_url=pg_url) as a:
        copy = copy_data_dir(a.data_dir, tmp_path / "two" / "controlplane")
        async with serving(copy, a.admin_key) as b:
            # The server certificate, rotated through the first copy, is served by the second.
            code, _, err = await operator("server-cert", "rotate", "--data-dir", str(a.data_dir))
            assert code == 0, err
            rotated = serial_of(a.data_dir / "server.pem")
            await eventually(lambda: served_serial(b) == rotated, within=10, what="the copy to serve it")
            assert serial_of(copy / "server.pem") == rotated

            # A signing key rotated through the second copy signs tokens the first accepts.
            code, _, err = await operator("signing-keys", "rotate", "--data-dir", str(copy))
            assert code == 0, err
            active = DataDir(copy).require_initialised()["signing"]["active"]

            def both_sign_with_it() -> bool:
                return all(r.daemon.signing_keys and r.daemon.signing_keys.active == active for r in (a, b))

            await eventually(both_sign_with_it, within=10, what="both copies to sign with it")
            await list_jobs_with(a, await b.access_token())
            await list_jobs_with(b, await a.access_token())

            # A CA generation prepared through one copy is trusted by both.
            code, _, err = await operator("ca", "rotate", "prepare", "--data-dir", str(copy))
            assert code == 0, err
            assert a.daemon.certificates is not None
            certs = a.daemon.certificates
            await eventually(
                lambda: len(certs.current.trusted) == 2, within=10, what="the first copy to trust the new CA"
            )
            assert (a.data_dir / "cas" / "ca-2.pem").read_bytes() == (copy / "cas" / "ca-2.pem").read_bytes()


async def test_master_key_rotation_waits_for_every_copy_and_reseals_what_they_share(
    tmp_path: Path, pg_url: str
) -> None:
    async with control_plane(tmp_path / "one", database_url=pg_url) as a:
        copy = copy_data_dir(a.data_dir, tmp_path / "two" / "controlplane")
        async with serving(copy, a.admin_key) as b:
            rotation = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "testhide.controlplane.cli",
                "master-key",
                "rotate",
                "--data-dir",
                str(a.data_dir),
                "--wait",
                "60",
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            # The rotation adds the new key to the first copy's ring, then waits for every replica.
            ring_file = a.data_dir / "master.key"
            old_ring = (copy / "master.key").read_bytes()
            await eventually(lambda: ring_file.read_bytes() != old_ring, within=30, what="the new ring")
            waited = rotation.returncode is None
            assert waited, "the rotation did not wait for the other copy"
            # The operator brings the new ring to the other machine; its replica picks it up.
            shutil.copyfile(ring_file, copy / "master.key")
            _, err = await asyncio.wait_for(rotation.communicate(), 120)
            assert rotation.returncode == 0, err.decode()

            # Both copies hold only the new key now, and what one rotates the other still opens.
            assert (copy / "master.key").read_bytes() != old_ring
            code, _, err_text = await operator("server-cert", "rotate", "--data-dir", str(a.data_dir))
            assert code == 0, err_text
            rotated = serial_of(a.data_dir / "server.pem")
            await eventually(lambda: served_serial(b) == rotated, within=10, what="the copy to follow")


async def test_init_on_postgres_records_the_url_privately_and_refuses_a_database_already_in_use(
    tmp_path: Path, pg_url: str
) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text(pg_url + "\n")
    first = tmp_path / "first"
    code, out, err = await operator("init", "--data-dir", str(first), "--database-file", str(url_file))
    assert code == 0, err
    assert out.startswith("thk_")  # the admin key, shown once
    recorded = first / "database.url"
    assert recorded.read_text().strip() == pg_url
    assert recorded.stat().st_mode & 0o777 == 0o600
    assert not (first / "testhide.db").exists()
    assert DataDir(first).require_initialised()["store"] == "postgresql"

    # A second install on the same database is refused, and leaves nothing behind.
    second = tmp_path / "second"
    code, _, err = await operator("init", "--data-dir", str(second), "--database-file", str(url_file))
    assert code != 0
    assert "already holds a testhide control plane" in err
    assert "copy its data dir" in err
    assert not second.exists()


async def test_init_with_a_database_that_cannot_be_reached_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    closed = free_port()  # bound and released: nothing listens there
    target = tmp_path / "cp"
    code, _, err = await operator(
        "init", "--data-dir", str(target), "--database", f"postgresql://u:secret@127.0.0.1:{closed}/db"
    )
    assert code != 0
    assert "database is unavailable" in err
    assert "secret" not in err
    assert "Traceback" not in err
    assert not target.exists()
