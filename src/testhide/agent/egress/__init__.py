"""The fetch step's only way out: a per-job squid that lets through what the
pool's allow list names, and says what went through (``squid.py`` for the
allow-list syntax and the records, ``proxy.py`` for the containers and
networks, ``image.py`` for the image built from the host's squid)."""

from testhide.agent.egress.proxy import EgressProxies, EgressSession, remove_leftover_networks
from testhide.agent.egress.squid import AllowRule, parse_allow
from testhide.common.fetch import EgressRequest

__all__ = [
    "AllowRule",
    "EgressProxies",
    "EgressRequest",
    "EgressSession",
    "parse_allow",
    "remove_leftover_networks",
]
