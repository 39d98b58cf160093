"""The agent stream's wire format at the control plane's edge: what a ControlMessage
carries (an outbound message encoded, several batched into one) and what an agent's
started and result messages report, as the domain's dataclasses."""

from __future__ import annotations

from dataclasses import replace

from testhide.controlplane.jobs.model import JobReport, JobStatus, PullPolicy, SubmittedStatement
from testhide.controlplane.jobs.scheduler import (
    AgentSession,
    Assign,
    Cancel,
    LogAck,
    Outbound,
    RenewAnswer,
    ResultAck,
    TrustBundle,
)
from testhide.controlplane.jobs.service import SERVICE_LOG
from testhide.controlplane.rpc.convert import isolation_from_pb, services_isolation_from_pb, spec_to_pb
from testhide.protos.v1 import agent_pb2

MAX_BATCH_BYTES = 1024 * 1024
"""What the control plane puts in one ControlMessage.batch at most (one larger message goes alone)."""

_OUTCOME = {
    agent_pb2.JOB_OUTCOME_TIMED_OUT: JobStatus.TIMED_OUT,
    agent_pb2.JOB_OUTCOME_CANCELED: JobStatus.CANCELED,
    agent_pb2.JOB_OUTCOME_ERROR: JobStatus.ERROR,
}
_PULL = {
    PullPolicy.NEVER: agent_pb2.PULL_POLICY_NEVER,
    PullPolicy.IF_NOT_PRESENT: agent_pb2.PULL_POLICY_IF_NOT_PRESENT,
    PullPolicy.ALWAYS: agent_pb2.PULL_POLICY_ALWAYS,
}
ARTIFACT_KINDS = {
    agent_pb2.ARTIFACT_KIND_FILE: "artifact",
    agent_pb2.ARTIFACT_KIND_JUNIT: "junit",
    agent_pb2.ARTIFACT_KIND_SERVICE_LOG: SERVICE_LOG,
}
_WITH_EXIT_CODE = (
    agent_pb2.JOB_OUTCOME_EXITED,
    agent_pb2.JOB_OUTCOME_TIMED_OUT,
    agent_pb2.JOB_OUTCOME_CANCELED,
)


def announced_version(text: str) -> str:
    """An agent's self-reported version, for display only: printable ASCII, at most 64 characters."""
    return "".join(ch for ch in text[:64] if " " <= ch <= "~") or "unknown"


def encode(message: Outbound) -> agent_pb2.ControlMessage:
    match message:
        case Assign(job, details):
            return agent_pb2.ControlMessage(
                assign=agent_pb2.AssignJob(
                    job_id=job.id,
                    epoch=job.epoch,
                    spec=spec_to_pb(job.spec),
                    secret_env=details.secret_env,
                    pull_policy=_PULL[details.policy.pull_policy],
                    allowed_images=list(details.policy.allowed_images),
                    runtime=details.runtime,
                    egress_allow=list(details.policy.egress_allow),
                    attempt=job.attempt,
                    fetch_secret_env=details.fetch_secret_env,
                )
            )
        case Cancel(job_id, reason, abandon):
            return agent_pb2.ControlMessage(
                cancel=agent_pb2.CancelJob(job_id=job_id, reason=reason, abandon=abandon)
            )
        case LogAck(job_id, seq):
            return agent_pb2.ControlMessage(log_ack=agent_pb2.LogAck(job_id=job_id, seq=seq))
        case ResultAck(job_id):
            return agent_pb2.ControlMessage(result_ack=agent_pb2.ResultAck(job_id=job_id))
        case TrustBundle(bundle_pem):
            return agent_pb2.ControlMessage(trust_bundle=agent_pb2.TrustBundle(ca_bundle_pem=bundle_pem))
        case RenewAnswer(certificate_pem, ca_bundle_pem, None):
            return agent_pb2.ControlMessage(
                renewed=agent_pb2.RenewResponse(certificate_pem=certificate_pem, ca_bundle_pem=ca_bundle_pem)
            )
        case RenewAnswer(refused=(code, why)):
            return agent_pb2.ControlMessage(renew_refused=agent_pb2.RenewRefused(code=code, message=why))
    raise TypeError(f"cannot encode {message!r}")


def report_of(session: AgentSession, message: agent_pb2.AgentMessage) -> JobReport:
    """A started or result message as the holder's report."""
    org, agent_id = session.identity.org, session.identity.agent_id
    if message.WhichOneof("body") == "started":
        s = message.started
        isolation = isolation_from_pb(s.isolation) if s.HasField("isolation") else None
        services = services_isolation_from_pb(s.services)
        return JobReport(
            org, agent_id, s.job_id, s.epoch, JobStatus.RUNNING, isolation=isolation, services=services
        )
    r = message.result
    status = _OUTCOME.get(r.outcome) or (JobStatus.SUCCEEDED if r.exit_code == 0 else JobStatus.FAILED)
    exit_code = r.exit_code if r.outcome in _WITH_EXIT_CODE else None
    report = JobReport(org, agent_id, r.job_id, r.epoch, status, r.reason, exit_code, r.last_seq)
    statement = (
        SubmittedStatement(r.statement, r.statement_signature, r.agent_certificate) if r.statement else None
    )
    return replace(report, log_chain_head=r.log_chain_head, statement=statement)


def batched(first: agent_pb2.ControlMessage, session: AgentSession) -> agent_pb2.ControlMessage:
    """``first`` and what else waits for the agent, in one message (past MAX_BATCH_BYTES by
    one message at most: an assignment or an acknowledgement, far below the agent's limit)."""
    messages, size = [first], first.ByteSize()
    while size < MAX_BATCH_BYTES and (queued := session.outbox.take()) is not None:
        message = encode(queued)
        messages.append(message)
        size += message.ByteSize()
    if len(messages) == 1:
        return first
    batch = agent_pb2.ControlMessage()
    for message in messages:  # copied in place (a constructor would copy each message twice)
        batch.batch.messages.add().CopyFrom(message)
    return batch
