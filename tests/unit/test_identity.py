"""common/identity.py: the agent identity in a certificate's URI SAN."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity, IdentityError
from testhide.controlplane.ca.authority import CertificateAuthority

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
# NAME_RE: [a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?
names = st.sampled_from(_ALNUM) | st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_ALNUM),
    st.text(_ALNUM + "-", max_size=61),
    st.sampled_from(_ALNUM),
)
trust_domains = st.text(_ALNUM + ".-", min_size=1, max_size=40)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("example.org")


def test_uri_format_and_round_trip() -> None:
    identity = AgentIdentity("example.org", "acme", "default", "a0123456789abcdef")
    assert identity.uri == "spiffe://example.org/org/acme/pool/default/agent/a0123456789abcdef"
    assert AgentIdentity.from_uri(identity.uri) == identity


@PROPS
@given(trust_domains, names, names, names)
def test_uri_round_trip_property(td: str, org: str, pool: str, agent: str) -> None:
    identity = AgentIdentity(td, org, pool, agent)
    parsed = AgentIdentity.from_uri(identity.uri)
    assert parsed == identity
    assert parsed.uri == identity.uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://example.org",
        "http://example.org/org/acme/pool/default/agent/a1",
        "spiffe://example.org/org/acme/pool/default",
        "spiffe://example.org/org/acme/pool/default/agent/",
        "spiffe://example.org/org/acme/pool/default/agent/a1/extra",
        "spiffe://example.org/pool/default/org/acme/agent/a1",
        "spiffe://example.org/org//pool/default/agent/a1",
        "spiffe://Example.org/org/acme/pool/default/agent/a1",
        "spiffe://ex ample.org/org/acme/pool/default/agent/a1",
        " spiffe://example.org/org/acme/pool/default/agent/a1",
        "spiffe://example.org/org/acme/pool/default/agent/a1 ",
    ],
)
def test_from_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(IdentityError):
        AgentIdentity.from_uri(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://example.org/org/Acme/pool/default/agent/a1",
        "spiffe://example.org/org/acme/pool/-default/agent/a1",
        "spiffe://example.org/org/acme/pool/default/agent/a1-",
        "spiffe://example.org/org/acme/pool/default/agent/a_1",
        "spiffe://example.org/org/acme/pool/default/agent/" + "a" * 64,
        "spiffe://example.org/org/acme/pool/déf/agent/a1",
    ],
)
def test_from_uri_rejects_bad_names(uri: str) -> None:
    with pytest.raises(IdentityError, match="invalid"):
        AgentIdentity.from_uri(uri)


@pytest.mark.parametrize("field", ["org", "pool", "agent_id"])
@pytest.mark.parametrize("bad", ["", "Acme", "-a", "a-", "a_b", "a.b", "a b", "a" * 64, "a/b"])
def test_constructor_rejects_bad_names(field: str, bad: str) -> None:
    values = {"org": "acme", "pool": "default", "agent_id": "a1"}
    values[field] = bad
    with pytest.raises(IdentityError, match=field):
        AgentIdentity("example.org", **values)


def test_identity_error_is_a_value_error() -> None:
    assert issubclass(IdentityError, ValueError)


def test_longest_valid_name_accepted() -> None:
    name = "a" * 63
    assert AgentIdentity("td", name, name, name).agent_id == name


def test_name_with_trailing_newline_rejected() -> None:
    # NAME_RE ends in ``$``, which also matches just before a trailing "\n":
    # "a1\n" passes as a name although it is not "1-63 lowercase letters,
    # digits or '-'". The same regex guards job pool names in validate_spec.
    with pytest.raises(IdentityError):
        AgentIdentity("example.org", "acme", "default", "a1\n")


def test_from_certificate_of_issued_agent_cert(ca: CertificateAuthority) -> None:
    identity = AgentIdentity("example.org", "acme", "linux", "a00112233")
    _, csr = new_key_and_csr()
    issued = ca.issue_agent(csr, identity, timedelta(hours=1))
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert AgentIdentity.from_certificate(cert) == identity


def test_from_certificate_rejects_server_cert(ca: CertificateAuthority) -> None:
    chain, _ = ca.issue_server(["localhost", "127.0.0.1"], timedelta(hours=1))
    leaf = x509.load_pem_x509_certificates(chain)[0]
    with pytest.raises(IdentityError, match="found 0"):
        AgentIdentity.from_certificate(leaf)


def test_from_certificate_rejects_cert_without_san(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="no subject alternative name"):
        AgentIdentity.from_certificate(ca.certificate)
