"""`testhide run`'s options for what runs beside the job: the fetch step (``--fetch``,
``--fetch-secret``, ``--cache``) and its services (``--service`` and the options that
add to one by name). A malformed value is a usage error here, naming the form the option
takes, before anything is uploaded; what the control plane decides (a pool without an
egress list, an unknown secret, an image not allowed) it says itself."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import click

from testhide.cli.model import Service

SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
NAME_FORM = "NAME: lower-case letters, digits and '-', starting with a letter, at most 31"


@dataclass(frozen=True)
class FetchOptions:
    fetch: str = ""
    fetch_secrets: tuple[str, ...] = ()
    cache: str = ""


def _bad(option: str, message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint=f"'{option}'")


def fetch_options(fetch: str | None, fetch_secrets: tuple[str, ...], cache: str | None) -> FetchOptions:
    """The fetch step as `JobRequest` takes it; a secret or a cache without a fetch step is refused."""
    if fetch is not None and not fetch.strip():
        raise _bad("--fetch", "takes a shell command (run with sh -c), not an empty one")
    for name in fetch_secrets:
        if not name or name != name.strip():
            raise _bad("--fetch-secret", f"takes the NAME of an organisation secret, not {name!r}")
    if cache is not None and (not cache or cache != cache.strip()):
        raise _bad("--cache", f"takes a KEY (no surrounding spaces), not {cache!r}")
    if fetch is None and fetch_secrets:
        raise _bad("--fetch-secret", "gives a secret to the fetch step: give the step with --fetch 'CMD'")
    if fetch is None and cache is not None:
        raise _bad("--cache", "keeps what the fetch step fills: give the step with --fetch 'CMD'")
    return FetchOptions(fetch or "", tuple(dict.fromkeys(fetch_secrets)), cache or "")


def services(
    declared: tuple[str, ...],
    commands: tuple[str, ...],
    envs: tuple[str, ...],
    tmpfs: tuple[str, ...],
) -> tuple[Service, ...]:
    """``--service NAME=IMAGE`` each, with the commands, variables and tmpfs paths the other
    options give them by NAME."""
    images: dict[str, str] = {}
    for text in declared:
        name, sep, image = text.partition("=")
        if not sep or not SERVICE_NAME.fullmatch(name) or not image.strip():
            raise _bad("--service", f"takes NAME=IMAGE ({NAME_FORM}), not {text!r}")
        if name in images:
            raise _bad("--service", f"names service {name!r} twice")
        images[name] = image
    command = _commands(commands, images)
    env = _envs(envs, images)
    paths = _tmpfs(tmpfs, images)
    return tuple(
        Service(name, image, command.get(name, ()), env.get(name, {}), tuple(paths.get(name, ())))
        for name, image in images.items()
    )


def _named(option: str, form: str, text: str, separator: str, images: dict[str, str]) -> tuple[str, str]:
    """NAME and the rest of ``NAME<separator>REST``, NAME one of the services given."""
    name, sep, rest = text.partition(separator)
    if not sep or not name:
        raise _bad(option, f"takes {form}, not {text!r}")
    if name not in images:
        given = f"the services given: {', '.join(images)}" if images else "no --service NAME=IMAGE given"
        raise _bad(option, f"names service {name!r}, which is not one of --service ({given})")
    return name, rest


def _commands(texts: tuple[str, ...], images: dict[str, str]) -> dict[str, tuple[str, ...]]:
    form = "NAME='CMD ARGS' (split as a shell does)"
    found: dict[str, tuple[str, ...]] = {}
    for text in texts:
        name, line = _named("--service-command", form, text, "=", images)
        try:
            words = tuple(shlex.split(line))
        except ValueError as exc:
            raise _bad("--service-command", f"takes {form}; {line!r}: {exc}") from exc
        if not words:
            raise _bad("--service-command", f"takes {form}, not an empty command for {name!r}")
        if name in found:
            raise _bad("--service-command", f"gives service {name!r} a command twice")
        found[name] = words
    return found


def _envs(texts: tuple[str, ...], images: dict[str, str]) -> dict[str, dict[str, str]]:
    form = "NAME:K=V"
    found: dict[str, dict[str, str]] = {}
    for text in texts:
        name, assignment = _named("--service-env", form, text, ":", images)
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise _bad("--service-env", f"takes {form}, not {text!r}")
        found.setdefault(name, {})[key] = value
    return found


def _tmpfs(texts: tuple[str, ...], images: dict[str, str]) -> dict[str, list[str]]:
    form = "NAME:PATH (an absolute path)"
    found: dict[str, list[str]] = {}
    for text in texts:
        name, path = _named("--service-tmpfs", form, text, ":", images)
        if not path.startswith("/"):
            raise _bad("--service-tmpfs", f"takes {form}, not {text!r}")
        if path not in found.setdefault(name, []):
            found[name].append(path)
    return found
