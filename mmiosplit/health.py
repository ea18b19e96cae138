"""grpc.health.v1 for services that drain: NOT_SERVING at once, and Watch streams that then end.

grpc_health's servicers report NOT_SERVING to their Watch streams but keep those streams open, and an open
stream holds a server's graceful stop until its grace period runs out: one load balancer watching health
would make every drain last the whole grace. These subclasses end each Watch stream right after it has
reported NOT_SERVING during a drain; Check is grpc_health's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DrainingHealth(health.HealthServicer):
    """The synchronous servicer (the vcpu service's thread-pool server). Its Watch streams are blocking iterators
    (one pool thread each), not grpc_health's non-blocking callbacks, which only the client can end."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=False)
        self.draining = False

    def drain(self, services: Iterable[str]) -> None:
        """Report NOT_SERVING for ``services`` and end every Watch stream once it has said so."""
        self.draining = True
        for name in services:
            self.set(name, NOT_SERVING)

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable[..., Any] | None = None,
              ) -> Iterator[health_pb2.HealthCheckResponse] | None:
        watcher = super().Watch(request, context, send_response_callback)
        return None if watcher is None else self._until_drained(watcher)

    def _until_drained(self, watcher: Iterator[health_pb2.HealthCheckResponse]) -> Iterator[
            health_pb2.HealthCheckResponse]:
        for response in watcher:
            yield response
            if self.draining and response.status == NOT_SERVING:
                return


class DrainingAsyncHealth(health_async.HealthServicer):
    """The asyncio servicer (the device service's grpc.aio server)."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False
        self._changed = asyncio.Event()
        self._status: dict[str, int] = {}

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        await super().set(service, status)
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def drain(self, services: Iterable[str]) -> None:
        """Report NOT_SERVING for ``services`` and end every Watch stream once it has said so."""
        self.draining = True
        for name in services:
            await self.set(name, NOT_SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Each change of the service's status, from its status now (SERVICE_UNKNOWN for a name never set)."""
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.draining and status == NOT_SERVING:
                return
            await changed.wait()
