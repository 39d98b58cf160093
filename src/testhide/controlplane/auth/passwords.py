"""Passwords: bcrypt, rules a password must meet before it is stored, and the
bounded worker pool that checks them.

A bcrypt check costs about 240 ms of CPU. On the event loop it would stall
every RPC and agent stream for that long, so checks run on a few threads of
their own (bcrypt releases the GIL while it works: two threads run two checks
in the time of one). The pool is bounded and so is its queue: a login that
finds both full is refused at once with ``RateLimited`` (RESOURCE_EXHAUSTED and
a retry hint) rather than waiting behind a flood. A login for an account that
does not exist checks a dummy hash on the same pool, so it costs the same."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import bcrypt

from testhide.controlplane.errors import InvalidArgument, RateLimited

MIN_LENGTH = 12
MAX_BYTES = 72  # bcrypt's limit; longer input would be silently cut, so it is refused
ROUNDS = 12
BUSY = "too many password logins are being checked at once; try again shortly"
T = TypeVar("T")


@functools.cache
def _dummy_hash() -> bytes:
    """Compared against when the account does not exist, so that timing does not tell.
    Made on first use (it costs a whole bcrypt round), not by every command that imports us."""
    return bcrypt.hashpw(b"testhide-dummy-password", bcrypt.gensalt(rounds=ROUNDS))


def default_workers() -> int:
    """Half the cores, at least one: the event loop keeps a core of its own."""
    return max(1, (os.cpu_count() or 2) // 2)


def check_complexity(password: str, user: str) -> None:
    if len(password) < MIN_LENGTH:
        raise InvalidArgument(f"the password must have at least {MIN_LENGTH} characters")
    if len(password.encode()) > MAX_BYTES:
        raise InvalidArgument(f"the password must be at most {MAX_BYTES} bytes")
    classes = sum(
        any(test(ch) for ch in password)
        for test in (str.islower, str.isupper, str.isdigit, lambda ch: not ch.isalnum())
    )
    if classes < 3:
        raise InvalidArgument(
            "the password must mix at least three of: lowercase, uppercase, digits, symbols"
        )
    if user.lower() in password.lower():
        raise InvalidArgument("the password must not contain the user name")


def hash_password(password: str) -> bytes:
    """Blocking (~240 ms): for the operator's command; servers use ``PasswordChecks.hash``."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=ROUNDS))


def verify_password(password: str, hashed: bytes | None) -> bool:
    """Blocking (~240 ms); ``hashed`` None checks the dummy hash and returns False."""
    candidate = password.encode()[:MAX_BYTES]
    if hashed is None:
        bcrypt.checkpw(candidate, _dummy_hash())
        return False
    return bcrypt.checkpw(candidate, hashed)


class PasswordChecks:
    """bcrypt off the event loop: ``workers`` threads, at most ``queue`` checks
    waiting for one; beyond that, ``RateLimited`` at once."""

    def __init__(self, workers: int | None = None, queue: int = 16, retry_after_s: float = 1.0) -> None:
        self.workers = workers or default_workers()
        self.capacity = self.workers + queue
        self._retry_after_s = retry_after_s
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="bcrypt")
        self._lock = threading.Lock()  # released from the worker threads
        self._admitted = 0
        self._executor.submit(_dummy_hash)  # now, so that no login pays for it

    @property
    def admitted(self) -> int:
        """Checks running or waiting now."""
        return self._admitted

    def require_room(self) -> None:
        """Refuse early (before any store lookups) when the pool is already full."""
        if self._admitted >= self.capacity:
            raise RateLimited(BUSY, retry_after_s=self._retry_after_s)

    async def verify(self, password: str, hashed: bytes | None) -> bool:
        return await asyncio.wrap_future(self._submit(verify_password, password, hashed))

    async def hash(self, password: str) -> bytes:
        return await asyncio.wrap_future(self._submit(hash_password, password))

    def _submit(self, work: Callable[..., T], *args: object) -> Future[T]:
        with self._lock:
            if self._admitted >= self.capacity:
                raise RateLimited(BUSY, retry_after_s=self._retry_after_s)
            self._admitted += 1
        try:
            future = self._executor.submit(work, *args)
        except BaseException:
            self._release()
            raise
        # Released when the check ends, not when its caller stops waiting: a
        # cancelled login must not free a slot while its thread still works.
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        """Drop queued checks; running ones finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
