"""The lines an operator reads to diagnose a connection: every attempt of an
agent to reach the control plane (where, why the one before ended, how long it
waits), a failover to the next replica, what the outbox sends again after a
reconnect, a certificate renewal on both sides, and on the control plane each
agent stream opened, closed or refused, a slow store call and the PostgreSQL
listener coming back. Real control planes and agents in this process
(FakeRuntime), the events read with structlog's ``capture_logs``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from structlog.testing import capture_logs

from testhide.agent.credentials import Credentials
from testhide.agent.runtime.fake import FakeRuntime
from testhide.controlplane import store_timing as metrics_module
from tests.harness import (
    RunningControlPlane,
    agent_running,
    control_plane,
    enrolled,
    eventually,
    free_port,
    running_agent,
    serving,
    wait_until,
)
from tests.integration.test_agent_channel import FIRST, SECOND, WITHIN, Puppet, read_log, submit
from tests.integration.test_identity import stream_until_expiry
from tests.integration.test_transport import agent_certificate, connect_with, our_ca

Event = MutableMapping[str, Any]


def logged(events: list[Event], event: str, **fields: object) -> list[Event]:
    """The captured events called ``event`` whose ``fields`` have these values."""
    return [e for e in events if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]


async def until_logged(events: list[Event], event: str, **fields: object) -> Event:
    found: list[Event] = await eventually(
        lambda: logged(events, event, **fields), WITHIN, f"{event} {fields}"
    )
    return found[0]


def serial_of(credentials: Credentials) -> str:
    return format(credentials.certificate.serial_number, "x")


@pytest.fixture
def events() -> Iterator[list[Event]]:
    with capture_logs() as captured:
        yield captured


async def test_a_reconnect_after_a_control_plane_restart_says_where_why_and_what_was_resent(
    tmp_path: Path, events: list[Event]
) -> None:
    ports = {"listen": f"127.0.0.1:{free_port()}", "agent_listen": f"127.0.0.1:{free_port()}"}
    puppet = Puppet()
    async with control_plane(tmp_path, **ports, shutdown_grace=timedelta(seconds=1)) as first:
        data_dir = await enrolled(first, tmp_path)
        target = first.agent_target
        admin_key = first.admin_key
        async with agent_running(data_dir, puppet, max_backoff=timedelta(seconds=1)) as agent:
            assert first.daemon.scheduler is not None
            await asyncio.wait_for(first.daemon.scheduler.wait_for_agent(agent.agent_id), WITHIN)
            job_id = await submit(first, workspace=False)
            await read_log(first, job_id, lambda log, _: FIRST in log)
            await first.daemon.shutdown()
            # Down: the job ends, its last output waits in the spool, its result in the outbox.
            await until_logged(events, "controlplane_unreachable", endpoint=target, code="UNAVAILABLE")
            await puppet.finish(job_id, SECOND)
            await asyncio.wait_for(agent.job_done(job_id), WITHIN)
            assert agent.outbox.spooled_bytes > 0
            async with serving(first.data_dir, admin_key, **ports) as second:
                assert second.daemon.scheduler is not None
                await asyncio.wait_for(second.daemon.scheduler.wait_for_agent(agent.agent_id), WITHIN)
                await asyncio.wait_for(agent.outbox.wait_empty(), WITHIN)

    lost = await until_logged(events, "controlplane_connection_lost", endpoint=target)
    assert lost["log_level"] == "warning"
    assert lost["code"] == "UNAVAILABLE", lost
    assert "shutting down" in lost["error"]
    unreachable = logged(events, "controlplane_unreachable", endpoint=target, code="UNAVAILABLE")[0]
    assert unreachable["log_level"] == "warning"
    assert 0 <= unreachable["retry_in_s"] <= 1  # the back-off chosen, capped by max_backoff
    assert unreachable["error"]  # gRPC's details: why the attempt failed
    attempts = logged(events, "controlplane_connecting", endpoint=target)
    assert {a["log_level"] for a in attempts} == {"debug"}
    # The first series connects at once; after the restart every attempt names why the last ended.
    assert [a["attempt"] for a in attempts][:2] == [1, 1]
    retries = [a for a in attempts if a["attempt"] > 1]
    assert retries, attempts
    assert {a["previous_code"] for a in retries} == {"UNAVAILABLE"}
    assert not logged(events, "controlplane_failover")  # one replica: nowhere else to go
    replays = logged(events, "outbox_replayed")
    assert replays[0]["jobs"] == 0  # the first connection had nothing to send again
    last = replays[-1]
    assert last["log_level"] == "debug"
    assert (last["jobs"], last["results"]) == (1, 1), last
    assert last["batches_from_spool"] >= 1, last
    assert last["spooled_bytes"] == 0
    closed = logged(events, "agent_disconnected", agent_id=agent.agent_id, code="UNAVAILABLE")
    assert closed, events
    assert "shutting down" in closed[0]["reason"]


async def test_a_failover_names_the_replica_left_the_next_one_and_why(
    cp: RunningControlPlane, tmp_path: Path, events: list[Event]
) -> None:
    data_dir = await enrolled(cp, tmp_path)
    down = f"127.0.0.1:{free_port()}"
    credentials = Credentials.load(data_dir)
    replace(credentials, agent_endpoints=(down, cp.agent_target)).save(data_dir)
    async with agent_running(data_dir, FakeRuntime()) as agent:
        assert cp.daemon.scheduler is not None
        await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent.agent_id), WITHIN)
    failover = await until_logged(events, "controlplane_failover")
    assert failover["log_level"] == "debug"
    assert (failover["endpoint"], failover["next_endpoint"]) == (down, cp.agent_target)
    assert failover["code"] == "UNAVAILABLE"
    unreachable = logged(events, "controlplane_unreachable", endpoint=down)[0]
    assert unreachable["next_endpoint"] == cp.agent_target
    assert unreachable["retry_in_s"] == 0  # a replica left to try in this round: no wait
    attempts = [(a["endpoint"], a["attempt"]) for a in logged(events, "controlplane_connecting")]
    assert attempts[:2] == [(down, 1), (cp.agent_target, 2)]
    assert (
        logged(events, "controlplane_connecting", endpoint=cp.agent_target)[0]["previous_code"]
        == "UNAVAILABLE"
    )


async def test_a_renewal_and_the_streams_around_it_are_logged_on_both_sides(
    tmp_path: Path, events: list[Event]
) -> None:
    async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=10)) as cp:
        scheduler = cp.daemon.scheduler
        assert scheduler is not None
        async with running_agent(cp, tmp_path, FakeRuntime()) as agent:
            old = serial_of(agent.credentials)
            first_stream = scheduler.session_of(agent.agent_id)
            await wait_until(agent.credentials_changed, lambda: serial_of(agent.credentials) != old, WITHIN)
            new = serial_of(agent.credentials)
            await asyncio.wait_for(scheduler.wait_for_agent(agent.agent_id, replacing=first_stream), WITHIN)
            # The new stream is up on the agent's side too: the next renewal is planned on the new
            # certificate, and the trust bundle came again.
            await until_logged(events, "agent_certificate_renewal_scheduled", serial=new)
            await eventually(lambda: len(logged(events, "trust_bundle_unchanged")) == 2, WITHIN, "2 bundles")
        # The agent stopped: its second stream's end, while the control plane still runs.
        closed = await until_logged(events, "agent_disconnected", serial=new)

    served = [e for e in logged(events, "agent_certificate_renewed") if "peer" in e]
    assert len(served) == 1, served
    assert served[0]["log_level"] == "info"
    assert (served[0]["old_serial"], served[0]["serial"]) == (old, new)
    assert served[0]["agent_id"] == agent.agent_id
    assert served[0]["peer"].startswith("ipv4:127.0.0.1:")
    not_after = agent.credentials.certificate.not_valid_after_utc
    assert served[0]["not_after"] == not_after.isoformat()

    received = logged(events, "agent_certificate_renewed", endpoint=cp.agent_target)
    assert len(received) == 1, received
    assert (received[0]["old_serial"], received[0]["serial"]) == (old, new)
    assert received[0]["not_after"] == not_after.isoformat()
    assert 0 <= received[0]["took_s"] < WITHIN
    scheduled = logged(events, "agent_certificate_renewal_scheduled", serial=old)
    assert len(scheduled) == 1, scheduled
    assert scheduled[0]["log_level"] == "debug"
    assert -0.1 <= scheduled[0]["jitter"] <= 0.1
    assert scheduled[0]["endpoint"] == cp.agent_target
    assert datetime.fromisoformat(scheduled[0]["at"]) < datetime.fromisoformat(served[0]["not_after"])
    assert logged(events, "agent_certificate_renewal_started", serial=old, endpoint=cp.agent_target)
    reconnect = logged(events, "controlplane_connecting", endpoint=cp.agent_target)[1]
    assert "renewed" in reconnect["previous_error"]
    assert not logged(events, "trust_bundle_updated")  # sent on each stream, the same each time

    opened = logged(events, "agent_connected", agent_id=agent.agent_id, org="default", pool="default")
    assert [e["serial"] for e in opened if "peer" in e] == [old, new]
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in opened if "peer" in e)
    first_closed = logged(events, "agent_disconnected", serial=old)
    assert len(first_closed) == 1, first_closed
    assert first_closed[0]["reason"]
    assert closed["code"] == ""  # the agent's doing: the control plane gave no status
    assert closed["reason"] == "the stream ended: the agent closed it or the connection broke"
    assert closed["connected_s"] >= 0


async def test_a_refused_agent_and_an_expired_stream_are_logged(
    cp: RunningControlPlane, events: list[Event]
) -> None:
    ca = our_ca(cp)
    assert (
        await connect_with(cp, *agent_certificate(ca, "a000000000000dead"))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    refused = await until_logged(events, "agent_refused", reason="unknown agent")
    assert refused["log_level"] == "warning"
    assert refused["peer"].startswith("ipv4:127.0.0.1:")

    agent_id = "a00000000000000e2"
    cert, _ = await stream_until_expiry(cp, agent_id)
    serial = format(cert.serial_number, "x")
    cut = await until_logged(events, "agent_session_closed", agent_id=agent_id)
    assert (cut["reason"], cut["serial"]) == ("certificate_expired", serial)
    closed = await until_logged(events, "agent_disconnected", agent_id=agent_id)
    assert closed["code"] == "UNAUTHENTICATED"
    assert "expired" in closed["reason"]


async def test_a_slow_store_call_is_a_warning_once_a_minute_per_call(
    tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "SLOW_STORE_CALL_S", 0.0)  # every call is slow
    async with control_plane(tmp_path) as cp:  # no metrics port: timed all the same
        store = cp.daemon._store
        assert store is not None
        for _ in range(3):
            assert await store.get_job("default", "nothing") is None
        first = logged(events, "store_call_slow", call="get_job")
        assert len(first) == 1, first
        others = [e["call"] for e in events if e["event"] == "store_call_slow" and e["call"] != "get_job"]
        monkeypatch.setattr(metrics_module, "SLOW_STORE_CALL_REPEAT_S", 0.0)
        await store.get_job("default", "nothing")
    slow = logged(events, "store_call_slow", call="get_job")
    assert len(slow) == 2, slow
    assert slow[0]["log_level"] == "warning"
    assert (slow[0]["threshold_s"], slow[0]["failed"], slow[0]["unlogged_since_last"]) == (0.0, False, 0)
    assert slow[0]["took_s"] >= 0
    assert slow[1]["unlogged_since_last"] == 2  # the two calls the first minute left out
    assert "list_orgs" in others  # the health probe's, as the daemon made it
    assert len(others) == len(set(others))  # each call name once in its first minute


async def test_the_postgresql_listener_coming_back_is_logged(
    tmp_path: Path, pg_url: str, events: list[Event]
) -> None:
    async with control_plane(tmp_path, database_url=pg_url) as cp:
        assert cp.daemon.cluster is not None
        replica = cp.daemon.cluster.replica_id
        started = await until_logged(events, "cluster_listening", replica=replica)
        assert (started["attempt"], started["reconnected"]) == (1, False)
        await until_logged(events, "cluster_role_taken", replica=replica, role="lease-sweep")
        admin = await asyncpg.connect(pg_url)
        try:
            cut = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'"
            )
        finally:
            await admin.close()
        assert cut == 1
        back = await until_logged(events, "cluster_listening", replica=replica, reconnected=True)
    assert back["attempt"] == 2
    lost = logged(events, "cluster_listener_lost")
    assert len(lost) == 1, lost
    assert lost[0]["retry_in_s"] > 0
