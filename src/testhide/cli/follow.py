"""Following a job's log to its end, through lost connections.

The follower writes each chunk as it arrives and, after a lost connection,
asks again from the byte it stopped at, so nothing is repeated or lost. It
keeps reconnecting for a window (5 minutes by default) that opens at the
first failure after the stream was last open: a follow of any length rides
out a control-plane restart, and each restart gets the whole window. The
window is not counted from the first attempt (tenacity's `stop_after_delay`
does that: a follow older than five minutes used to give up at its first
disconnect, while its job ran on). A command that has not reached the control
plane even once does not wait at all: a control plane that is down is
reported at once, not after the window.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, BinaryIO, Protocol

from testhide.cli.errors import ConnectionFailed, Disconnected, RpcFailed, Unreachable
from testhide.cli.model import Job, JobStatus, JobUpdate, LogChunk, LogStream
from testhide.common.durations import format_duration

if TYPE_CHECKING:
    from tenacity import RetryCallState

DEFAULT_WINDOW = timedelta(minutes=5)


class LogSource(Protocol):
    """What a follower needs of the control plane (`wire.ControlPlaneClient`)."""

    @property
    def connected(self) -> bool:
        """The control plane has answered a call of this command."""
        ...

    @property
    def server(self) -> str: ...

    def follow(self, job_id: str, offset: int, follow: bool) -> AsyncIterator[LogChunk | Job | JobUpdate]: ...


@dataclass(frozen=True)
class Reconnect:
    """How long and how often a follower tries to reconnect."""

    window: timedelta = DEFAULT_WINDOW
    """Give up after this long without an open stream, counted from the failure that began the outage."""
    max_wait_s: float = 5.0
    """Upper bound of the jittered exponential wait between two attempts."""
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


DEFAULT_RECONNECT = Reconnect()


def _transient(error: BaseException) -> bool:
    return isinstance(error, RpcFailed) and error.code == "UNAVAILABLE"


class _Outage:
    """Since when the follower has had no open stream, and how many attempts
    failed since the log last moved (for the backoff)."""

    def __init__(self, reconnect: Reconnect, source: LogSource, notify: Callable[[str], None]) -> None:
        self._reconnect = reconnect
        self._source = source
        self._notify = notify
        self.began: float | None = None
        self._failures = 0

    def moved(self) -> None:
        self.began = None
        self._failures = 0

    def failed(self, state: RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        assert isinstance(error, RpcFailed)  # only those are retried
        if isinstance(error, Disconnected) or self.began is None:
            # The stream was open until now (or the log moved since the last
            # failure): a new outage, with the whole window.
            self.began = self._reconnect.clock()
            if self._source.connected:
                window = format_duration(self._reconnect.window)
                self._notify(f"testhide: {error.summary}; reconnecting for up to {window}")
        self._failures += 1

    def exhausted(self, state: RetryCallState) -> bool:
        if not self._source.connected or self.began is None:
            return True
        return self._reconnect.clock() - self.began >= self._reconnect.window.total_seconds()

    def wait(self, state: RetryCallState) -> float:
        ceiling = min(self._reconnect.max_wait_s, 0.2 * 2 ** min(self._failures, 16))
        return random.uniform(0, ceiling)  # noqa: S311  # jitter, not a secret


async def stream_log(
    source: LogSource,
    job_id: str,
    follow: bool,
    out: BinaryIO,
    err: BinaryIO,
    reconnect: Reconnect = DEFAULT_RECONNECT,
    notify: Callable[[str], None] = lambda line: None,
    on_update: Callable[[Job], None] = lambda job: None,
) -> Job | None:
    """Write the log to out (stdout) and err (the rest) as it arrives. With
    ``follow``, returns the finished job, and passes the job to ``on_update``
    whenever its status or status reason changed."""
    offset = 0
    outage = _Outage(reconnect, source, notify)
    # Here, not at the top: `run` imports this module before its submit, and follows after it.
    from tenacity import AsyncRetrying, retry_if_exception

    retrying = AsyncRetrying(
        retry=retry_if_exception(_transient),
        stop=outage.exhausted,
        wait=outage.wait,
        after=outage.failed,
        sleep=reconnect.sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async for item in source.follow(job_id, offset, follow):
                    outage.moved()
                    if isinstance(item, JobUpdate):
                        on_update(item.job)
                        continue
                    if isinstance(item, Job):
                        return item
                    target = out if item.stream == LogStream.STDOUT else err
                    target.write(item.data)
                    target.flush()
                    offset = item.offset + len(item.data)
    except ConnectionFailed as error:
        if source.connected:
            raise Unreachable(
                error.server,
                f"{error.reason}; gave up after reconnecting for {format_duration(reconnect.window)}",
            ) from error
        raise
    return None


async def follow_attempts(
    source: LogSource,
    job_id: str,
    out: BinaryIO,
    err: BinaryIO,
    reconnect: Reconnect = DEFAULT_RECONNECT,
    notify: Callable[[str], None] = lambda line: None,
    on_update: Callable[[Job], None] = lambda job: None,
) -> Job:
    """Follow a job to its end and, when it was LOST and retried, its retries."""
    while True:
        finished = await stream_log(source, job_id, True, out, err, reconnect, notify, on_update)
        assert finished is not None
        if finished.status != JobStatus.LOST or not finished.retried_as:
            return finished
        notify(
            f"job {job_id} LOST: {finished.status_reason}; retrying as job {finished.retried_as} "
            f"(attempt {finished.attempt + 1} of {finished.retries + 1})"
        )
        job_id = finished.retried_as


class WaitNotices:
    """What `run` says about its job besides the log: why it waits, again each time
    the reason changes (never twice the same), and once where it runs."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        self._notify = notify
        self._said: tuple[str, JobStatus, str] | None = None
        self._running: set[str] = set()
        self.job_id = ""
        """The attempt followed now (a retry has an id of its own)."""

    def update(self, job: Job) -> None:
        self.job_id = job.id
        if job.status in (JobStatus.QUEUED, JobStatus.ASSIGNED):
            said = (job.id, job.status, job.status_reason)
            if job.status_reason and said != self._said:
                self._said = said
                self._notify(f"job {job.id} {job.status.value.lower()}: {job.status_reason}")
        elif job.status == JobStatus.RUNNING and job.id not in self._running:
            self._running.add(job.id)
            agent = job.agent
            where = (
                f"{agent.name} ({agent.host or 'unknown host'})" if agent else (job.agent_id or "an agent")
            )
            self._notify(f"job {job.id} running on {where}")
