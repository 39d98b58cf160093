"""The CLI's wire layer: the one module of the command that speaks gRPC and
the generated protobuf messages. It opens a channel to one of the control
plane's replicas (see `ControlPlaneClient` for which), keeps the session's
access token fresh, converts messages to the CLI's model (`cli/model.py`) and
back, and maps gRPC errors to the CLI's errors (`cli/errors.py`) in one
place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from testhide.cli.bundle import JobEvidence, JobRecord, LogBatch
from testhide.cli.config import Login
from testhide.cli.errors import Disconnected, RpcFailed, Unreachable
from testhide.cli.model import (
    ApiKeyLogin,
    Artifact,
    Identity,
    Job,
    JobQuery,
    JobRequest,
    JobUpdate,
    LogChunk,
    MfaEnrollment,
    PasswordLogin,
    Secret,
    TestResults,
)
from testhide.cli.wire_admin import AdminCalls
from testhide.cli.wire_convert import (
    artifact_from_pb,
    chunk_from_pb,
    evidence_from_pb,
    job_from_pb,
    job_record_from_pb,
    job_status_from_pb,
    list_request_pb,
    log_batch_from_pb,
    login_request,
    password_pb,
    results_from_pb,
    secret_from_pb,
    spec_to_pb,
    stored_login,
    time_of,
)
from testhide.common.tls import CHANNEL_OPTIONS
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc

T = TypeVar("T")
V = TypeVar("V")

# Refresh this long before the access token expires, so a call never races it.
REFRESH_MARGIN_S = 60

# gRPC's own reconnect backoff grows to 2 minutes, and a call made meanwhile
# fails at once: a follower would find the control plane "down" for minutes
# after it came back. Keep the channel's backoff shorter than the follower's.
_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

_HINTS = {grpc.StatusCode.UNAUTHENTICATED: "run 'testhide login' again"}

# How long a server that is not the last one to try may take to connect before
# the next one is tried. A refused port or a failed handshake fails at once.
CONNECT_WITHIN_S = 10.0


# Errors ---------------------------------------------------------------------------------------------------


def _failure(error: grpc.aio.AioRpcError, server: str, channel: grpc.aio.Channel) -> RpcFailed:
    """The one mapping from a gRPC error to the CLI's: a call that found no
    connection is `Unreachable`; an answer keeps the server's message and code."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and channel.get_state() != grpc.ChannelConnectivity.READY:
        return Unreachable(server, details)
    return RpcFailed(code.name, details, _HINTS.get(code, ""))


# Channels -------------------------------------------------------------------------------------------------


def _new_channel(login: Login, server: str) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=login.ca_pem.encode() if login.ca_pem else None
    )
    return grpc.aio.secure_channel(server, credentials, options=_OPTIONS)


async def _connects(channel: grpc.aio.Channel, within_s: float) -> bool:
    """Whether ``channel`` connects (TCP and TLS) before it fails or ``within_s``
    passes. It sends no request: a server passed over has been sent nothing."""
    try:
        async with asyncio.timeout(within_s):
            state = channel.get_state(try_to_connect=True)
            while state != grpc.ChannelConnectivity.READY:
                if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


# The client -----------------------------------------------------------------------------------------------


