"""Authentication and authorisation of every API-port RPC, in one place. A
method missing from the table is refused: new RPCs fail closed."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from controlplane.auth.apikeys import ApiKeyAuthenticator
from controlplane.auth.principal import Principal
from controlplane.errors import ControlPlaneError, PermissionDenied
from controlplane.rpc.status import code_for

PUBLIC = frozenset({
    "/testhide.v1.Enrollment/Enroll",  # the token in the request is the credential
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
SCOPE_OF_METHOD = {
    "/testhide.v1.Jobs/Submit": "jobs:write",
    "/testhide.v1.Jobs/Cancel": "jobs:write",
    "/testhide.v1.Jobs/Get": "jobs:read",
    "/testhide.v1.Jobs/List": "jobs:read",
    "/testhide.v1.Jobs/FollowLogs": "jobs:read",
}

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The caller of the RPC being served; set only after authentication."""
    return _principal.get()


def _refusal(handler: grpc.RpcMethodHandler, exc: ControlPlaneError) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code_for(exc), str(exc))

    factory = grpc.unary_stream_rpc_method_handler if handler.response_streaming else \
        grpc.unary_unary_rpc_method_handler
    return factory(refuse, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        inner: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _principal.set(principal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    stream_inner = handler.unary_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _principal.set(principal)
        async for item in stream_inner(request, context):
            yield item

    return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)


class ApiAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: ApiKeyAuthenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in PUBLIC:
            return handler
        try:
            scope = SCOPE_OF_METHOD.get(details.method)
            if scope is None:
                raise PermissionDenied(f"method {details.method} is not open to API callers")
            metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
            principal = await self._authenticator.authenticate(metadata.get("authorization"))
            principal.require(scope)
        except ControlPlaneError as exc:
            return _refusal(handler, exc)
        return _with_principal(handler, principal)
