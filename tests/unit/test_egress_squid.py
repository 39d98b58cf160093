"""The egress proxy's allow list, the squid.conf rendered from it, the
access-log lines read back (``agent/egress/squid.py``), and what goes into its
image (``image.py``), all without Docker."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from testhide.agent.config import AgentConfig
from testhide.agent.egress import image
from testhide.agent.egress.squid import (
    AllowRule,
    parse_access_line,
    parse_access_log,
    parse_allow,
    render_config,
)
from testhide.agent.errors import ConfigError, JobSetupError
from testhide.common.fetch import EgressRequest


def test_allow_entries_become_rules_in_order() -> None:
    rules = parse_allow(
        ["pypi.org", "files.pythonhosted.org:443", ".Debian.org", "192.0.2.10:8080", "a-b.c1"]
    )
    assert rules == (
        AllowRule("pypi.org", (80, 443)),
        AllowRule("files.pythonhosted.org", (443,)),
        AllowRule(".debian.org", (80, 443)),
        AllowRule("192.0.2.10", (8080,)),
        AllowRule("a-b.c1", (80, 443)),
    )
    assert [rule.is_address for rule in rules] == [False, False, False, True, False]
    assert parse_allow([]) == ()


@pytest.mark.parametrize(
    "entry",
    [
        "",
        ":443",
        "pypi.org:",
        "pypi.org:0",
        "pypi.org:65536",
        "pypi.org:http",
        "pypi.org:४४३",  # Devanagari digits: isdigit() but not a port
        "pypi.org:443:1",
        "https://pypi.org",
        "pypi.org/simple",
        "*.debian.org",
        "..debian.org",
        "debian.org.",
        "-debian.org",
        "deb_ian.org",
        "pypi.org ",
        "pypi .org",
        "256.1.1.1",
        "01.2.3.4",
        "10.0.1",
        "[::1]:443",
        "::1",
        "a" * 64 + ".org",
        ".".join(["a" * 60] * 5),
        "bücher.de",
    ],
)
def test_a_bad_allow_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match="egress allow entry") as caught:
        parse_allow(["pypi.org", entry])
    message = str(caught.value)
    assert repr(entry) in message
    assert "\n" not in message


def test_config_allows_the_rules_in_order_and_denies_everything_else() -> None:
    config = render_config(parse_allow(["pypi.org", ".debian.org:8080", "192.0.2.10:21"]), "172.30.0.0/16")
    lines = config.splitlines()
    access = [line for line in lines if line.startswith("http_access")]
    assert access == [
        "http_access deny !fetch_step",
        "http_access allow allow_1 allow_1_port",
        "http_access allow allow_2 allow_2_port",
        "http_access allow allow_3 allow_3_port",
        "http_access deny all",
    ]
    assert lines[-1] == "http_access deny all"
    assert "acl fetch_step src 172.30.0.0/16" in lines
    assert "acl allow_1 dstdomain -n pypi.org" in lines
    assert "acl allow_1_port port 80 443" in lines
    assert "acl allow_2 dstdomain -n .debian.org" in lines
    assert "acl allow_2_port port 8080" in lines
    assert "acl allow_3 dst 192.0.2.10" in lines
    assert "acl allow_3_port port 21" in lines
    # Nothing kept on disk, the log where the agent reads it.
    for line in ("cache deny all", "pid_filename none", "access_log stdio:/dev/stdout testhide fetch_step"):
        assert line in lines


def test_an_empty_allow_list_denies_everything() -> None:
    access = [line for line in render_config((), "10.9.0.0/24").splitlines() if "http_access" in line]
    assert access == ["http_access deny !fetch_step", "http_access deny all"]


def test_access_log_lines_become_records() -> None:
    lines = [
        "1796103771.934 GET upstream 8080 200 TCP_MISS 96 351",
        "garbage that squid never wrote",
        "1796103771.935 GET elsewhere 8081 403 TCP_DENIED 96 1612",
        "1796103772.001 CONNECT upstream 8443 200 TCP_TUNNEL 75 59",
        "1796103772.002 NONE - - 400 TCP_DENIED 12 3100",
        "1796103772.003 GET upstream x 200 TCP_MISS 96 351",
        "",
    ]
    records = parse_access_log(lines)
    assert records == [
        EgressRequest(
            datetime(2026, 12, 1, 5, 42, 51, 934000, UTC), "GET", "upstream", 8080, True, 200, 96, 351
        ),
        EgressRequest(
            datetime(2026, 12, 1, 5, 42, 51, 935000, UTC), "GET", "elsewhere", 8081, False, 403, 96, 1612
        ),
        EgressRequest(
            datetime(2026, 12, 1, 5, 42, 52, 1000, UTC), "CONNECT", "upstream", 8443, True, 200, 75, 59
        ),
        EgressRequest(datetime(2026, 12, 1, 5, 42, 52, 2000, UTC), "NONE", "", 0, False, 400, 12, 3100),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "1796103771.934 GET upstream 8080 200 TCP_MISS 96",
        "1796103771.934 GET upstream 8080 200 TCP_MISS 96 351 extra",
        "nan GET upstream 8080 200 TCP_MISS 96 351",
        "1e300 GET upstream 8080 200 TCP_MISS 96 351",
        "99999999999999999.000 GET upstream 8080 200 TCP_MISS 96 351",
        "1796103771.-1 GET upstream 8080 200 TCP_MISS 96 351",
        "1796103771.934 GET upstream 8080 200 TCP_MISS -5 351",
        "2026/12/01 05:48:46| Accepting HTTP Socket connections at conn2 local=0.0.0.0:3128",
    ],
)
def test_a_malformed_line_is_skipped(line: str) -> None:
    assert parse_access_line(line) is None


@pytest.mark.parametrize("network", ["", "  "])
def test_the_agent_needs_an_egress_network(tmp_path: Path, network: str) -> None:
    with pytest.raises(ConfigError, match="egress_network"):
        AgentConfig(data_dir=tmp_path, egress_network=network)
    assert AgentConfig(data_dir=tmp_path).egress_network == "bridge"


def test_without_squid_on_the_host_the_proxy_cannot_be_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "SQUID", tmp_path / "squid")
    with pytest.raises(JobSetupError) as caught:
        image.host_inputs()
    assert str(caught.value) == "the egress proxy needs Debian's squid on this host (apt-get install squid)"


def test_the_image_context_is_the_inputs_and_its_tag_follows_them() -> None:
    inputs = image.ImageInputs("5.7", (("/etc/passwd", b"proxy"), ("/usr/sbin/squid", b"\x7fELF")))
    with tarfile.open(fileobj=io.BytesIO(image.build_context(inputs))) as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert archive.extractfile("rootfs/usr/sbin/squid").read() == b"\x7fELF"  # type: ignore[union-attr]
    assert members["rootfs/usr/sbin/squid"].mode == 0o755
    assert members["rootfs/etc/passwd"].mode == 0o444
    assert members["rootfs/etc/squid/egress"].isdir()  # where the job's squid.conf goes
    assert b'ENTRYPOINT ["/usr/sbin/squid", "-N", "-f", "/etc/squid/egress/squid.conf"]' in (
        archive_bytes := image.build_context(inputs)
    )
    assert image.build_context(inputs) == archive_bytes  # the same inputs, the same context
    assert inputs.tag.startswith("testhide/egress-proxy:5.7-")
    changed = image.ImageInputs("5.7", (("/etc/passwd", b"proxy"), ("/usr/sbin/squid", b"\x7fELF2")))
    assert changed.tag != inputs.tag