class ControlPlaneClient(AdminCalls):
    """The Jobs and Secrets services as the signed-in user, on a channel to one
    of the login's servers. ``connected`` turns true once the control plane
    has answered a call.

    The first call goes to the first server, in the saved order, that
    connects: one that does not is passed over before anything is sent to it
    (the last one left is not probed: its own error is the call's). A call
    that fails UNAVAILABLE is not sent again here, since it may have reached
    the server (a job submitted twice is two jobs), but the channel is
    dropped: the next call, such as a follower's reconnection, starts at the
    next server."""

    def __init__(self, login: Login) -> None:
        self._login = login
        self._channel: grpc.aio.Channel | None = None
        self._server = login.servers[0]
        self._passed_over: tuple[str, ...] = ()
        """Servers that did not connect before ``_server`` did."""
        self._start = 0
        """Where in ``login.servers`` the next channel starts looking."""
        self.connected = False

    @property
    def server(self) -> str:
        """The server calls go to."""
        return self._server

    @property
    def _tried(self) -> str:
        return ", ".join((*self._passed_over, self._server))

    async def _open(self) -> grpc.aio.Channel:
        """The channel calls go on; a new one when there is none (yet, or any more)."""
        if self._channel is not None:
            return self._channel
        servers = self._login.servers
        order = [servers[(self._start + i) % len(servers)] for i in range(len(servers))]
        passed_over: list[str] = []
        for server in order[:-1]:
            channel = _new_channel(self._login, server)
            if await _connects(channel, CONNECT_WITHIN_S):
                break
            await channel.close()
            passed_over.append(server)
        else:
            server = order[-1]
            channel = _new_channel(self._login, server)
        self._channel, self._server, self._passed_over = channel, server, tuple(passed_over)
        return channel

    async def _failed(self, error: grpc.aio.AioRpcError, channel: grpc.aio.Channel) -> RpcFailed:
        """The CLI's error for ``error``; after UNAVAILABLE, the channel is dropped."""
        failure = _failure(error, self._tried, channel)
        if isinstance(failure, Unreachable):
            from testhide.cli.diagnose import diagnosed  # only when a call found no connection

            failure = await diagnosed(failure, self._server, self._login.ca_pem)
        if error.code() == grpc.StatusCode.UNAVAILABLE and self._channel is channel:
            self._channel = None
            self._start = (self._login.servers.index(self._server) + 1) % len(self._login.servers)
            await channel.close()
        return failure

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def _jobs(self) -> jobs_pb2_grpc.JobsAsyncStub:
        assert self._channel is not None, "opened by _call or _bearer"
        return jobs_pb2_grpc.JobsStub(self._channel)

    @property
    def _secrets(self) -> jobs_pb2_grpc.SecretsAsyncStub:
        assert self._channel is not None, "opened by _call or _bearer"
        return jobs_pb2_grpc.SecretsStub(self._channel)

    async def _call(self, rpc: Callable[[], Awaitable[T]]) -> T:
        """Open the channel if need be, then make the call ``rpc`` (once)."""
        channel = await self._open()
        try:
            answer = await rpc()
        except grpc.aio.AioRpcError as error:
            raise await self._failed(error, channel) from error
        self.connected = True
        return answer

    async def log_in(self, credential: ApiKeyLogin | PasswordLogin) -> Login:
        """Trade a password or API key for a session; nothing is stored here."""
        request = login_request(credential)
        pair = await self._call(lambda: self._auth.Login(request, timeout=30))
        return stored_login(pair, self._login)

    async def enroll_mfa(self, credential: PasswordLogin) -> MfaEnrollment:
        """A new pending TOTP factor (``credential.totp_code``: the current factor's, to replace it)."""
        request = auth_pb2.EnrollMfaRequest(password=password_pb(credential), totp_code=credential.totp_code)
        response = await self._call(lambda: self._auth.EnrollMfa(request, timeout=30))
        return MfaEnrollment(response.otpauth_uri, response.secret, tuple(response.recovery_codes))

    async def confirm_mfa(self, credential: PasswordLogin) -> None:
        """Make the pending factor the user's, with a code from it (``credential.totp_code``)."""
        request = auth_pb2.ConfirmMfaRequest(password=password_pb(credential), totp_code=credential.totp_code)
        await self._call(lambda: self._auth.ConfirmMfa(request, timeout=30))

    @property
    def _auth(self) -> auth_pb2_grpc.AuthAsyncStub:
        assert self._channel is not None, "opened by _call"
        return auth_pb2_grpc.AuthStub(self._channel)

    async def _bearer(self) -> tuple[tuple[str, str], ...]:
        """The session's access token, refreshed (and the rotated refresh token
        saved) when it is about to expire: a follower may reconnect hours later."""
        if self._login.access_expires_at - time.time() <= REFRESH_MARGIN_S:
            request = auth_pb2.RefreshRequest(refresh_token=self._login.refresh_token)
            pair = await self._call(lambda: self._auth.Refresh(request, timeout=30))
            self._login = stored_login(pair, self._login)
            self._login.save()
        return (("authorization", f"Bearer {self._login.access_token}"),)

    # session
    async def who_am_i(self) -> Identity:
        metadata = await self._bearer()
        request = auth_pb2.WhoAmIRequest()
        answer = await self._call(lambda: self._session.WhoAmI(request, metadata=metadata, timeout=30))
        return Identity(
            org=answer.org,
            principal_kind=answer.principal_kind,
            principal_id=answer.principal_id,
            scopes=tuple(answer.scopes),
            access_expires_at=time_of(answer, "access_expires_at"),
            amr=tuple(answer.amr),
            server_version=answer.server_version,
        )

    async def log_out(self) -> None:
        """End the session on the server: its refresh token's whole family is revoked."""
        request = auth_pb2.RefreshRequest(refresh_token=self._login.refresh_token)
        await self._call(lambda: self._auth.Logout(request, timeout=30))

    async def recent_job_ids(self, limit: int) -> list[tuple[str, str]]:
        metadata = await self._bearer()
        request = jobs_pb2.ListJobsRequest(page_size=limit)
        response = await self._call(lambda: self._jobs.List(request, metadata=metadata, timeout=2))
        return [(job.id, job_status_from_pb(job.status).value) for job in response.jobs]

    @property
    def _session(self) -> auth_pb2_grpc.SessionAsyncStub:
        assert self._channel is not None, "opened by _call or _bearer"
        return auth_pb2_grpc.SessionStub(self._channel)

    # jobs
    async def submit(self, request: JobRequest) -> Job:
        message = jobs_pb2.SubmitJobRequest(spec=spec_to_pb(request))
        metadata = await self._bearer()
        response = await self._call(lambda: self._jobs.Submit(message, metadata=metadata, timeout=60))
        return job_from_pb(response.job)

    async def get(self, job_id: str) -> Job:
        metadata = await self._bearer()
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return job_from_pb(await self._call(lambda: self._jobs.Get(request, metadata=metadata, timeout=30)))

    async def list_jobs(self, query: JobQuery, limit: int, page_token: str = "") -> tuple[list[Job], str]:
        """A page of up to ``limit`` jobs matching ``query``, newest first, and the
        next page's token ("" after the last page)."""
        metadata = await self._bearer()
        request = list_request_pb(query, limit, page_token)
        response = await self._call(lambda: self._jobs.List(request, metadata=metadata, timeout=30))
        return [job_from_pb(job) for job in response.jobs], response.next_page_token

    async def cancel(self, job_id: str) -> Job:
        metadata = await self._bearer()
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return job_from_pb(
            await self._call(lambda: self._jobs.Cancel(request, metadata=metadata, timeout=30))
        )

    async def upload_workspace(self, chunks: AsyncIterator[bytes]) -> str:
        """Uploads a packed workspace; its id, for `JobRequest.workspace_id`."""

        async def messages() -> AsyncIterator[jobs_pb2.DataChunk]:
            async for chunk in chunks:
                yield jobs_pb2.DataChunk(data=chunk)

        metadata = await self._bearer()
        response = await self._call(
            lambda: self._jobs.UploadWorkspace(messages(), metadata=metadata, timeout=3600)
        )
        return response.workspace_id

    async def artifacts(self, job_id: str) -> list[Artifact]:
        metadata = await self._bearer()
        request = jobs_pb2.JobRef(job_id=job_id)
        response = await self._call(lambda: self._jobs.ListArtifacts(request, metadata=metadata, timeout=30))
        return [artifact_from_pb(a) for a in response.artifacts]

    async def download(self, job_id: str, path: str) -> AsyncIterator[bytes]:
        request = jobs_pb2.DownloadArtifactRequest(job_id=job_id, path=path)
        metadata = await self._bearer()
        channel = await self._open()
        call = self._jobs.DownloadArtifact(request, metadata=metadata)
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as error:
            raise await self._failed(error, channel) from error
        finally:
            call.cancel()

    async def test_results(self, job_id: str) -> TestResults:
        metadata = await self._bearer()
        request = jobs_pb2.JobRef(job_id=job_id)
        response = await self._call(lambda: self._jobs.GetTestResults(request, metadata=metadata, timeout=30))
        return results_from_pb(response)

    async def job_record(self, job_id: str) -> JobRecord:
        """The job as `get` returns it, with what `testhide verify` needs beyond the model."""
        metadata = await self._bearer()
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        job = await self._call(lambda: self._jobs.Get(request, metadata=metadata, timeout=30))
        return job_record_from_pb(job)

    async def evidence(self, job_id: str, in_toto: bool = False) -> JobEvidence | str:
        """The job's signed statement and its certificates (with ``in_toto``, its SLSA provenance
        too); if it has none, the server's reason."""
        metadata = await self._bearer()
        request = jobs_pb2.GetEvidenceRequest(job_id=job_id, in_toto=in_toto)
        try:
            answer = await self._call(lambda: self._jobs.GetEvidence(request, metadata=metadata, timeout=30))
        except RpcFailed as failure:
            if failure.code == grpc.StatusCode.FAILED_PRECONDITION.name:
                return failure.details
            raise
        return evidence_from_pb(answer)

    async def log_batches(self, job_id: str) -> list[LogBatch]:
        """The job's stored log batches with their chain links, in the order the server sends them."""
        metadata = await self._bearer()
        request = jobs_pb2.GetLogBatchesRequest(job_id=job_id)
        channel = await self._open()
        call = self._jobs.GetLogBatches(request, metadata=metadata, timeout=600)
        try:
            return [log_batch_from_pb(batch) async for batch in call]
        except grpc.aio.AioRpcError as error:
            raise await self._failed(error, channel) from error
        finally:
            call.cancel()

    async def follow(
        self, job_id: str, offset: int, follow: bool
    ) -> AsyncIterator[LogChunk | Job | JobUpdate]:
        """The log from ``offset``; with ``follow``, until the job has ended,
        then the finished job, and the job whenever its status or reason
        changed (`JobUpdate`). A stream that was open (the control plane sent
        its headers or a message) and breaks off raises `Disconnected`."""
        request = jobs_pb2.FollowLogsRequest(job_id=job_id, from_offset=offset, follow=follow)
        metadata = await self._bearer()
        channel = await self._open()
        call = self._jobs.FollowLogs(request, metadata=metadata)
        opened = False
        try:
            await call.initial_metadata()  # returns at once on a failed call, with none
            opened = not call.done()
            self.connected = self.connected or opened
            async for response in call:
                opened = self.connected = True
                if response.HasField("finished"):
                    yield job_from_pb(response.finished)
                elif response.HasField("update"):
                    yield JobUpdate(job_from_pb(response.update))
                elif response.HasField("chunk"):
                    yield chunk_from_pb(response.chunk)
        except grpc.aio.AioRpcError as error:
            failure = await self._failed(error, channel)
            if opened and error.code() == grpc.StatusCode.UNAVAILABLE:
                raise Disconnected(self.server, error.details() or "") from error
            raise failure from error
        finally:
            call.cancel()

    # secrets
    async def set_secret(self, name: str, value: bytes) -> Secret:
        metadata = await self._bearer()
        request = jobs_pb2.SetSecretRequest(name=name, value=value)
        return secret_from_pb(
            await self._call(lambda: self._secrets.Set(request, metadata=metadata, timeout=30))
        )

    async def secrets(self) -> list[Secret]:
        metadata = await self._bearer()
        request = jobs_pb2.ListSecretsRequest()
        response = await self._call(lambda: self._secrets.List(request, metadata=metadata, timeout=30))
        return [secret_from_pb(s) for s in response.secrets]

    async def delete_secret(self, name: str) -> Secret:
        metadata = await self._bearer()
        request = jobs_pb2.DeleteSecretRequest(name=name)
        return secret_from_pb(
            await self._call(lambda: self._secrets.Delete(request, metadata=metadata, timeout=30))
        )


@asynccontextmanager
async def connect(login: Login) -> AsyncIterator[ControlPlaneClient]:
    client = ControlPlaneClient(login)
    try:
        yield client
    finally:
        await client.close()


async def log_out(login: Login) -> None:
    """End ``login``'s session on the control plane (its refresh token's family is revoked)."""
    async with connect(login) as client:
        await client.log_out()


async def recent_job_ids(login: Login, limit: int) -> list[tuple[str, str]]:
    """The ids of the organisation's newest jobs with their status, for shell completion."""
    async with connect(login) as client:
        return await client.recent_job_ids(limit)


async def log_in(login: Login, credential: ApiKeyLogin | PasswordLogin) -> Login:
    """Trade a password or API key for a session at the first of the servers
    that connects; nothing is stored here."""
    async with connect(login) as client:
        return await client.log_in(credential)
