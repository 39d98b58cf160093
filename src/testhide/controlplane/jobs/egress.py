"""A pool's egress list: the only hosts a fetch step may reach, through the job's
egress proxy. Checked here once, where an operator sets it, so every agent is
handed entries its proxy's configuration can take as they are."""

from __future__ import annotations

import ipaddress
import re

from testhide.controlplane.errors import FailedPrecondition, InvalidArgument, quoted

MAX_EGRESS_ENTRIES = 64
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# A leading '.' means the domain and its subdomains (as squid's dstdomain reads it).
_HOST_RE = re.compile(rf"\A\.?{_LABEL}(?:\.{_LABEL})*\Z", re.ASCII)
_IPV4_LIKE_RE = re.compile(r"\A[0-9.]+\Z", re.ASCII)
_PORT_RE = re.compile(r"\A[1-9][0-9]{0,4}\Z", re.ASCII)
MAX_HOST = 254
SYNTAX = (
    "HOST or HOST:PORT: a host name (letters, digits, '-' and '.'; a leading '.' also allows "
    "its subdomains) or an IPv4 address, and a port from 1 to 65535"
)


def egress_entry(entry: str) -> str:
    """``entry`` as kept (the host in lower case), or InvalidArgument naming it."""
    host, colon, port = entry.partition(":")
    host = host.lower()
    if not _valid_host(host) or (colon and not _valid_port(port)):
        raise InvalidArgument(f"egress entry {quoted(entry)} is not {SYNTAX}")
    return f"{host}:{port}" if colon else host


def egress_list(entries: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A whole list, checked, in its order, without repeats."""
    if len(entries) > MAX_EGRESS_ENTRIES:
        raise InvalidArgument(f"at most {MAX_EGRESS_ENTRIES} egress entries, not {len(entries)}")
    return tuple(dict.fromkeys(egress_entry(e) for e in entries))


def _valid_host(host: str) -> bool:
    if not host or len(host) > MAX_HOST:
        return False
    if _IPV4_LIKE_RE.match(host):  # all digits and dots: an IPv4 address or nothing
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOST_RE.match(host))


def _valid_port(port: str) -> bool:
    return bool(_PORT_RE.match(port)) and int(port) <= 65535


def require_egress(pool: str, egress_allow: tuple[str, ...]) -> None:
    """A job with a fetch step needs somewhere to fetch from."""
    if not egress_allow:
        raise FailedPrecondition(
            f"pool {pool} allows no egress, so the fetch step has nowhere to fetch from: an operator "
            f"allows hosts with 'testhide-controlplane pools set {pool} --egress-allow HOST[:PORT]' "
            "(or 'testhide admin pools set')"
        )
