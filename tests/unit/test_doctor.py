"""The doctors' verdicts on what they saw, where the real thing cannot be
staged in a test: a runtime that fails the seccomp probe (registering one would
mean editing /etc/docker/daemon.json), an old Docker, a skewed clock, a
certificate near its end, and the line and exit-status format."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from testhide.agent import doctor as agent_doctor
from testhide.agent import doctor_engine
from testhide.agent.credentials import Credentials, new_key_and_csr
from testhide.agent.runtime.offer import ProbeResult, Registration
from testhide.common.findings import Status, exit_status, fail, ok, render, warn
from testhide.common.identity import AgentIdentity
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.commands import doctor as cp_doctor
from testhide.controlplane.commands import doctor_certs

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
RUNSC = "/usr/bin/runsc"
ENFORCED = ProbeResult(True, "Seccomp: 2; unshare: refused", 0.4)


def credentials(lifetime: timedelta, issued: datetime, received: datetime) -> Credentials:
    """An agent's credentials whose certificate the control plane issued at
    ``issued`` (its clock) and which arrived at ``received`` (ours)."""
    ca = CertificateAuthority.create("testhide.local")
    key_pem, csr_pem = new_key_and_csr()
    identity = AgentIdentity("testhide.local", "default", "default", "a1")
    issued_cert = ca.issue_agent(csr_pem, identity, lifetime, issued)
    return Credentials(
        "a1", ("cp:7443",), ("cp:7444",), key_pem, issued_cert.certificate_pem, ca.certificate_pem, received
    )


# ---------------------------------------------------------------- runtimes


def test_gvisor_without_oci_seccomp_fails_with_the_runtime_args_fix() -> None:
    registration = Registration("runsc", RUNSC, ("--network=none",))
    seen = ProbeResult(False, "Seccomp: 0; unshare: allowed", 0.5)

    finding = doctor_engine.runtime_verdict(registration, seen, "runc")

    assert finding.status is Status.FAIL
    assert finding.check == "runtime runsc"
    assert "WITHOUT --oci-seccomp" in finding.finding
    assert "seccomp is not enforced in its containers (Seccomp: 0; unshare: allowed)" in finding.finding
    assert '"runtimeArgs": ["--network=none", "--oci-seccomp", "--panic-log=/proc/self/fd/2"' in finding.fix
    assert finding.fix.endswith("then: kill -HUP $(pidof dockerd)")


def test_any_runtime_that_does_not_enforce_seccomp_fails() -> None:
    finding = doctor_engine.runtime_verdict(
        Registration("kata", "/usr/bin/kata-runtime"),
        ProbeResult(False, "Seccomp: 0; unshare: refused", 1),
        "runc",
    )
    assert finding.status is Status.FAIL
    assert "applies the container's seccomp profile" in finding.fix


def test_a_runtime_that_cannot_run_the_probe_fails_and_names_the_image() -> None:
    seen = ProbeResult(
        False, "cannot probe with image 'testhide/busybox:1': No such image: testhide/busybox:1", 0
    )
    finding = doctor_engine.runtime_verdict(Registration("runc", "runc"), seen, "runc")
    assert finding.status is Status.FAIL
    assert "the engine's default" in finding.finding
    assert "load the probe image testhide/busybox:1" in finding.fix


def test_gvisor_without_panic_log_warns_and_a_good_one_passes() -> None:
    plain = Registration("runsc", RUNSC, ("--network=none", "--oci-seccomp"))
    finding = doctor_engine.runtime_verdict(plain, ENFORCED, "runc")
    assert finding.status is Status.WARN
    assert "--panic-log=/proc/self/fd/2" in finding.fix

    full = Registration("runsc", RUNSC, (*plain.args, "--panic-log=/proc/self/fd/2", "--traceback=single"))
    finding = doctor_engine.runtime_verdict(full, ENFORCED, "runc")
    assert finding.status is Status.OK
    assert "with --oci-seccomp" in finding.finding


def test_docker_older_than_20_10_or_without_seccomp_fails() -> None:
    seccomp = {"SecurityOptions": ["name=seccomp,profile=default"]}
    old = doctor_engine.engine_finding("unix:///s", {"Version": "19.03.15", "ApiVersion": "1.40"}, seccomp)
    assert old.status is Status.FAIL
    assert "oldest supported, Docker 20.10 (API 1.41)" in old.finding

    current = {"Version": "20.10.24", "ApiVersion": "1.41"}
    assert doctor_engine.engine_finding("unix:///s", current, seccomp).status is Status.OK
    bare = doctor_engine.engine_finding("unix:///s", current, {"SecurityOptions": ["name=apparmor"]})
    assert bare.status is Status.FAIL
    assert "does not support seccomp" in bare.finding


# ---------------------------------------------------------------- certificate and clock


def test_certificate_near_its_end_warns_and_an_expired_one_fails() -> None:
    hour = timedelta(hours=1)
    fresh = credentials(hour, NOW, NOW)
    assert agent_doctor.certificate_finding(fresh, NOW + 10 * timedelta(minutes=1)).status.name == "OK"

    late = agent_doctor.certificate_finding(fresh, NOW + timedelta(minutes=55))
    assert late.status is Status.WARN
    assert "5 min (8%) of 1 h left" in late.finding
    assert "renews at half-life" in late.finding

    gone = agent_doctor.certificate_finding(fresh, NOW + 2 * hour)
    assert gone.status is Status.FAIL
    assert "expired at 2030-01-02 04:04:05 UTC" in gone.finding
    assert "enroll this agent again" in gone.fix


def test_certificate_from_another_ca_fails() -> None:
    ours = credentials(timedelta(hours=1), NOW, NOW)
    other = CertificateAuthority.create("testhide.local").certificate_pem
    finding = agent_doctor.certificate_finding(Credentials(**{**ours.__dict__, "ca_pem": other}), NOW)
    assert finding.status is Status.FAIL
    assert "not issued by a CA in ca.pem" in finding.finding


def test_clock_skew_from_the_certificate_the_control_plane_issued() -> None:
    now = NOW + timedelta(minutes=10)
    same = agent_doctor.clock_finding(credentials(timedelta(hours=1), NOW, NOW), now)
    assert same.status is Status.OK
    assert "within a second of the control plane's" in same.finding
    assert "10 min ago" in same.finding

    behind = agent_doctor.clock_finding(
        credentials(timedelta(hours=1), NOW, NOW - timedelta(seconds=90)), now
    )
    assert behind.status is Status.WARN
    assert "90 s behind the control plane's" in behind.finding

    ahead = agent_doctor.clock_finding(credentials(timedelta(hours=1), NOW, NOW + timedelta(minutes=6)), now)
    assert ahead.status is Status.FAIL
    assert "360 s ahead of the control plane's" in ahead.finding
    assert "NTP" in ahead.fix


# ---------------------------------------------------------------- output


def test_lines_json_and_exit_status() -> None:
    findings = [
        ok("data dir", "fine"),
        warn("disk temp", "0.5 GiB free", "free space"),
    ]
    assert render(findings, as_json=False, strict=False).splitlines() == [
        "ok    data dir: fine",
        "warn  disk temp: 0.5 GiB free — fix: free space",
    ]
    assert exit_status(findings, strict=False) == 0
    assert exit_status(findings, strict=True) == 1
    document = json.loads(render(findings, as_json=True, strict=True))
    assert document == {
        "ok": False,
        "checks": [
            {"status": "OK", "check": "data dir", "finding": "fine", "fix": ""},
            {"status": "WARN", "check": "disk temp", "finding": "0.5 GiB free", "fix": "free space"},
        ],
    }
    failed = [*findings, fail("docker", "gone", "start it")]
    assert exit_status(failed, strict=False) == 1
    assert failed[-1].line() == "FAIL  docker: gone — fix: start it"
    assert fail("store", "gone", "restore").line() == "FAIL  store: gone — fix: restore"


# ---------------------------------------------------------------- the control plane's verdicts


def test_server_and_ca_certificates_warn_within_30_days_and_fail_expired() -> None:
    ca = CertificateAuthority.create("testhide.local")
    chain, _ = ca.issue_server(["cp.example.com", "10.0.0.5"], timedelta(days=90))
    leaf = x509.load_pem_x509_certificate(chain)
    now = leaf.not_valid_before_utc + timedelta(minutes=5)

    assert doctor_certs.expiry_finding("server certificate", "x", leaf, now).status is Status.OK
    late = doctor_certs.expiry_finding("server certificate", "x", leaf, now + timedelta(days=70))
    assert late.status is Status.WARN
    assert "server-cert rotate" in late.fix
    gone = doctor_certs.expiry_finding("CA 1", "x", ca.certificate, now + timedelta(days=3651))
    assert gone.status is Status.FAIL
    assert "ca rotate prepare" in gone.fix

    assert doctor_certs.names_finding(leaf, ["cp.example.com", "10.0.0.5"]).status is Status.OK
    missing = doctor_certs.names_finding(leaf, ["cp.example.com", "cp2.example.com"])
    assert missing.status is Status.FAIL
    assert "lacks cp2.example.com" in missing.finding
    assert "--server-name" in missing.fix


def test_schema_older_or_newer_fails() -> None:
    assert cp_doctor.schema_finding("db", {1, 2, 3}, {1, 2, 3}).status is Status.OK
    older = cp_doctor.schema_finding("db", {1, 2}, {1, 2, 3})
    assert older.status is Status.FAIL  # every command but serve and migrate refuses it
    assert "testhide-controlplane migrate" in older.fix
    assert "lacks versions [3]" in older.finding
    newer = cp_doctor.schema_finding("db", {1, 2, 3, 4}, {1, 2, 3})
    assert newer.status is Status.FAIL
    assert "upgrade" in newer.fix


def test_database_clock_skew() -> None:
    sent, answered = NOW.timestamp() - 0.01, NOW.timestamp() + 0.01
    assert cp_doctor.clock_finding(sent, NOW, answered).status is Status.OK
    off = cp_doctor.clock_finding(sent, NOW + timedelta(seconds=5), answered)
    assert off.status is Status.WARN
    assert off.finding == "the database server's clock is 5.00 s ahead of this host's (±0.01 s)"
    far = cp_doctor.clock_finding(sent, NOW - timedelta(seconds=45), answered)
    assert far.status is Status.FAIL
    assert "45.00 s behind" in far.finding


def test_credentials_whose_key_is_not_the_certificate_s_fail(tmp_path: Path) -> None:
    ours = credentials(timedelta(hours=1), NOW, NOW)
    ours.save(tmp_path / "agent")
    other_key, _ = new_key_and_csr()
    (tmp_path / "agent" / "agent.key").write_bytes(other_key)

    finding, loaded = agent_doctor.load_credentials(tmp_path / "agent")

    assert loaded is None
    assert finding.line() == (
        "FAIL  credentials: agent.key does not belong to agent.pem — fix: enroll again, into a new --data-dir"
    )
    missing, _ = agent_doctor.load_credentials(tmp_path / "nowhere")
    assert "holds no enrolled agent (missing agent.json, agent.key, agent.pem, ca.pem)" in missing.finding
