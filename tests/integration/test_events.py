"""The identity events operators alert on, as structured log events."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from testhide.agent.errors import EnrollmentError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.fake import FakeRuntime
from tests.harness import control_plane, operator, running_agent


async def test_enrollment_renewal_refusal_and_revocation_are_logged(tmp_path: Path) -> None:
    with capture_logs() as events:
        async with control_plane(tmp_path, agent_cert_ttl=timedelta(seconds=10)) as cp:
            async with running_agent(cp, tmp_path, FakeRuntime()) as agent:
                scheduler = cp.daemon.scheduler
                assert scheduler is not None
                first = scheduler.session_of(agent.agent_id)
                await asyncio.wait_for(scheduler.wait_for_agent(agent.agent_id, replacing=first), 30)
                token = await cp.enrollment_token()
                await enroll(cp.api_target, token, tmp_path / "second", "second")
                with pytest.raises(EnrollmentError):
                    await enroll(cp.api_target, token, tmp_path / "third", "third")
            code, _, err = await operator("agents", "revoke", "--data-dir", str(cp.data_dir), agent.agent_id)
    assert code == 0
    names = [e["event"] for e in events]
    for expected in ("agent_enrolled", "agent_certificate_renewed", "enrollment_token_refused"):
        assert expected in names, names
    enrolled = next(e for e in events if e["event"] == "agent_enrolled")
    assert {"agent_id", "org", "pool", "serial", "not_after"} <= enrolled.keys()
    assert "agent_revoked" in err  # the operator command's own event
    assert agent.agent_id in err
    assert not any(token in str(e) for e in events)  # secrets never reach the log
