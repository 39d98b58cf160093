"""Agent errors.

AgentError
├── ConfigError            invalid configuration or data dir
├── EnrollmentError        enrollment refused or the server failed the pin
├── CredentialsError       the certificate expired or was revoked: enroll again
├── JobSetupError          a job could not be started (image missing, Docker refused)
│   └── CommandNotRunnable the image has no such command, or it cannot be executed
└── RuntimeUnavailable     the container engine does not answer (restarting, stopped)
"""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    pass


class EnrollmentError(AgentError):
    pass


class CredentialsError(AgentError):
    pass


class JobSetupError(AgentError):
    pass


class CommandNotRunnable(JobSetupError):
    """Its message is the job's whole reason (``runtime/oci.py``): the job ends with
    it alone, and no log line repeats it."""


class RuntimeUnavailable(AgentError):
    """Not the job's fault: a job not yet started goes back to the queue, and the
    agent takes no new jobs until the engine answers again."""
