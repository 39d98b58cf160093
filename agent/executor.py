"""One job: container up, output batched to the control plane, stop on
timeout or cancel, result reported, container removed."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import structlog

from agent.config import AgentConfig
from agent.errors import JobSetupError
from agent.model import Assignment, LogStream, Outcome
from agent.outbox import Outbox
from agent.runtime.base import ContainerRuntime, ContainerSpec, OutputQueue

log = structlog.get_logger("testhide.agent.executor")


class Executor:
    def __init__(self, config: AgentConfig, runtime: ContainerRuntime, outbox: Outbox) -> None:
        self._config = config
        self._runtime = runtime
        self._outbox = outbox
        self._stop_requests: dict[str, asyncio.Event] = {}
        self._stop_reasons: dict[str, str] = {}

    def cancel(self, job_id: str, reason: str) -> bool:
        event = self._stop_requests.get(job_id)
        if event is None:
            return False
        self._stop_reasons[job_id] = reason
        event.set()
        return True

    def _spec(self, job: Assignment) -> ContainerSpec:
        return ContainerSpec(job_id=job.job_id, image=job.image, command=job.command, env=job.env,
                             workdir=job.workdir, cpus=job.cpus, memory_bytes=job.memory_bytes, pids=job.pids,
                             user=self._config.job_user, runtime=self._config.runtime)

    async def run(self, job: Assignment) -> None:
        self._outbox.open(job.job_id, job.epoch)
        stop = self._stop_requests[job.job_id] = asyncio.Event()
        output: OutputQueue = asyncio.Queue()
        bound = log.bind(job_id=job.job_id, epoch=job.epoch)
        try:
            container = await self._runtime.start(self._spec(job), output)
        except Exception as exc:
            # Whatever went wrong, the job must end: a job that never reports is worse.
            reason = str(exc) if isinstance(exc, JobSetupError) else f"the agent could not start the job: {exc!r}"
            log_method = bound.warning if isinstance(exc, JobSetupError) else bound.exception
            log_method("job_setup_failed", error=reason)
            self._outbox.log(job.job_id, [(LogStream.SYSTEM, f"testhide: {reason}\n".encode())])
            self._outbox.finish(job.job_id, Outcome.ERROR, -1, reason)
            self._stop_requests.pop(job.job_id, None)
            return
        self._outbox.started(job.job_id)
        forwarder = asyncio.create_task(self._forward(job.job_id, output))
        try:
            outcome, reason = Outcome.EXITED, ""
            waiting = asyncio.create_task(container.wait())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({waiting, stopping}, timeout=job.timeout.total_seconds(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                if stopping in done:
                    outcome, reason = Outcome.CANCELED, self._stop_reasons.get(job.job_id, "canceled")
                else:
                    outcome, reason = Outcome.TIMED_OUT, f"timed out after {job.timeout}"
                await container.stop(self._config.stop_grace.total_seconds())
            stopping.cancel()
            exit_info = await waiting
            if exit_info.oom_killed:
                reason = reason or "killed: out of memory"
            await forwarder
            self._outbox.finish(job.job_id, outcome, exit_info.exit_code, reason)
            bound.info("job_finished", outcome=outcome.name, exit_code=exit_info.exit_code)
        except BaseException:
            forwarder.cancel()
            with suppress(asyncio.CancelledError):
                await forwarder
            await asyncio.shield(container.stop(0))
            raise
        finally:
            self._stop_requests.pop(job.job_id, None)
            self._stop_reasons.pop(job.job_id, None)
            await asyncio.shield(container.remove())

    async def _forward(self, job_id: str, output: OutputQueue) -> None:
        """Batch output: send at ``log_batch_bytes`` or ``log_batch_interval``
        after the batch's first byte, whichever comes first."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[LogStream, bytes]] = []
        size, deadline = 0, 0.0

        def flush() -> None:
            nonlocal batch, size
            if batch:
                self._outbox.log(job_id, batch)
                batch, size = [], 0

        while True:
            timeout = max(0.0, deadline - loop.time()) if batch else None
            try:
                item = await asyncio.wait_for(output.get(), timeout)
            except TimeoutError:
                flush()
                continue
            if item is None:
                flush()
                return
            stream, data = item
            if not batch:
                deadline = loop.time() + self._config.log_batch_interval.total_seconds()
            if batch and batch[-1][0] == stream:
                batch[-1] = (stream, batch[-1][1] + data)
            else:
                batch.append((stream, data))
            size += len(data)
            if size >= self._config.log_batch_bytes:
                flush()
