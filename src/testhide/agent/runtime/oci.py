"""The container runtime's refusal to run a job's command, in the engineer's
words. runc says `OCI runtime create failed: ... exec: "cmd": executable file
not found in $PATH: unknown`, gVisor `OCI runtime start failed: ... error
finding executable "cmd" in PATH [/bin]: no such file or directory`; the job
ends with one readable reason instead, and the agent's own log keeps the raw
words. The CLI reads the reason's form for its exit status (127 not found,
126 cannot be executed, as `docker run`): see `cli/exitcodes.py`."""

from __future__ import annotations

import re

_RUNTIME_FAILED = re.compile(r"OCI runtime \w+ failed: (?P<why>.*)", re.DOTALL)


def command_refusal(explanation: str, command: tuple[str, ...], image: str) -> str | None:
    """The job's reason when ``explanation`` is the runtime refusing ``command``;
    None for any other failure."""
    failed = _RUNTIME_FAILED.search(explanation)
    if failed is None:
        return None
    why = failed["why"]
    shown = command[0] if command else ""
    if "executable file not found" in why or "no such file or directory" in why:
        return f"command {shown!r} not found in image {image}"
    if "permission denied" in why:
        return f"command {shown!r} cannot be executed in image {image}: permission denied"
    return None
