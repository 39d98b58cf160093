"""Signed job statements (common/statement.py): the canonical encoding, DSSE's PAE against
the spec's example, and offline verification, which names each way a statement can fail:
another agent's certificate, an agent certificate not valid at the statement's end, a
countersigning key whose certificate ended before it (rotated out), a signature that does not
verify, a CA that is not the trusted one."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.common.identity import AgentIdentity
from testhide.common.isolation import Isolation
from testhide.common.statement import (
    PAYLOAD_TYPE,
    Envelope,
    FileDigest,
    Signature,
    Statement,
    StatementError,
    isolation_facts,
    key_id,
    pae,
    rfc3339,
    sign,
    spec_digest,
    verify_evidence,
)
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.ca.statement_keys import new_statement_key, unseal_key

NOW = datetime.now(UTC).replace(microsecond=0)


def statement(agent_id: str = "a1", finished: datetime = NOW, **changes: object) -> Statement:
    made = Statement(
        job_id="j1",
        org="acme",
        agent_id=agent_id,
        attempt=1,
        epoch=3,
        spec_digest="ab" * 32,
        image_digest="sha256:" + "cd" * 32,
        isolation=isolation_facts(Isolation(runtime="runc", cpus=1.5, interfaces=("lo",))),
        outcome="EXITED",
        exit_code=0,
        reason="",
        log_chain_head="ef" * 32,
        junit_reports=(FileDigest("report.xml", "01" * 32),),
        artifacts=(FileDigest("out/z.bin", "02" * 32), FileDigest("out/a.txt", "03" * 32)),
        started_at=rfc3339(finished - timedelta(seconds=5)),
        finished_at=rfc3339(finished),
    )
    return replace(made, **changes)  # type: ignore[arg-type]


class Agent:
    def __init__(self, ca: CertificateAuthority, agent_id: str, now: datetime = NOW) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(self.key, hashes.SHA256())
        )
        issued = ca.issue_agent(
            csr.public_bytes(serialization.Encoding.PEM),
            AgentIdentity("test.local", "acme", "default", agent_id),
            timedelta(hours=1),
            now - timedelta(minutes=1),
        )
        self.der = x509.load_pem_x509_certificate(issued.certificate_pem).public_bytes(
            serialization.Encoding.DER
        )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test.local")


@pytest.fixture(scope="module")
def agent(ca: CertificateAuthority) -> Agent:
    return Agent(ca, "a1")


def signer(
    ca: CertificateAuthority, now: datetime = NOW, active: timedelta = timedelta(days=30)
) -> tuple[str, object, bytes]:
    master = MasterKey.generate()
    record = new_statement_key(ca, master, now - timedelta(minutes=1), active, timedelta(days=7))
    return record.id, unseal_key(record, master), record.certificate


def envelope(
    ca: CertificateAuthority, agent: Agent, made: Statement, **signing: object
) -> tuple[Envelope, bytes]:
    kid, key, cert = signer(ca, **signing)  # type: ignore[arg-type]
    payload = made.encode()
    signatures = (
        Signature(key_id(agent.der), sign(agent.key, payload)),
        Signature(kid, key.countersign(payload)),  # type: ignore[attr-defined]
    )
    return Envelope(payload, signatures), cert


def test_the_encoding_is_canonical_and_round_trips() -> None:
    made = statement()
    payload = made.encode()
    assert b" " not in payload.replace(b'"reason":""', b"")
    assert payload.startswith(b'{"agent_id":"a1","artifacts":[{"name":"out/a.txt"')  # sorted keys and names
    assert b'"millicpus":1500' in payload
    assert b"1.5" not in payload
    assert b'"type":"https://testhide.dev/job-statement/v1"' in payload
    assert b'"finished_at":"' + rfc3339(NOW).encode() + b'"' in payload
    assert Statement.decode(payload).encode() == payload


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"agent_id": "a1"}', "fields are not those"),
        (b'{"cpus": 1.5}', "no floating-point"),
        (b"not json", "not JSON"),
    ],
)
def test_a_payload_that_is_not_a_canonical_statement_is_refused(payload: bytes, error: str) -> None:
    with pytest.raises(StatementError, match=error):
        Statement.decode(payload)


def test_whitespace_makes_a_statement_non_canonical() -> None:
    payload = statement().encode().replace(b'"epoch":3', b'"epoch": 3')
    with pytest.raises(StatementError, match="canonical form"):
        Statement.decode(payload)


def test_pae_matches_the_dsse_specification_example() -> None:
    """protocol.md of secure-systems-lab/dsse: PAE("http://example.com/HelloWorld", "hello world")."""
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_the_spec_digest_does_not_depend_on_key_order() -> None:
    one = spec_digest({"image": "busybox", "command": ["true"], "env": {"A": "1", "B": "2"}})
    two = spec_digest({"env": {"B": "2", "A": "1"}, "command": ["true"], "image": "busybox"})
    assert one == two != spec_digest({"image": "busybox", "command": ["false"]})


def test_the_envelope_round_trips_as_dsse_json(ca: CertificateAuthority, agent: Agent) -> None:
    made, _ = envelope(ca, agent, statement())
    data = made.to_json()
    assert data.startswith(b'{"payload":"')
    assert b'"payloadType":"' + PAYLOAD_TYPE.encode() in data
    assert Envelope.from_json(data) == made


def test_a_signed_and_countersigned_statement_verifies(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement())
    assert verify_evidence(made, agent.der, [cert], [ca.certificate]) is None


def test_a_statement_signed_by_another_agent_fails(ca: CertificateAuthority, agent: Agent) -> None:
    other = Agent(ca, "b2")
    made, cert = envelope(ca, other, statement(agent_id="a1"))
    assert verify_evidence(made, other.der, [cert], [ca.certificate]) == (
        "statement names agent acme/a1 but is signed by agent acme/b2's certificate"
    )


def test_an_agent_certificate_not_valid_at_the_end_time_fails(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement(finished=NOW + timedelta(hours=2)))
    assert verify_evidence(made, agent.der, [cert], [ca.certificate]) == (
        "agent certificate was not valid at the statement's end time"
    )


def test_a_countersignature_by_a_key_past_its_retirement_window_fails(ca: CertificateAuthority) -> None:
    """The key was made 40 days before the job ended, active 30 days, certificate 7 more: by
    the statement's end it was rotated out and its window had passed."""
    long_ago = NOW - timedelta(days=40)
    old_agent = Agent(ca, "a1", now=NOW)
    made, cert = envelope(ca, old_agent, statement(), now=long_ago)
    kid = made.signatures[1].keyid
    assert verify_evidence(made, old_agent.der, [cert], [ca.certificate]) == (
        f"countersignature key {kid}'s certificate expired before the statement's end time (rotated out)"
    )


