"""The exit status of `testhide`, after `docker run` and timeout(1), so that
CI can tell a job's own exit status from testhide's:

    the job's own   `run`: the job's command ran and exited with this code
    1               `tests`: a test failed; `verify`: the job does not verify (results, not errors:
                    a `verify` that could not check, say the control plane unreachable, exits 125)
    124             the job timed out
    125             testhide itself failed: usage error, not logged in, cannot reach the control
                    plane, a refused request (unknown pool, secret or job; authentication), or the
                    job could not be set up (image refused or missing; it ended ERROR or LOST)
    126             the job's command was found but cannot be executed
    127             the job's command was not found in the image
    130             the job was canceled, or testhide was interrupted (Ctrl-C)

Every other command exits 0 or 125. A job's command may itself exit 124-127 or
130; as with `docker run`, the line on stderr says which it was.
"""

from __future__ import annotations

import re

from testhide.cli.model import Job, JobStatus

TIMED_OUT = 124
TOOL_FAILED = 125
CANNOT_EXECUTE = 126
NOT_FOUND = 127
CANCELED = 130
TESTS_FAILED = 1
VERIFY_FAILED = 1

# The container runtime's own words when it cannot start the command, which the
# agent passes on as the job's reason: runc says `OCI runtime create failed: ...
# exec: "cmd": executable file not found in $PATH`, gVisor `OCI runtime start
# failed: ... error finding executable "cmd" in PATH [/bin]: no such file or
# directory`. `docker run` maps the same words to 126 and 127.
_RUNTIME_FAILED = re.compile(r"OCI runtime \w+ failed: (?P<why>.*)")
# What an agent says instead since it words the refusal itself (agent/runtime/oci.py).
_NOT_FOUND = re.compile(r"\Acommand '.*' not found in image ")
_CANNOT_EXECUTE = re.compile(r"\Acommand '.*' cannot be executed in image ")


def of_job(job: Job) -> int:
    """The exit status for a finished job."""
    if job.status.exited and job.exit_code is not None:
        return job.exit_code
    if job.status == JobStatus.TIMED_OUT:
        return TIMED_OUT
    if job.status == JobStatus.CANCELED:
        return CANCELED
    if job.status == JobStatus.ERROR and _NOT_FOUND.match(job.status_reason):
        return NOT_FOUND
    if job.status == JobStatus.ERROR and _CANNOT_EXECUTE.match(job.status_reason):
        return CANNOT_EXECUTE
    if job.status == JobStatus.ERROR and (failed := _RUNTIME_FAILED.search(job.status_reason)):
        why = failed["why"]
        if "executable file not found" in why or "no such file or directory" in why:
            return NOT_FOUND
        if "permission denied" in why:
            return CANNOT_EXECUTE
    return TOOL_FAILED
