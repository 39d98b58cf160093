"""``testhide-controlplane``: the operator's command. The commands themselves
live in ``controlplane.commands``, one module per concern; this module holds the
top-level group and registers them."""

from __future__ import annotations

import click

from testhide import __version__
from testhide.common.logging import configure
from testhide.controlplane.commands import (
    access,
    agents,
    audit,
    certificates,
    migrate_store,
    pools,
    recovery,
    serve,
    tokens,
)


@click.group()
@click.version_option(__version__, prog_name="testhide-controlplane", message="%(prog)s %(version)s")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True)
@click.option("--log-level", default="info", show_default=True)
def main(log_format: str, log_level: str) -> None:
    """Run and administer a testhide control plane."""
    configure(log_level, json_output=log_format == "json")


for command in (
    serve.init,
    serve.serve,
    tokens.enroll_token,
    agents.agents,
    certificates.server_cert,
    certificates.ca,
    pools.pools,
    audit.audit,
    access.orgs,
    access.users,
    access.api_keys,
    access.signing_keys,
    recovery.master_key,
    recovery.backup,
    recovery.restore,
    migrate_store.migrate_store_command,
):
    main.add_command(command)

if __name__ == "__main__":
    main()
