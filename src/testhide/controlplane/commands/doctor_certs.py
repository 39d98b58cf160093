"""What ``testhide-controlplane doctor`` checks of the certificates: the CA and server
certificates' expiry, the server certificate's issuer and names."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from testhide.common.findings import (
    Finding,
    Status,
    fail,
    ok,
    warn,
)
from testhide.common.statement import issued_by
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.ca.authority import is_development_ca, server_name_sans
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import ControlPlaneError

CERT_WARN = timedelta(days=30)


def certificate_findings(
    directory: DataDir, state: dict[str, Any], master: MasterKey | None, now: datetime
) -> list[Finding]:
    trusted = [int(g) for g in state["ca"]["trusted"]]
    active = int(state["ca"]["active"])
    cas = {g: directory.ca_certificate(g) for g in trusted}
    findings = []
    for generation, ca in cas.items():
        role = "active" if generation == active else "trusted"
        finding = expiry_finding(f"CA {generation}", f"{role}, {ca.subject.rfc4514_string()}", ca, now)
        if finding.status is Status.OK and is_development_ca(ca):
            finding = warn(
                finding.check,
                f"{finding.finding}; development material from certs-dev/",
                "never in production: init a data dir with its own CA",
            )
        findings.append(finding)
    chain = x509.load_pem_x509_certificates((directory.path / "server.pem").read_bytes())
    leaf = chain[0]
    issuer = next((g for g, ca in cas.items() if issued_by(leaf, ca)), None)
    if issuer is None:
        findings.append(
            fail(
                "server certificate",
                "not issued by a trusted CA",
                "testhide-controlplane server-cert rotate --data-dir DIR",
            )
        )
    else:
        findings.append(expiry_finding("server certificate", f"issued by CA {issuer}", leaf, now))
    if master is not None:
        try:
            directory.tls_material(master, allow_development=True)
        except (ControlPlaneError, ValueError) as exc:
            findings.append(fail("server key", str(exc), "testhide-controlplane server-cert rotate"))
    findings.append(names_finding(leaf, [str(n) for n in state.get("server_names") or []]))
    return findings


def expiry_finding(check: str, described: str, certificate: x509.Certificate, now: datetime) -> Finding:
    left = certificate.not_valid_after_utc - now
    until = f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    fix = (
        "testhide-controlplane server-cert rotate (a running serve does so when a third of its life is left)"
        if check == "server certificate"
        else "rotate the CA in stages: testhide-controlplane ca rotate prepare, activate, retire"
    )
    if left <= timedelta(0):
        return fail(check, f"{described}; expired at {until}", fix)
    finding = f"{described}; valid until {until} ({left.days} days)"
    if left < CERT_WARN:
        return warn(check, finding, fix)
    return ok(check, finding)


def names_finding(leaf: x509.Certificate, recorded: list[str]) -> Finding:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    present = set(sans)
    missing = [n for n in recorded if not set(server_name_sans([n])) <= present]
    if not recorded or missing:
        return fail(
            "server names",
            f"the server certificate lacks {', '.join(missing) or 'any name'} (recorded in state.json)",
            "testhide-controlplane server-cert rotate --server-name NAME (repeat for each)",
        )
    return ok("server names", ", ".join(recorded))
