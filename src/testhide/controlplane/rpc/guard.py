"""Two rules every RPC of both ports follows, applied where the servers are assembled
(``rpc/server.py``), so that an RPC added later cannot miss them:

* A request that cannot be decoded (corrupt protobuf, invalid UTF-8 in a string field)
  answers INVALID_ARGUMENT "the request could not be decoded" (a unary one before the
  servicer runs, a streamed one where the servicer reads it, answered by the catch-all). Left to grpc.aio, the
  DecodeError escapes before any of our code runs and reaches the caller as UNKNOWN
  "Unexpected <class 'google.protobuf.message.DecodeError'>: ...".
* An exception escaping a servicer never reaches the caller with its type or text: a
  domain error gets its status from the table in ``rpc/status.py``, a method a servicer
  leaves out UNIMPLEMENTED; anything else is logged and answers INTERNAL "internal error".

grpc.aio decodes a unary request before it calls the handler, and a streamed request
each time the servicer reads one (``context.read()`` or the request iterator, both in
the servicer's own task). So the handler's deserializer is wrapped: a unary request
that fails to decode becomes a marker, which the wrapped behaviour answers before the
servicer runs; a streamed one raises ``UndecodableRequest`` (an InvalidArgument) where
the servicer reads it, and the wrapped behaviour answers it when it escapes.

``guarded(auth)`` puts the catch-all outermost, so that it covers the auth interceptor
too, and the decoding rule innermost, so that a caller without credentials is asked
for them (and counted by the rate limits) whatever body it sent.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
import structlog

from testhide.controlplane.errors import ControlPlaneError, InvalidArgument
from testhide.controlplane.rpc.status import abort_with

log = structlog.get_logger("testhide.rpc")

DECODE_FAILED = "the request could not be decoded"
INTERNAL_ERROR = "internal error"
NOT_IMPLEMENTED = "method not implemented"

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
Context = grpc.aio.ServicerContext[Any, Any]
# How a failure is answered: it aborts the call (or re-raises).
Answer = Callable[[Context, BaseException], Awaitable[None]]


class UndecodableRequest(InvalidArgument):
    """A streamed request message that could not be decoded; raised where the servicer reads it."""

    def __init__(self) -> None:
        super().__init__(DECODE_FAILED)


class _Undecodable:
    """Stands in for a unary request that could not be decoded."""

    __slots__ = ()


UNDECODABLE = _Undecodable()


def tolerant(deserialize: Callable[[bytes], Any], streaming: bool) -> Callable[[bytes], Any]:
    """``deserialize`` that never lets a parser's exception reach grpc."""

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, and whatever else parsing hostile bytes may raise
            if streaming:
                raise UndecodableRequest() from None
            return UNDECODABLE

    return decode


_FACTORY: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _rebuilt(
    handler: grpc.RpcMethodHandler[RequestT, ResponseT],
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
    """A handler of the same shape as ``handler`` that runs ``behaviour``."""
    factory = _FACTORY[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _guarded_behaviour(
    inner: Callable[..., Any], answer: Answer, catch: type[BaseException], refuse_undecodable: bool
) -> Callable[..., Any]:
    """``inner`` of the same kind (an async generator of responses, or a coroutine that returns
    the response or writes through its context), with ``catch`` answered by ``answer``, and
    with ``refuse_undecodable`` an undecodable unary request answered before ``inner`` runs."""
    if inspect.isasyncgenfunction(inner):

        async def each(request: Any, context: Context) -> AsyncIterator[Any]:
            if refuse_undecodable and request is UNDECODABLE:
                await answer(context, UndecodableRequest())
            try:
                async with aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.BaseError:
                raise  # grpc's own: an abort, a finished call, a stopped server
            except catch as exc:
                await answer(context, exc)

        return each

    async def once(request: Any, context: Context) -> Any:
        if refuse_undecodable and request is UNDECODABLE:
            await answer(context, UndecodableRequest())
        try:
            response = inner(request, context)
            # Our servicers are coroutines; grpc's generated base class, for a method a
            # servicer leaves out (Health/List), is a plain function that raises.
            return await response if inspect.isawaitable(response) else response
        except grpc.aio.BaseError:
            raise
        except catch as exc:
            await answer(context, exc)

    return once


def _inner(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert behaviour is not None
    return behaviour


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Innermost: undecodable requests answer INVALID_ARGUMENT before the servicer sees them.
    Its continuation gives the servicer's own handler, the same object on every call of a
    method, so the guarded handler is made once per method, not once per call."""

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded

    @staticmethod
    def _guard(
        handler: grpc.RpcMethodHandler[RequestT, ResponseT], method: str
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
        assert handler.request_deserializer is not None
        decode = tolerant(handler.request_deserializer, handler.request_streaming)
        if handler.request_streaming:
            # A streamed request is decoded where the servicer reads it: the
            # UndecodableRequest raised there (an InvalidArgument) is answered by the
            # outermost rule. No wrapper of this rule's own: each open stream (ten
            # thousand agents' Connect) would hold one more coroutine for its life.
            return _rebuilt(handler, _inner(handler), decode)

        async def refuse(context: Context, exc: BaseException) -> None:
            log.info("request_undecodable", method=method, peer=context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, DECODE_FAILED)

        behaviour = _guarded_behaviour(_inner(handler), refuse, UndecodableRequest, True)
        return _rebuilt(handler, behaviour, decode)


class AnswerInternalErrors(grpc.aio.ServerInterceptor):
    """Outermost: whatever escapes a servicer (or an interceptor) is answered without its
    type or text: a domain error with its status, anything else INTERNAL, and logged."""

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

        async def answer(context: Context, exc: BaseException) -> None:
            if context.done():
                raise exc  # the status is already sent: nothing left to tell the caller
            if isinstance(exc, UndecodableRequest):  # a streamed request (RefuseUndecodable)
                log.info("request_undecodable", method=method, peer=context.peer())
            if isinstance(exc, ControlPlaneError):
                await abort_with(context, exc)
            if isinstance(exc, NotImplementedError):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_IMPLEMENTED)
            log.error("rpc_failed", method=method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)

        return _rebuilt(handler, _guarded_behaviour(_inner(handler), answer, Exception, False))


def guarded(*interceptors: grpc.aio.ServerInterceptor) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server is assembled with: ``interceptors`` between the two rules."""
    return [AnswerInternalErrors(), *interceptors, RefuseUndecodable()]
