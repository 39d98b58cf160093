"""testhide: a security-first, self-hostable CI system: control plane, agent and CLI."""

__version__ = "0.1.0"
