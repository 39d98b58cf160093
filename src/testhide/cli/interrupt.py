"""Ctrl-C on `testhide run`, as `docker run` treats it with its signal proxy:
the first press asks the control plane to cancel the job and keeps following
it, so the command still ends with the job (and exits 130 once it is
CANCELED); a second press detaches, saying that the job is being canceled and how
to follow it. With ``--detach-on-interrupt`` the first press detaches, and the job
runs on (the notice says how to follow or cancel it).

SIGINT is taken with the event loop's own signal handling, not as
KeyboardInterrupt: that exception can land anywhere (inside a gRPC call, a
write to stdout), while a handler runs between two steps of the loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from testhide.cli.errors import CliError

CANCEL_WITHIN_S = 10.0


def detached_notice(job_id: str, canceling: bool = False) -> str:
    if canceling:
        return (
            f"testhide: detached; job {job_id} is being canceled (it stops within the agent's grace "
            f"period): follow with 'testhide logs -f {job_id}'"
        )
    return (
        f"testhide: detached; job {job_id} continues: follow with 'testhide logs -f {job_id}', "
        f"cancel with 'testhide cancel {job_id}'"
    )


class Interrupts:
    """While installed: each SIGINT cancels the job (the first), or detaches."""

    def __init__(
        self,
        job_id: Callable[[], str],
        cancel: Callable[[str], Awaitable[Any]],
        notify: Callable[[str], None],
        detach_at_once: bool = False,
    ) -> None:
        self._job_id = job_id
        self._cancel = cancel
        self._notify = notify
        self._detach_at_once = detach_at_once
        self._presses = 0
        self._follower: asyncio.Future[Any] | None = None
        self._canceling: asyncio.Task[None] | None = None
        self.detached = False
        """Set once the command let go of the job (the follower was stopped for it)."""

    @contextlib.contextmanager
    def installed(self, follower: asyncio.Future[Any]) -> Iterator[None]:
        """SIGINT handled here while ``follower`` follows the job."""
        loop = asyncio.get_running_loop()
        self._follower = follower
        try:
            loop.add_signal_handler(signal.SIGINT, self.pressed)
        except (NotImplementedError, RuntimeError):  # no loop signal handling here: Ctrl-C stays an exit
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def settle(self, within_s: float = CANCEL_WITHIN_S) -> None:
        """Let a cancel the first press asked for reach the control plane, even when
        a second press detached meanwhile: the job was asked to stop, and will."""
        if self._canceling is None or self._canceling.done():
            return
        try:
            await asyncio.wait_for(self._canceling, within_s)
        except TimeoutError:
            self._notify(f"testhide: the cancel of job {self._job_id()} did not go through in time")

    def pressed(self) -> None:
        self._presses += 1
        job_id = self._job_id()
        if self._detach_at_once or self._presses > 1:
            self._notify(detached_notice(job_id, canceling=self._canceling is not None))
            self.detached = True
            if self._follower is not None:
                self._follower.cancel()
            return
        self._notify(f"testhide: canceling job {job_id} (press Ctrl-C again to detach)")
        self._canceling = asyncio.ensure_future(self._request_cancel(job_id))

    async def _request_cancel(self, job_id: str) -> None:
        try:
            await self._cancel(job_id)
        except CliError as error:
            # The job may have ended meanwhile; following it says how.
            self._notify(f"testhide: could not cancel job {job_id}: {error}")
