"""One job: policy and image checks, workspace in, container up, output masked,
capped and batched to the control plane, stop on timeout or cancel, artifacts
and reports out, result reported, container removed."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import replace
from fnmatch import fnmatchcase

import structlog

from testhide.agent.config import AgentConfig
from testhide.agent.credentials import Credentials
from testhide.agent.errors import CommandNotRunnable, JobSetupError, RuntimeUnavailable
from testhide.agent.jobfiles import collect, repack_workspace
from testhide.agent.masking import SecretMasker
from testhide.agent.model import Assignment, Isolation, LogStream, Outcome
from testhide.agent.outbox import Outbox
from testhide.agent.rpc.link import ControlPlaneLink
from testhide.agent.runtime.base import (
    ContainerRuntime,
    ContainerSpec,
    OutputQueue,
    RunningContainer,
    RunningServices,
)
from testhide.agent.statements import JobFacts, StatementSigner
from testhide.agent.steps import (
    BeforeJob,
    JobFacilities,
    StepEnded,
    check_fetch,
    clean_up,
    run_fetch_step,
    system_line,
)

log = structlog.get_logger("testhide.agent.executor")


def truncation_marker(cap: int) -> bytes:
    return f"\n[testhide: log truncated at {cap // (1024 * 1024)} MiB; the job keeps running]\n".encode()


class Executor:
    def __init__(
        self,
        config: AgentConfig,
        runtime: ContainerRuntime,
        outbox: Outbox,
        link: ControlPlaneLink | None = None,
        owner: str = "",
        on_runtime_unavailable: Callable[[], None] = lambda: None,
        facilities: JobFacilities | None = None,
        credentials: Callable[[], Credentials] | None = None,
    ) -> None:
        self._config = config
        self._signer = StatementSigner(credentials) if credentials is not None else None
        self._facts: dict[str, JobFacts] = {}
        self._facilities = facilities
        self._on_runtime_unavailable = on_runtime_unavailable
        self._owner = owner
        self._runtime = runtime
        self._outbox = outbox
        self._link = link
        self._stop_requests: dict[str, asyncio.Event] = {}
        self._stop_reasons: dict[str, str] = {}
        self._deadlines: dict[str, float] = {}
        self._abandoned: set[str] = set()

    def cancel(self, job_id: str, reason: str, abandon: bool = False) -> bool:
        """Stop a running job; with ``abandon`` (it is no longer ours) skip
        collecting its artifacts: nothing about it is reported any more."""
        event = self._stop_requests.get(job_id)
        if event is None:
            return False
        self._stop_reasons[job_id] = reason
        if abandon:
            self._abandoned.add(job_id)
        event.set()
        return True

    def running(self) -> list[str]:
        return list(self._stop_requests)

    async def _prepare(self, job: Assignment) -> ContainerSpec:
        """Everything that can refuse the job before it runs."""
        for image in (job.image, *(service.image for service in job.services)):
            if job.allowed_images and not any(fnmatchcase(image, p) for p in job.allowed_images):
                raise JobSetupError(
                    f"image {image!r} is not allowed in this pool (allowed: {', '.join(job.allowed_images)})"
                )
            await self._runtime.ensure_image(image, job.pull_policy)
        if job.fetch:
            check_fetch(job, self._facilities)
        workspace = None
        if job.has_workspace:
            if self._link is None:
                raise JobSetupError("this agent cannot fetch workspaces")
            uid, _, gid = self._config.job_user.partition(":")
            with tempfile.TemporaryFile() as spool:
                await self._link.fetch_workspace(
                    job.job_id, job.epoch, spool, self._config.max_workspace_bytes
                )
                workspace = await asyncio.to_thread(repack_workspace, spool, int(uid), int(gid or uid))
        return ContainerSpec(
            job_id=job.job_id,
            image=job.image,
            command=job.command,
            env={**job.env, **job.secret_env},
            workdir=job.workdir,
            cpus=job.cpus,
            memory_bytes=job.memory_bytes,
            pids=job.pids,
            user=self._config.job_user,
            runtime=self._runtime_for(job),
            workspace_tar=workspace,
            owner=self._owner,
            workspace_volume=bool(job.has_workspace or job.artifact_globs or job.junit_globs or job.fetch),
        )

    def _runtime_for(self, job: Assignment) -> str:
        """A host configured for a stronger runtime (gVisor) runs every job under it."""
        return self._config.runtime if self._config.runtime != "runc" else (job.runtime or "runc")

    async def _fail(self, job: Assignment, reason: str, logged: bool = True) -> None:
        if logged:
            await self._outbox.log(job.job_id, [(LogStream.SYSTEM, f"testhide: {reason}\n".encode())])
        self._finish(job, Outcome.ERROR, -1, reason)

    def _finish(self, job: Assignment, outcome: Outcome, exit_code: int, reason: str) -> None:
        """The result, with its statement signed once every log batch of the job is made."""
        facts = self._facts.pop(job.job_id, None) or JobFacts()
        signed = None
        if self._signer is not None:
            head = self._outbox.log_chain_head(job.job_id)
            signed = self._signer.sign(job, facts, outcome, exit_code, reason, head)
        self._outbox.finish(job.job_id, outcome, exit_code, reason, signed=signed)

    async def run(self, job: Assignment) -> None:
        self._outbox.open(job.job_id, job.epoch)
        self._facts[job.job_id] = JobFacts()
        self._stop_requests[job.job_id] = asyncio.Event()
        # The fetch step and the job step share the job's timeout.
        self._deadlines[job.job_id] = asyncio.get_running_loop().time() + job.timeout.total_seconds()
        before = BeforeJob()
        try:
            await self._run(job, before)
        finally:
            self._deadlines.pop(job.job_id, None)
            self._facts.pop(job.job_id, None)
            with suppress(RuntimeUnavailable):  # what stays behind is removed once the engine is back
                await clean_up(before, self._facilities, self._runtime.remove_workspace)

    async def _before_job_step(
        self, job: Assignment, spec: ContainerSpec, before: BeforeJob
    ) -> ContainerSpec:
        """The fetch step and the services: the job step's spec. ``StepEnded`` if the job ends here."""
        if job.fetch:
            assert self._facilities is not None  # check_fetch refused the job otherwise
            # RUNNING from here: the fetch step is part of the job (its container's facts come
            # as it starts, in a fetch report of their own).
            self._outbox.started(job.job_id, None)
            before.workspace = await self._runtime.make_workspace(spec)
            spec = await run_fetch_step(
                job,
                spec,
                before,
                self._facilities,
                lambda s, o, started: self._run_step(job, s, o, started),
                self._note(job),
                self._runtime.networked_runtime,
                lambda report: self._outbox.fetched(job.job_id, report),
            )
        if job.services:
            before.services = await self._runtime.start_services(spec, job.services)
            spec = replace(spec, network=before.services.network_mode, runtime=before.services.job_runtime)
        return spec

    def _note(self, job: Assignment) -> Callable[[str], Awaitable[None]]:
        async def note(text: str) -> None:
            await self._outbox.log(job.job_id, system_line(text))

        return note

    async def _run_step(
        self,
        job: Assignment,
        spec: ContainerSpec,
        output: OutputQueue,
        started: Callable[[Isolation | None], None],
    ) -> tuple[Outcome, int, str, Isolation | None]:
        """A container before the job's own (the fetch step): run to its end, output
        forwarded; what Docker applied to it read back right after its start and given
        to ``started`` then."""
        stop = self._stop_requests[job.job_id]
        container = await self._runtime.start(spec, output)
        forwarder = asyncio.create_task(self._forward(job, output, job.fetch_secret_env.values()))
        try:
            isolation = await self._isolation(container, log.bind(job_id=job.job_id, step="fetch"))
            started(isolation)
            outcome, exit_code, reason = await self._supervise(job, container, stop)
            await forwarder
            return outcome, exit_code, reason, isolation
        finally:
            forwarder.cancel()
            output.close()
            with suppress(RuntimeUnavailable):
                await asyncio.shield(container.remove())

    async def _run(self, job: Assignment, before: BeforeJob) -> None:
        stop = self._stop_requests[job.job_id]
        output = OutputQueue()
        bound = log.bind(job_id=job.job_id, epoch=job.epoch)
        try:
            spec = await self._before_job_step(job, await self._prepare(job), before)
            container = await self._runtime.start(spec, output)
            if spec.workspace_name is not None:
                before.workspace = None  # the job step's container took it over
        except StepEnded as ended:
            bound.info("job_finished", outcome=ended.outcome.name, exit_code=ended.exit_code, step="fetch")
            self._finish(job, ended.outcome, ended.exit_code, ended.reason)
            self._stop_requests.pop(job.job_id, None)
            return
        except RuntimeUnavailable as exc:
            # Not the job's fault: back to the queue, and no new jobs until the engine answers.
            bound.warning("job_refused", error=str(exc))
            self._outbox.refuse(job.job_id, str(exc))
            self._on_runtime_unavailable()
            self._stop_requests.pop(job.job_id, None)
            return
        except Exception as exc:
            # Whatever went wrong, the job must end: a job that never reports is worse.
            reason = (
                str(exc) if isinstance(exc, JobSetupError) else f"the agent could not start the job: {exc!r}"
            )
            (bound.warning if isinstance(exc, JobSetupError) else bound.exception)(
                "job_setup_failed", error=reason
            )
            # A command the image cannot run is the reason alone: every client shows the
            # reason, and the same words in the log would be printed twice by `testhide run`.
            await self._fail(job, reason, logged=not isinstance(exc, CommandNotRunnable))
            self._stop_requests.pop(job.job_id, None)
            return
        isolation = await self._isolation(container, bound)
        if (facts := self._facts.get(job.job_id)) is not None:
            facts.isolation = isolation
        self._outbox.started(job.job_id, isolation, before.services.isolation if before.services else ())
        forwarder = asyncio.create_task(self._forward(job, output))
        # Output that can no longer be shipped must not keep the container running: stop it.
        forwarder.add_done_callback(lambda task: self._output_ended(job.job_id, task))
        try:
            try:
                outcome, exit_code, reason = await self._supervise(job, container, stop, before.services)
            except RuntimeUnavailable as exc:
                self._on_runtime_unavailable()
                outcome, exit_code = Outcome.ERROR, -1
                reason = f"lost contact with the container engine while the job ran ({exc})"
            except Exception as exc:  # a job must end with a result, whatever broke
                bound.exception("job_supervision_failed")
                outcome, exit_code, reason = Outcome.ERROR, -1, f"the agent lost track of the job: {exc!r}"
            try:
                # Waits while the job's output can go nowhere (control plane away, disk full):
                # the container is stopped already, its result follows its log.
                await forwarder
            except Exception as exc:
                bound.error("job_output_failed", error=repr(exc))
                outcome, exit_code = Outcome.ERROR, -1
                reason = f"the agent could not keep the job's output: {exc!r}"
            if job.job_id not in self._abandoned and outcome != Outcome.ERROR:
                await self._collect(job, container)
            if job.job_id not in self._abandoned and before.services is not None:
                await self._upload_service_output(job, before.services)
            self._finish(job, outcome, exit_code, reason)
            bound.info("job_finished", outcome=outcome.name, exit_code=exit_code)
        except BaseException:
            forwarder.cancel()
            with suppress(asyncio.CancelledError):
                await forwarder
            with suppress(RuntimeUnavailable):
                await asyncio.shield(container.stop(0))
            raise
        finally:
            output.close()
            self._stop_requests.pop(job.job_id, None)
            self._stop_reasons.pop(job.job_id, None)
            self._abandoned.discard(job.job_id)
            with suppress(RuntimeUnavailable):  # what stays behind is removed once the engine is back
                await asyncio.shield(container.remove())

    @staticmethod
    async def _isolation(container: RunningContainer, bound: structlog.BoundLogger) -> Isolation | None:
        """Read back after the start (the container's network namespace exists only
        then); a failure to read it leaves the job running, without the facts."""
        try:
            return await container.isolation()
        except Exception as exc:
            bound.warning("container_isolation_unread", error=repr(exc))
            return None

    def _output_ended(self, job_id: str, forwarder: asyncio.Task[None]) -> None:
        if not forwarder.cancelled() and forwarder.exception() is not None:
            self.cancel(job_id, "the agent could not keep the job's output")

    async def _supervise(
        self,
        job: Assignment,
        container: RunningContainer,
        stop: asyncio.Event,
        services: RunningServices | None = None,
    ) -> tuple[Outcome, int, str]:
        """Until the container exits, the job's time is up, it is canceled, or one of
        its services exits: (outcome, exit code, reason)."""
        outcome, reason, service_exit = Outcome.EXITED, "", False
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(container.wait())
        stopping = asyncio.create_task(stop.wait())
        never: asyncio.Future[tuple[str, int]] = loop.create_future()
        watching = asyncio.ensure_future(services.exited() if services else never)
        try:
            timeout = max(0.0, self._deadlines.get(job.job_id, loop.time()) - loop.time())
            done, _ = await asyncio.wait(
                {waiting, stopping, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting not in done:
                if stopping in done:
                    outcome, reason = Outcome.CANCELED, self._stop_reasons.get(job.job_id, "canceled")
                elif watching in done:
                    name, code = watching.result()
                    service_exit, reason = True, f"service {name} exited early with exit code {code}"
                else:
                    outcome, reason = Outcome.TIMED_OUT, f"timed out after {job.timeout}"
                await container.stop(self._config.stop_grace.total_seconds())
            exit_info = await waiting
        finally:
            for task in (stopping, waiting, watching, never):
                task.cancel()
        if exit_info.runtime_failure and outcome == Outcome.EXITED:
            # Not the job's exit: the sandbox around it died (the job's own output ends early).
            return Outcome.ERROR, -1, exit_info.runtime_failure
        if exit_info.oom_killed:
            reason = reason or "killed: out of memory"
        if service_exit:  # the job was stopped for it: it fails, whatever it exited with
            return outcome, exit_info.exit_code or 1, reason
        return outcome, exit_info.exit_code, reason

    async def _collect(self, job: Assignment, container: RunningContainer) -> None:
        """Artifacts and reports go up before the result, so a finished job has them."""
        if not (job.artifact_globs or job.junit_globs) or self._link is None:
            return
        try:
            with tempfile.TemporaryFile() as spool:
                await container.workspace_archive(spool)
                spool.seek(0)
                found = await asyncio.to_thread(
                    collect,
                    spool,
                    job.artifact_globs,
                    job.junit_globs,
                    self._config.max_artifact_bytes,
                    self._config.max_job_artifact_bytes,
                )
            for item in found.files:
                await self._upload(job, item.path, item.kind, item.data)
            notes = [f"testhide: not collected: {s}\n" for s in found.skipped]
            if notes:
                await self._outbox.log(job.job_id, [(LogStream.SYSTEM, "".join(notes).encode())])
        except Exception as exc:
            log.warning("artifact_collection_failed", job_id=job.job_id, error=str(exc))
            await self._outbox.log(
                job.job_id, [(LogStream.SYSTEM, f"testhide: artifacts not collected: {exc}\n".encode())]
            )

    async def _upload(self, job: Assignment, path: str, kind: str, data: bytes) -> None:
        """Upload, and note it for the statement once the control plane has it."""
        assert self._link is not None
        await self._link.upload(job.job_id, job.epoch, path, kind, data)
        if (facts := self._facts.get(job.job_id)) is not None:
            facts.uploaded(path, kind, data)

    async def _upload_service_output(self, job: Assignment, services: RunningServices) -> None:
        """Each service's output, for ``testhide logs JOB --service NAME``."""
        if self._link is None:
            return
        masker_values = list(job.secret_env.values())
        for name in services.names:
            masker = SecretMasker(masker_values)
            data = masker.feed(services.output(name)) + masker.flush()
            try:
                await self._upload(job, f"services/{name}.log", "service_log", data)
            except Exception as exc:
                log.warning("service_output_not_uploaded", job_id=job.job_id, service=name, error=str(exc))
                await self._outbox.log(job.job_id, system_line(f"output of service {name} not kept: {exc}"))

    async def _forward(self, job: Assignment, output: OutputQueue, more_secrets: Iterable[str] = ()) -> None:
        """Mask secrets, cap the log, and batch: send at ``log_batch_bytes`` or
        ``log_batch_interval`` after the batch's first byte, whichever first."""
        loop = asyncio.get_running_loop()
        secrets = [*job.secret_env.values(), *more_secrets]
        maskers = {stream: SecretMasker(secrets) for stream in LogStream}
        cap, sent, truncated = self._config.log_cap_bytes, 0, False
        batch: list[tuple[LogStream, list[bytes]]] = []  # runs of one stream, joined at flush
        size, deadline = 0, 0.0

        def add(stream: LogStream, data: bytes) -> None:
            nonlocal size, deadline, sent, truncated
            if not data or truncated:
                return
            if sent + len(data) > cap:
                data, truncated = data[: cap - sent], True
            if not batch:
                deadline = loop.time() + self._config.log_batch_interval.total_seconds()
            if data:
                if not batch or batch[-1][0] != stream:
                    batch.append((stream, []))
                batch[-1][1].append(data)
            size += len(data)
            sent += len(data)
            if truncated:
                batch.append((LogStream.SYSTEM, [truncation_marker(cap)]))

        async def flush() -> None:
            nonlocal batch, size
            if batch:
                entries, batch, size = [(stream, b"".join(parts)) for stream, parts in batch], [], 0
                await self._outbox.log(job.job_id, entries)  # waits while the spool is full

        while True:
            timeout = max(0.0, deadline - loop.time()) if batch else None
            try:
                item = await asyncio.wait_for(output.get(), timeout)
            except TimeoutError:
                await flush()
                continue
            if item is None:
                for stream, masker in maskers.items():
                    add(stream, masker.flush())
                await flush()
                return
            stream, data = item
            add(stream, maskers[stream].feed(data))
            if size >= self._config.log_batch_bytes:
                await flush()
