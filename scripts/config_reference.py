"""Write the README's configuration reference from the commands themselves; `--check` fails on any difference.

Each settings command (`testhide-controlplane serve`, `testhide-agent run`) gets a table of its options:
the config-file key, the environment variable, the default and the help text, in the order `--help`
shows them. The tables sit between the markers `<!-- config-reference:begin -->` and
`<!-- config-reference:end -->` in README.md, so an option added to a command cannot go undocumented.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from testhide.agent.cli import main as agent_main
from testhide.common.settings import SettingsCommand, is_secret, key_of
from testhide.controlplane.cli import main as controlplane_main

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(ctx: click.Context, option: click.Option) -> str:
    if option.required:
        return "required"
    value = option.get_default(ctx, call=False)
    if option.is_flag:
        return "on" if value is True else "off"
    if value is None or value == () or not isinstance(value, int | float | str):  # unset (click's sentinel)
        return ""
    return f"`{value}`"


def _help(option: click.Option) -> str:
    text = " ".join((option.help or "").split())
    if is_secret(option):
        text += " (secret: never printed by `--print-config`)"
    return text.replace("|", "\\|")


def table(group: click.Group, name: str) -> str:
    command = group.commands[name]
    assert isinstance(command, SettingsCommand), name
    ctx = click.Context(command)
    rows = [
        f"**`{group.name} {name}`** (file: `--config FILE` or `{command.envvar_prefix}CONFIG`)",
        "",
        "| key | variable | default | what |",
        "| --- | --- | --- | --- |",
    ]
    for option in command.settings_options():
        rows.append(f"| `{key_of(option)}` | `{option.envvar}` | {_default(ctx, option)} | {_help(option)} |")
    return "\n".join(rows) + "\n"


def reference() -> str:
    controlplane_main.name, agent_main.name = "testhide-controlplane", "testhide-agent"
    return "\n".join([table(controlplane_main, "serve"), table(agent_main, "run")])


def rewritten(text: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return pattern.sub(lambda _: f"{BEGIN}\n{reference()}{END}", text)


def main() -> int:
    current = README.read_text()
    wanted = rewritten(current)
    if "--check" in sys.argv[1:]:
        if wanted != current:
            print(
                "README.md's configuration reference is stale: run scripts/config_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
