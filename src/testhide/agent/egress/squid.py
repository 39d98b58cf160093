"""The egress proxy's words, without Docker: the allow list as the pool states
it, the squid.conf that enforces it, and the access-log lines squid writes
back, one record per request.

The allow list (``Pool.egress_allow``, ``AssignJob.egress_allow``), one entry
per destination:

- ``HOST`` or ``HOST:PORT``; without a port the entry allows 80 and 443.
- HOST is a hostname (``pypi.org``: that name only), ``.domain``
  (``.debian.org``: the domain and every name under it), or an IPv4 literal
  (``192.0.2.10``). Names are matched case-insensitively; no wildcards, no
  IPv6, no schemes, no paths.
- PORT is 1-65535.

A name is matched against the name the request asks for, never by a DNS
lookup (``dstdomain -n``): a request to an IP address is never allowed by a
name whose reverse lookup happens to match. An IPv4 literal is matched against
the destination address (``dst``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from testhide.common.fetch import EgressRequest

PROXY_PORT = 3128
DEFAULT_PORTS = (80, 443)
CONFIG_DIR = "/etc/squid/egress"
CONFIG_PATH = f"{CONFIG_DIR}/squid.conf"
ERRORS_DIR = "/usr/share/squid/errors/templates"
MIME_TABLE = "/etc/squid/mime.conf"
READY_LINE = "Accepting HTTP Socket connections"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"\A\.?{_LABEL}(?:\.{_LABEL})*\Z")
_IPV4_RE = re.compile(r"\A[0-9]+(?:\.[0-9]+){3}\Z")
_MAX_HOST = 253


@dataclass(frozen=True)
class AllowRule:
    """One entry of the allow list: requests to ``host`` on one of ``ports``."""

    host: str
    """A hostname, ``.domain`` (the domain and its subdomains), or an IPv4 address."""
    ports: tuple[int, ...]

    @property
    def is_address(self) -> bool:
        return _IPV4_RE.match(self.host) is not None


def parse_allow(entries: Sequence[str]) -> tuple[AllowRule, ...]:
    """The allow list as rules, in order; ValueError naming the first bad entry."""
    return tuple(_parse_entry(entry) for entry in entries)


def _parse_entry(entry: str) -> AllowRule:
    host, sep, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
    ports: tuple[int, ...] = DEFAULT_PORTS
    if sep:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"egress allow entry {entry!r}: the port must be a number from 1 to 65535")
        ports = (int(port_text),)
    host = host.lower()
    if _IPV4_RE.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"egress allow entry {entry!r}: {host!r} is not an IPv4 address") from None
    elif (
        len(host.lstrip(".")) > _MAX_HOST
        or not _HOSTNAME_RE.match(host)
        or host.rsplit(".", 1)[-1].isdigit()  # "10.0.1": neither a name nor an address
    ):
        raise ValueError(
            f"egress allow entry {entry!r}: expected HOST or HOST:PORT, HOST a hostname, "
            ".domain or an IPv4 address"
        )
    return AllowRule(host, ports)


def render_config(rules: Iterable[AllowRule], clients: str) -> str:
    """squid.conf allowing only ``rules``, and only to ``clients`` (the job
    network's subnet, CIDR): the proxy listens on the egress network too, and
    nothing there may use it. No cache, no pid file, nothing written but the
    access log (to stdout) and squid's own messages (to stderr)."""
    lines = [
        f"http_port {PROXY_PORT}",
        "pid_filename none",
        "pinger_enable off",
        "cache deny all",
        "cache_mem 0 MB",
        # Docker's default of a million open files would cost squid a table that size.
        "max_filedescriptors 1024",
        f"acl fetch_step src {clients}",
        "logformat testhide %ts.%03tu %rm %>rd %>rP %>Hs %Ss %>st %<st",
        # Only the job's own requests: anyone else on the egress network is refused, and unrecorded.
        "access_log stdio:/dev/stdout testhide fetch_step",
        "buffered_logs off",
        "cache_log /dev/stderr",
        "cache_store_log none",
        "logfile_rotate 0",
        "coredump_dir none",
        "visible_hostname testhide-egress",
        # Upstreams learn nothing of the job network.
        "forwarded_for delete",
        "via off",
        f"error_directory {ERRORS_DIR}",
        f"mime_table {MIME_TABLE}",
        "shutdown_lifetime 0 seconds",
        "http_access deny !fetch_step",
    ]
    for number, rule in enumerate(rules, 1):
        kind = "dst" if rule.is_address else "dstdomain -n"
        ports = " ".join(str(port) for port in rule.ports)
        lines += [
            f"acl allow_{number} {kind} {rule.host}",
            f"acl allow_{number}_port port {ports}",
            f"http_access allow allow_{number} allow_{number}_port",
        ]
    lines.append("http_access deny all")
    return "\n".join(lines) + "\n"


def parse_access_log(lines: Iterable[str]) -> list[EgressRequest]:
    """Records of the lines written in our logformat, in order; any other line is skipped."""
    records = []
    for line in lines:
        record = parse_access_line(line)
        if record is not None:
            records.append(record)
    return records


def parse_access_line(line: str) -> EgressRequest | None:
    """``1796103771.934 GET upstream 8080 200 TCP_MISS 96 351``; None for
    anything else. Squid writes "-" for a part it does not have (a request it
    could not parse has no host)."""
    fields = line.split()
    if len(fields) != 8:
        return None
    stamp, method, host, port, status, squid_status, sent, received = fields
    seconds, _, millis = stamp.partition(".")
    try:
        at = datetime.fromtimestamp(_number(seconds), UTC) + timedelta(milliseconds=_number(millis))
        return EgressRequest(
            at=at,
            method=method,
            host="" if host == "-" else host,
            port=_number(port),
            allowed=not squid_status.startswith("TCP_DENIED"),
            http_status=_number(status),
            bytes_sent=_number(sent),
            bytes_received=_number(received),
        )
    except (ValueError, OverflowError, OSError):
        return None


def _number(text: str) -> int:
    if text == "-":
        return 0
    if not text.isascii() or not text.isdigit():
        raise ValueError(text)
    return int(text)
