"""What the two doctors (``testhide-controlplane doctor``, ``testhide-agent doctor``)
report: one finding per check, with the fix, printed a line each or as one JSON
document, and the exit status they end with."""

from __future__ import annotations

import enum
import json
import pwd
from collections.abc import Sequence
from dataclasses import dataclass


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str
    finding: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.value:<4}  {self.check}: {self.finding}"
        return f"{text} — fix: {self.fix}" if self.fix else text

    def as_json(self) -> dict[str, str]:
        return {"status": self.status.name, "check": self.check, "finding": self.finding, "fix": self.fix}


def ok(check: str, finding: str) -> Finding:
    return Finding(Status.OK, check, finding)


def warn(check: str, finding: str, fix: str = "") -> Finding:
    return Finding(Status.WARN, check, finding, fix)


def fail(check: str, finding: str, fix: str = "") -> Finding:
    return Finding(Status.FAIL, check, finding, fix)


def exit_status(findings: Sequence[Finding], strict: bool) -> int:
    """1 if any check failed (or, with ``strict``, warned); else 0."""
    bad = {Status.FAIL, Status.WARN} if strict else {Status.FAIL}
    return 1 if any(f.status in bad for f in findings) else 0


def render(findings: Sequence[Finding], as_json: bool, strict: bool) -> str:
    if as_json:
        document = {"ok": exit_status(findings, strict) == 0, "checks": [f.as_json() for f in findings]}
        return json.dumps(document, indent=2)
    return "\n".join(f.line() for f in findings)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def free_space(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB" if size >= 1024**3 else f"{size / 1024**2:.0f} MiB"