def test_a_countersignature_within_the_retirement_window_verifies(
    ca: CertificateAuthority, agent: Agent
) -> None:
    made, cert = envelope(ca, agent, statement(), now=NOW - timedelta(days=33))  # active ended 3 days ago
    assert verify_evidence(made, agent.der, [cert], [ca.certificate]) is None


def test_a_tampered_payload_fails_the_agent_signature(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement())
    tampered = replace(made, payload=statement(exit_code=0, reason="edited").encode())
    assert verify_evidence(tampered, agent.der, [cert], [ca.certificate]) == (
        "signature does not verify (agent's signature)"
    )


def test_a_forged_countersignature_fails(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement())
    forged = Signature(made.signatures[1].keyid, sign(agent.key, made.payload))  # the agent's own key
    assert verify_evidence(
        replace(made, signatures=(made.signatures[0], forged)), agent.der, [cert], [ca.certificate]
    ) == ("signature does not verify (control plane's countersignature)")


def test_an_agent_certificate_cannot_pass_for_a_countersigning_one(
    ca: CertificateAuthority, agent: Agent
) -> None:
    made, _ = envelope(ca, agent, statement())
    posing = Signature(key_id(agent.der), sign(agent.key, made.payload))
    result = verify_evidence(
        replace(made, signatures=(made.signatures[0], posing)), agent.der, [agent.der], [ca.certificate]
    )
    assert (
        result == f"countersignature key {key_id(agent.der)}'s certificate was not issued by the trusted CA"
    )


def test_another_ca_is_not_trusted(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement())
    other = CertificateAuthority.create("test.local")
    assert verify_evidence(made, agent.der, [cert], [other.certificate]) == (
        "the agent certificate was not issued by the trusted CA"
    )


def test_a_statement_without_its_countersignature_fails(ca: CertificateAuthority, agent: Agent) -> None:
    made, cert = envelope(ca, agent, statement())
    alone = replace(made, signatures=made.signatures[:1])
    assert verify_evidence(alone, agent.der, [cert], [ca.certificate]) == (
        "expected the agent's signature and a countersignature, found 1"
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"exit_code":0', b'"exit_code":"0"'),
        (b'"epoch":3', b'"epoch":true'),
        (b'"reason":""', b'"reason":[]'),
    ],
)
def test_a_field_of_the_wrong_json_type_is_refused(old: bytes, new: bytes) -> None:
    with pytest.raises(StatementError, match="wrong JSON types"):
        Statement.decode(statement().encode().replace(old, new))
