"""testhide: a security-first, self-hostable CI system: control plane, agent and CLI.

gRPC's C core writes its own log lines (``I1130 … ssl_transport_security.cc … Handshake failed``)
straight to stderr, outside our log format: one such line breaks ``--log-format json`` for a log
shipper, and the CLI's one-line errors. The programs log what matters themselves (a refused
handshake is a client's problem, a bind failure is reported by ``serve``), so the C core is silent
unless ``GRPC_VERBOSITY`` (DEBUG, INFO, ERROR) asks for it. Set here, before anything imports
grpc, because the C core reads it once, when it starts."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")

__version__ = "0.2.0.dev0"
