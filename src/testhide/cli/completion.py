"""Shell completion: ``testhide completion bash|zsh|fish`` prints the script
that a shell sources, which calls ``testhide`` back with
``_TESTHIDE_COMPLETE=<shell>_complete`` (click's protocol) for each
completion. Subcommands and options come from the command tree; a JOB_ID
argument offers the newest jobs of the organisation, asked of the control
plane with a short deadline: a completion that waits on a network blocks the
engineer's prompt, so any failure or delay offers nothing."""

from __future__ import annotations

import asyncio

import click
from click.shell_completion import CompletionItem, get_completion_class

from testhide.cli.config import Login, check_profile

PROG_NAME = "testhide"
COMPLETE_VAR = "_TESTHIDE_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
JOB_IDS_WITHIN_S = 2.0
JOB_IDS_OFFERED = 50


def complete_job_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The newest job ids starting with ``incomplete``, with their status as help;
    nothing when not logged in, unreachable, slow or refused."""
    try:
        profile = ctx.find_root().params.get("profile")
        login = Login.load(check_profile(profile) if isinstance(profile, str) else None)
        found = asyncio.run(_recent(login))
    except Exception:  # a completion must never print a traceback into a prompt
        return []
    return [CompletionItem(job_id, help=status) for job_id, status in found if job_id.startswith(incomplete)]


async def _recent(login: Login) -> list[tuple[str, str]]:
    from testhide.cli.wire import recent_job_ids  # gRPC: only when a job id is completed

    async with asyncio.timeout(JOB_IDS_WITHIN_S):
        return await recent_job_ids(login, JOB_IDS_OFFERED)


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL: subcommands, options and job ids.

    \b
    bash:  eval "$(testhide completion bash)"   (in ~/.bashrc)
    zsh:   eval "$(testhide completion zsh)"    (in ~/.zshrc)
    fish:  testhide completion fish > ~/.config/fish/completions/testhide.fish
    """
    root = click.get_current_context().find_root().command
    complete = get_completion_class(shell)
    assert complete is not None, "one of click's shells"
    click.echo(complete(root, {}, PROG_NAME, COMPLETE_VAR).source())
