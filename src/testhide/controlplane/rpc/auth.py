"""Authentication and authorisation of every API-port RPC, in one place. A
method missing from the table is refused: new RPCs fail closed."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import grpc

from testhide.controlplane.auth.limits import Limiter
from testhide.controlplane.auth.principal import Principal
from testhide.controlplane.auth.sessions import Sessions
from testhide.controlplane.errors import ControlPlaneError, PermissionDenied, RateLimited
from testhide.controlplane.rpc.status import abort_with

if TYPE_CHECKING:
    from testhide.controlplane.metrics import ControlPlaneMetrics

PUBLIC = frozenset(
    {
        "/testhide.v1.Enrollment/Enroll",  # the token in the request is the credential
        "/testhide.v1.Auth/Login",
        "/testhide.v1.Auth/Refresh",
        "/testhide.v1.Auth/Logout",
        "/testhide.v1.Auth/GetSigningKeys",
        "/testhide.v1.Auth/EnrollMfa",  # the password in the request (and a code) is the credential
        "/testhide.v1.Auth/ConfirmMfa",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        # The schema of the API (what grpcurl needs), public like the protos it comes from.
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
)
# Any valid access token, whatever its scopes: what a credential may learn about itself.
AUTHENTICATED_ONLY = frozenset({"/testhide.v1.Session/WhoAmI"})
SCOPE_OF_METHOD = {
    "/testhide.v1.Jobs/Submit": "jobs:write",
    "/testhide.v1.Jobs/Cancel": "jobs:write",
    "/testhide.v1.Jobs/Get": "jobs:read",
    "/testhide.v1.Jobs/List": "jobs:read",
    "/testhide.v1.Jobs/FollowLogs": "jobs:read",
    "/testhide.v1.Jobs/UploadWorkspace": "jobs:write",
    "/testhide.v1.Jobs/ListArtifacts": "jobs:read",
    "/testhide.v1.Jobs/DownloadArtifact": "jobs:read",
    "/testhide.v1.Jobs/GetTestResults": "jobs:read",
    "/testhide.v1.Jobs/GetEvidence": "jobs:read",
    "/testhide.v1.Jobs/GetLogBatches": "jobs:read",
    "/testhide.v1.Secrets/Set": "secrets:write",
    "/testhide.v1.Secrets/Delete": "secrets:write",
    "/testhide.v1.Secrets/List": "jobs:read",
    "/testhide.v1.Jobs/ListPools": "jobs:read",
    # agents:admin: enrollment tokens, agents, pools (operations/agents.py)
    **{
        f"/testhide.v1.Admin/{method}": "agents:admin"
        for method in (
            "CreateEnrollmentToken",
            "ListEnrollmentTokens",
            "RevokeEnrollmentToken",
            "ListAgents",
            "RevokeAgent",
            "CreatePool",
            "SetPoolPolicy",
            "PausePool",
            "ResumePool",
            "IncidentAgent",
        )
    },
    # org:admin: who may call the API, and the secrets with their last use (operations/access.py)
    **{
        f"/testhide.v1.Admin/{method}": "org:admin"
        for method in (
            "CreateApiKey",
            "ListApiKeys",
            "RevokeApiKey",
            "CreateUser",
            "ListUsers",
            "RevokeUser",
            "ListSecrets",
        )
    },
}

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

# What a handler's behaviour really is on a grpc.aio server. grpc's stubs share one
# RpcMethodHandler between the two servers and describe the synchronous one.
AioUnaryBehaviour: TypeAlias = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
AioStreamingBehaviour: TypeAlias = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def current_principal() -> Principal:
    """The caller of the RPC being served; set only after authentication."""
    return _principal.get()


def _rebuild(
    handler: grpc.RpcMethodHandler[RequestT, ResponseT], behaviour: Callable[..., Any]
) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
    """A handler of the same shape as ``handler`` that runs ``behaviour``."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def client_address(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``: limits apply per address, not per port."""
    return context.peer().rsplit(":", 1)[0]


class ApiAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every API-port call passes here: a per-address rate limit for all, and
    for all but the public methods an access token, its scope (any, for the
    authenticated-only ones) and a per-principal rate limit. Methods missing from the table are refused. The
    limits are this process's or, with replicas, the database's (``auth/limits.py``)."""

    def __init__(
        self,
        sessions: Sessions,
        per_address: Limiter,
        per_principal: Limiter,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._per_address = per_address
        self._per_principal = per_principal

    async def _admit(
        self, method: str, metadata: dict[str, str], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal | None:
        wait = await self._per_address.acquire(client_address(context))
        if wait:
            raise RateLimited("too many requests from this address", retry_after_s=wait)
        if method in PUBLIC:
            return None
        scope = SCOPE_OF_METHOD.get(method)
        if scope is None and method not in AUTHENTICATED_ONLY:
            raise PermissionDenied(f"method {method} is not open to API callers")
        principal = await self._sessions.authenticate(metadata.get("authorization"), context.peer())
        if scope is not None:
            principal.require(scope)
        wait = await self._per_principal.acquire(f"{principal.kind}:{principal.id}")
        if wait:
            raise RateLimited("too many requests for this credential", retry_after_s=wait)
        return principal

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        inner = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        admit, metrics = self._admit, self._metrics

        def ended(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            assert metrics is not None
            metrics.api_call_ended(method, context.code())

        async def admitted(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if metrics is not None:  # every call's status as it ends: refusals, rate limits
                # grpc's stub wants its own (nominal) callback class for this plain callable.
                context.add_done_callback(ended)  # type: ignore[arg-type]
            try:
                principal = await admit(method, metadata, context)
            except ControlPlaneError as exc:
                await abort_with(context, exc)
            if principal is not None:
                _principal.set(principal)

        # A coroutine may serve a response stream too, writing through its context (Health/Watch).
        if not handler.response_streaming or not inspect.isasyncgenfunction(inner):
            respond = cast(AioUnaryBehaviour, inner)

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await admitted(context)
                return await respond(request, context)

            return _rebuild(handler, unary)

        respond_each = cast(AioStreamingBehaviour, inner)

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await admitted(context)
            async for item in respond_each(request, context):
                yield item

        return _rebuild(handler, stream)
