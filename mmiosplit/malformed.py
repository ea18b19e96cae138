"""Requests that are not the message their method takes: INVALID_ARGUMENT naming the method and what was wrong.

Left to itself gRPC answers a request it cannot decode with INTERNAL "Exception deserializing request!" (the
thread-pool server) or UNKNOWN "Unexpected DecodeError" (grpc.aio): a client cannot tell its own mistake from a
service's fault. These interceptors, which ``mmiosplit.security`` installs on every server it builds, decode
each request themselves: a request that does not decode becomes a marker, and the handler is wrapped so the
call ends with INVALID_ARGUMENT as soon as it meets one (a streaming method at that message, after the ones
before it were served). Well-formed requests pay one type check each.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger("mmiosplit.wire")


class Malformed:
    """Stands in for a request that did not decode; ``error`` says why."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # whatever the message class raises: the request is not that message
            return Malformed(f"{type(exc).__name__}: {exc}")
    return parse


def _reason(method: str, bad: Malformed) -> str:
    return f"malformed request to {method}: it is not the message the method takes ({bad.error})"


def same_shape(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any],
               request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """A handler that runs ``behaviour`` with the streaming shape and serializers of ``handler`` (and its request
    deserializer unless another is given): what a server interceptor returns in a handler's place."""
    kwargs = {"request_deserializer": request_deserializer or handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    assert handler.request_deserializer is not None  # the interceptors pass only handlers that decode
    return same_shape(handler, behaviour, _tolerant(handler.request_deserializer))


def _inner(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    inner = (handler.stream_stream or handler.stream_unary if handler.request_streaming
             else handler.unary_stream or handler.unary_unary)
    assert inner is not None  # a handler has one behaviour
    return inner


class SyncMalformedCheck(grpc.ServerInterceptor):
    """For a thread-pool server."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(details.method)
        inner = _inner(handler)

        def refuse(bad: Malformed, context: grpc.ServicerContext) -> None:
            why = _reason(method, bad)
            log.warning("%s (from %s)", why, context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)

        if handler.request_streaming:
            def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def checked() -> Iterator[Any]:
                    for request in requests:
                        if type(request) is Malformed:
                            refuse(request, context)
                        yield request
                return inner(checked(), context)
            return _rebuild(handler, streaming)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if type(request) is Malformed:
                refuse(request, context)
            return inner(request, context)
        return _rebuild(handler, unary)


class AsyncMalformedCheck(grpc.aio.ServerInterceptor):
    """For a grpc.aio server."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(details.method)
        inner = _inner(handler)
        if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
            return handler  # a plain function on an aio server (a library's servicer): left as gRPC runs it

        async def refuse(bad: Malformed, context: grpc.aio.ServicerContext) -> None:
            why = _reason(method, bad)
            log.warning("%s (from %s)", why, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if type(request) is Malformed:
                    await refuse(request, context)
                yield request

        # grpc.aio tells a streaming handler by its kind of function: these must be async generators or coroutines.
        if handler.request_streaming and handler.response_streaming:
            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                                    ) -> AsyncIterator[Any]:
                async for response in inner(checked(requests, context), context):
                    yield response
            return _rebuild(handler, stream_stream)

        if handler.request_streaming:
            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await inner(checked(requests, context), context)
            return _rebuild(handler, stream_unary)

        if handler.response_streaming:
            async def unary_streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if type(request) is Malformed:
                    await refuse(request, context)
                async for response in inner(request, context):
                    yield response
            return _rebuild(handler, unary_streaming)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is Malformed:
                await refuse(request, context)
            return await inner(request, context)
        return _rebuild(handler, unary)
