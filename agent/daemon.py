"""The agent daemon: keeps one session to the control plane open, reconnecting
with capped, jittered exponential backoff, and runs the jobs it is given."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import grpc
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from agent.config import AgentConfig
from agent.credentials import Credentials
from agent.executor import Executor
from agent.model import Assignment
from agent.outbox import Outbox
from agent.rpc.link import ControlPlaneLink
from agent.rpc.session import Session, SessionEvents, SessionLost
from agent.runtime.base import ContainerRuntime

log = structlog.get_logger("testhide.agent")


class Agent:
    """``run()`` returns after ``shutdown()``; a CredentialsError ends it too,
    since enrolling again is the only way forward."""

    def __init__(self, config: AgentConfig, runtime: ContainerRuntime) -> None:
        self.config = config
        self.outbox = Outbox()
        self._runtime = runtime
        self._executor = Executor(config, runtime, self.outbox, ControlPlaneLink(lambda: self._credentials))
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._credentials = Credentials.load(config.data_dir)
        self._stopping = asyncio.Event()
        self.credentials_changed = asyncio.Condition()

    @property
    def agent_id(self) -> str:
        return self._credentials.agent_id

    def _assign(self, job: Assignment) -> None:
        if job.job_id in self._jobs:
            return  # a replayed assignment of a job already running
        # Open before the task runs: a hello sent in between must list the job.
        self.outbox.open(job.job_id, job.epoch)
        task = asyncio.create_task(self._executor.run(job), name=f"job-{job.job_id}")
        self._jobs[job.job_id] = task
        task.add_done_callback(lambda _: self._jobs.pop(job.job_id, None))
        log.info("job_received", job_id=job.job_id, epoch=job.epoch, image=job.image)

    def _cancel(self, job_id: str, reason: str) -> None:
        if not self._executor.cancel(job_id, reason):
            self.outbox.drop(job_id)

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    def _update_credentials(self, credentials: Credentials) -> None:
        credentials.save(self.config.data_dir)
        self._credentials = credentials
        asyncio.ensure_future(self._announce_credentials())

    async def _announce_credentials(self) -> None:
        async with self.credentials_changed:
            self.credentials_changed.notify_all()

    def _trust_bundle(self, bundle_pem: bytes) -> None:
        if bundle_pem != self._credentials.ca_pem:
            self._update_credentials(replace(self._credentials, ca_pem=bundle_pem))
            log.info("trust_bundle_updated", certificates=bundle_pem.count(b"BEGIN CERTIFICATE"))

    async def _one_session(self) -> None:
        session = Session(self.config, self._credentials, self.outbox, SessionEvents(
            assign=self._assign, cancel=self._cancel, renewed=self._update_credentials,
            trust_bundle=self._trust_bundle), runtimes=self._runtime.runtimes())
        await session.run()

    async def run(self) -> None:
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                runner = asyncio.create_task(self._connect_with_backoff())
                done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if runner not in done:
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                    break
                runner.result()  # CredentialsError ends the agent
        finally:
            stopper.cancel()
            await self._stop_jobs()

    async def _connect_with_backoff(self) -> None:
        """Returns when an established session was lost: the next series of
        attempts starts with a short wait again."""

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("controlplane_unreachable", attempt=state.attempt_number,
                        retry_in_s=round(state.upcoming_sleep, 2),
                        error=error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error))

        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.5, max=self.config.max_backoff.total_seconds()),
            retry=retry_if_exception_type(grpc.aio.AioRpcError), before_sleep=before_sleep, reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._one_session()
        except SessionLost as exc:
            log.warning("controlplane_connection_lost", error=str(exc))

    async def _stop_jobs(self) -> None:
        for task in list(self._jobs.values()):
            task.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    def shutdown(self) -> None:
        self._stopping.set()
