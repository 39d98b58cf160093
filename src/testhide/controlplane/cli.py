"""``testhide-controlplane``: the operator's command. The commands themselves
live in ``controlplane.commands``, one module per concern; this module holds the
top-level group and registers them."""

from __future__ import annotations

import click

from testhide import __version__
from testhide.common.logging import configure
from testhide.common.settings import log_options
from testhide.controlplane.commands import (
    access,
    agents,
    audit,
    certificates,
    doctor,
    incident,
    mfa,
    migrate,
    migrate_store,
    pools,
    recovery,
    serve,
    statement_keys,
    tokens,
)


@click.group()
@click.version_option(__version__, prog_name="testhide-controlplane", message="%(prog)s %(version)s")
@log_options("TESTHIDE_")
def main(log_format: str, log_level: str) -> None:
    """Run and administer a testhide control plane.

    serve takes its settings from a TOML file (--config), TESTHIDE_* variables
    and flags (see serve --help)."""
    configure(log_level, json_output=log_format == "json")


for command in (
    serve.init,
    serve.serve,
    tokens.enroll_token,
    agents.agents,
    incident.incident,
    certificates.server_cert,
    certificates.ca,
    pools.pools,
    audit.audit,
    access.orgs,
    access.users,
    access.api_keys,
    access.signing_keys,
    statement_keys.statement_keys,
    recovery.master_key,
    recovery.backup,
    recovery.restore,
    migrate.migrate,
    migrate.decrypt_backup,
    migrate_store.migrate_store_command,
    doctor.doctor,
):
    main.add_command(command)
access.users.add_command(mfa.users_reset_mfa)

if __name__ == "__main__":
    main()
