"""The one JSON convention of every `--json` output, as checks, and the check
that a real output has its example's shape (``tests/json_examples.py``).

``assert_matches_example("testhide jobs show", document)`` fails unless the
document has exactly the example's fields, recursively, each with the
example's JSON type (or ``null`` where the example allows it), and follows
the convention. ``python -m tests.json_schema`` prints the README's tables."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from collections.abc import Iterator
from typing import Any

from tests.json_examples import EXAMPLES, Example

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LOOKS_LIKE_TIME = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_WORD = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
LOWER_WORD = re.compile(r"^[a-z][a-z0-9]*([_-][a-z0-9]+)*$")
# Fields that hold several values: arrays, never text joined with commas or spaces.
LIST_FIELDS = frozenset(
    {"scopes", "command", "runtimes", "amr", "allowed_images", "secrets", "interfaces", "mounts"}
    | {"cap_add", "cap_drop", "artifact_globs", "junit_globs", "rejected_reports", "jobs_ended"}
    | {"fetch_secrets", "services", "tmpfs", "requests", "egress_allow"}
)


def _enum_prefixes() -> tuple[str, ...]:
    """Every enum's value prefix in the contract (``JOB_STATUS_``, ``TEST_STATUS_`` …):
    the name of its zero value without ``UNSPECIFIED``."""
    import testhide.protos.v1 as package

    prefixes: set[str] = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            descriptors = list(module.DESCRIPTOR.enum_types_by_name.values())
            for message in module.DESCRIPTOR.message_types_by_name.values():
                descriptors += message.enum_types
            for enum in descriptors:
                zero = enum.values_by_number.get(0)
                if zero is not None and zero.name.endswith("UNSPECIFIED"):
                    prefixes.add(zero.name.removesuffix("UNSPECIFIED"))
    return tuple(sorted(p for p in prefixes if p))


ENUM_PREFIXES = _enum_prefixes()


def kind(value: Any) -> str:
    """The JSON type of a decoded value (an integer and a fraction are both numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {value!r}")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fields(document: Any, maps: frozenset[str], path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every (path, field name, value) of the document, not entering maps' keys."""
    if isinstance(document, list):
        for item in document:
            yield from _fields(item, maps, f"{path}[]")
    elif isinstance(document, dict) and path not in maps:
        for key, value in document.items():
            yield join(path, key), key, value
            yield from _fields(value, maps, join(path, key))


def _field_problems(name: str, value: Any) -> list[str]:
    """What is wrong with one field by its name (null fits every field but a misnamed one)."""
    problems = [] if SNAKE.match(name) else ["its name is not snake_case"]
    if value is None:
        return problems
    if name == "at" or name.endswith("_at"):
        if not (isinstance(value, str) and TIME.match(value)):
            problems.append(f"{value!r} is not an RFC 3339 UTC time with microseconds and Z")
    elif isinstance(value, str) and LOOKS_LIKE_TIME.match(value):
        problems.append("a time in a field whose name does not end in _at")
    if name.endswith("_s") and kind(value) != "number":
        problems.append(f"a duration in seconds must be a number, not {value!r}")
    if (name.endswith("_bytes") or name == "size") and not (
        kind(value) == "number" and isinstance(value, int)
    ):
        problems.append(f"a size in bytes must be an integer, not {value!r}")
    if (name == "id" or name.endswith("_id")) and not isinstance(value, str):
        problems.append(f"an id must be a string, not {value!r}")
    if name in LIST_FIELDS and not isinstance(value, list):
        problems.append(f"several values must be an array, not {value!r}")
    if name == "status" and not (isinstance(value, str) and UPPER_WORD.match(value)):
        problems.append(f"a status is an upper-case name, not {value!r}")
    if name == "state" and not (isinstance(value, str) and LOWER_WORD.match(value)):
        problems.append(f"a state is a lower-case word, not {value!r}")
    return problems


def _strings(document: Any, maps: frozenset[str], path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(document, str):
        yield path, document
    elif isinstance(document, list):
        for item in document:
            yield from _strings(item, maps, f"{path}[]")
    elif isinstance(document, dict):
        for key, value in document.items():
            yield from _strings(value, maps, join(path, key))


def convention_problems(document: Any, maps: frozenset[str] = frozenset()) -> list[str]:
    """How ``document`` breaks the convention (README.md, "JSON output")."""
    problems = [
        f"{path}: {problem}"
        for path, name, value in _fields(document, maps)
        for problem in _field_problems(name, value)
    ]
    problems += [
        f"{path}: {text!r} carries its enum type's prefix"
        for path, text in _strings(document, maps)
        if text.startswith(ENUM_PREFIXES)
    ]
    return problems


def shape_problems(example: Example, document: Any) -> list[str]:
    """How ``document`` differs from ``example``: missing or extra fields, other types,
    null where the example does not allow it. Every element of an array is compared
    with the example's first."""
    problems: list[str] = []

    def walk(expected: Any, got: Any, path: str) -> None:
        where = path or "(the document)"
        if got is None:
            if path not in example.nullable:
                problems.append(f"{where}: null, but the example has {kind(expected)} and no null")
            return
        if kind(got) != kind(expected):
            problems.append(f"{where}: {kind(got)}, but the example has {kind(expected)}")
        elif isinstance(expected, dict) and path in example.maps:
            for value in got.values():
                walk(next(iter(expected.values())), value, f"{path}.*")
        elif isinstance(expected, dict):
            for key in expected.keys() - got.keys():
                problems.append(f"{join(path, key)}: missing")
            for key in got.keys() - expected.keys():
                problems.append(f"{join(path, key)}: not in the example")
            for key in expected.keys() & got.keys():
                walk(expected[key], got[key], join(path, key))
        elif isinstance(expected, list):
            for item in got:
                walk(expected[0], item, f"{path}[]")

    walk(example.document, document, "")
    return problems


def assert_matches_example(command: str, document: Any) -> None:
    """``document``, a real output of ``command`` (a key of EXAMPLES), has its example's
    fields and types, and follows the convention."""
    example = EXAMPLES[command]
    problems = shape_problems(example, document) + convention_problems(document, example.maps)
    assert not problems, f"{command} --json: " + "; ".join(sorted(problems)) + f"\n{document!r}"


# The README's tables ---------------------------------------------------------------------


def _outline(value: Any, path: str, example: Example) -> str:
    """A field list such as ``id, exit_code?, spec {image, env {…}}, transitions [{at}]``."""
    if isinstance(value, list):
        inner = _outline(value[0], f"{path}[]", example)
        return f"[{inner}]" if isinstance(value[0], dict) else "[]"
    if not isinstance(value, dict):
        return ""
    if path in example.maps:
        return "{…}"
    parts = []
    for key, child in value.items():
        child_path = join(path, key)
        mark = "?" if child_path in example.nullable else ""
        shape = _outline(child, child_path, example)
        parts.append(f"{key}{mark}" + (f" {shape}" if shape and shape != "[]" else ""))
    return "{" + ", ".join(parts) + "}"


def readme_table() -> str:
    lines = ["| command | `--json` prints |", "| --- | --- |"]
    for command, example in EXAMPLES.items():
        shape = _outline(example.document, "", example)
        if example.like:
            shape = f"array of the objects `{example.like}` prints"
        elif isinstance(example.document, list):
            shape = f"array of {shape[1:-1]}"
        notes = [example.note] if example.note else []
        notes += [f"`{name}`: {meaning}" for name, meaning in example.fields.items()]
        text = shape.replace("|", "\\|") + "".join(f"<br>{note}" for note in notes)
        lines.append(f"| `{command}` | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(readme_table() + "\n")
