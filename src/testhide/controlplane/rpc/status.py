"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
import structlog

from testhide.controlplane import errors

log = structlog.get_logger("testhide.rpc")

STATUS: list[tuple[type[errors.ControlPlaneError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.ConfigError, grpc.StatusCode.INTERNAL),
    (errors.DataDirError, grpc.StatusCode.INTERNAL),
]


# The longest error text sent, in UTF-8 bytes. grpc percent-encodes it in the grpc-message
# trailer (up to three bytes each), and a client refuses trailers beyond 8 to 16 KiB with
# RESOURCE_EXHAUSTED "Stream removed", hiding the real status.
MAX_DETAILS_BYTES = 1024


def bounded(details: str) -> str:
    """``details`` cut to MAX_DETAILS_BYTES: a backstop behind ``errors.quoted``, for a
    message that names many inputs (a list of missing secrets) or an unexpected one."""
    encoded = details.encode()
    if len(encoded) <= MAX_DETAILS_BYTES:
        return details
    return encoded[: MAX_DETAILS_BYTES - 20].decode(errors="ignore") + " ... (truncated)"


def code_for(exc: errors.ControlPlaneError) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: errors.ControlPlaneError) -> None:
    """Abort with the error's status; a rate limit tells the client when to retry."""
    if isinstance(exc, errors.RateLimited):
        retry = max(1, round(exc.retry_after_s))
        context.set_trailing_metadata((("retry-after", str(retry)),))
        await context.abort(code_for(exc), f"{bounded(str(exc))} (retry in {retry} s)")
    await context.abort(code_for(exc), bounded(str(exc)))


F = TypeVar("F", bound=Callable[..., Any])


def mapped(method: F) -> F:
    """Turn domain errors raised by a unary or server-streaming handler into
    a gRPC status with the error's message; anything else is INTERNAL and
    logged, without leaking its text to the caller."""

    async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, errors.ControlPlaneError):
            await abort_with(context, exc)
        log.exception("rpc_failed", method=method.__name__)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    if inspect.isasyncgenfunction(method):

        @wraps(method)
        async def streaming(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)

        return streaming  # type: ignore[return-value]

    @wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return unary  # type: ignore[return-value]
