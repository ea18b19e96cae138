"""The recording proxy ``mmiosplit run --record`` puts between the vcpu service and each device service.

Why a proxy and not a hook in the vcpu service: it works whatever the vcpu service is (started by ``run``, or
remote, or in a container: it is only given the proxy's address instead of the device service's), it records the
exact bytes that crossed the wire (it never parses a message it forwards), and nothing is added to the vCPU's own
code path. It forwards every RPC of ``DeviceService`` unchanged (sessions, resume, Cancel, the Watch stream with its
DMA answers, Console, ReadMirror, Reset), and a stream's end with its status, both ways.

Ordering: a message is recorded when the proxy receives it, before it forwards it, under one lock. So a message the
service sent before it received some request is recorded before that request, which is what lets a replay wait for
every recorded answer before it sends the next request (``replay``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.v1 import device_pb2
from mmiosplit.wire import PROTOCOL_VERSION
from mmiosplit_cli.recording.format import FROM_SERVICE, METHODS, TO_SERVICE, RecordedService, Recorder

SERVICE = "mmiosplit.v1.DeviceService"


class ProxyError(RuntimeError):
    """A device service could not be described, or the proxy could not listen."""


def _identity(data: bytes) -> bytes:
    return data


class _Forwarder(grpc.GenericRpcHandler):
    """Forwards each DeviceService RPC to one upstream channel and records both directions."""

    def __init__(self, index: int, channel: grpc.Channel, recorder: Recorder) -> None:
        self._index = index
        self._channel = channel
        self._recorder = recorder

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        prefix = f"/{SERVICE}/"
        if not method.startswith(prefix) or method[len(prefix):] not in METHODS:
            return None
        name = method[len(prefix):]
        _, _, request_streaming, response_streaming = METHODS[name]
        kwargs: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
        if request_streaming:
            return grpc.stream_stream_rpc_method_handler(self._streaming(method, name), **kwargs)
        if response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(method, name), **kwargs)
        return grpc.unary_unary_rpc_method_handler(self._unary(method, name), **kwargs)

    def _end(self, stream: int, context: grpc.ServicerContext, exc: grpc.RpcError) -> None:
        """The upstream call failed: record how, and end the downstream call the same way (unless the client
        itself went away, which is what cancelled the upstream call)."""
        code = exc.code()
        if not context.is_active():
            self._recorder.close_stream(stream, TO_SERVICE, grpc.StatusCode.CANCELLED.value[0], "client went away")
            return
        self._recorder.close_stream(stream, FROM_SERVICE, code.value[0], exc.details() or "")
        context.abort(code, exc.details() or "")

    def _streaming(self, method: str, name: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            stream = self._recorder.open_stream(self._index, name)

            def forward() -> Iterator[bytes]:
                try:
                    for request in requests:
                        self._recorder.message(stream, TO_SERVICE, request)
                        yield request
                except grpc.RpcError:
                    return  # the client's side ended (it cancelled): the upstream call is cancelled too

            call = self._channel.stream_stream(method, request_serializer=_identity,
                                               response_deserializer=_identity)(forward())
            yield from self._responses(stream, call, context)

        return handle

    def _responses(self, stream: int, call: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Record and pass on a streaming call's responses, then how it ended."""
        context.add_callback(call.cancel)
        try:
            for response in call:
                self._recorder.message(stream, FROM_SERVICE, response)
                yield response
        except grpc.RpcError as exc:
            self._end(stream, context, exc)
            return
        self._recorder.close_stream(stream, FROM_SERVICE, grpc.StatusCode.OK.value[0], "")

    def _unary_stream(self, method: str, name: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        def handle(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            stream = self._recorder.open_stream(self._index, name)
            self._recorder.message(stream, TO_SERVICE, request)
            call = self._channel.unary_stream(method, request_serializer=_identity,
                                              response_deserializer=_identity)(
                request, timeout=context.time_remaining())
            yield from self._responses(stream, call, context)

        return handle

    def _unary(self, method: str, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            stream = self._recorder.open_stream(self._index, name)
            self._recorder.message(stream, TO_SERVICE, request)
            try:
                response = self._channel.unary_unary(method, request_serializer=_identity,
                                                     response_deserializer=_identity)(
                    request, timeout=context.time_remaining())
            except grpc.RpcError as exc:
                self._end(stream, context, exc)
                return b""
            self._recorder.message(stream, FROM_SERVICE, response)
            self._recorder.close_stream(stream, FROM_SERVICE, grpc.StatusCode.OK.value[0], "")
            return bytes(response)

        return handle


class RecordingProxy:
    """One listening proxy per device service, all writing to one recording.

    ``listen``: where to listen, for a vcpu service on another machine or in a container ("HOST" or "HOST:PORT",
    a port of 0 or none picks free ports, one per service); None: UNIX sockets in a private folder (a vcpu service
    on this machine). ``addresses`` maps each device service's address to the proxy's, to give the vcpu service.
    """

    def __init__(self, path: str | Path, upstreams: list[str], listen: str | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        self._channels = [security.channel(address) for address in upstreams]
        described = []
        for address, channel in zip(upstreams, self._channels, strict=True):
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
                response = channel.unary_unary(f"/{SERVICE}/Describe",
                                               request_serializer=device_pb2.DescribeRequest.SerializeToString,
                                               response_deserializer=device_pb2.DescribeResponse.FromString)(
                    device_pb2.DescribeRequest(), timeout=connect_timeout_s)
            except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
                self._close_channels()
                why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else "not reachable"
                raise ProxyError(f"cannot record device service {address}: Describe failed ({why})") from None
            described.append(RecordedService(address, response))
        self.recorder = Recorder(path, described, PROTOCOL_VERSION)
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._servers: list[grpc.Server] = []
        self.addresses: dict[str, str] = {}
        try:
            for index, (address, channel) in enumerate(zip(upstreams, self._channels, strict=True)):
                self.addresses[address] = self._serve(index, channel, listen)
        except Exception:
            self.close()
            raise

    def _serve(self, index: int, channel: grpc.Channel, listen: str | None) -> str:
        # One thread per open call (each vCPU's exit stream, the Watch and Console streams, short unary calls); a
        # call beyond the pool would wait for a thread, so the pool is far larger than a VM's calls.
        server = security.server(futures.ThreadPoolExecutor(256, thread_name_prefix=f"record-{index}"))
        server.add_generic_rpc_handlers((_Forwarder(index, channel, self.recorder),))
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if listen is None:
            if self._workdir is None:
                self._workdir = tempfile.TemporaryDirectory(prefix="mmiosplit-record-")
            target = f"unix:{Path(self._workdir.name) / f'proxy-{index}.sock'}"
        else:
            host, sep, port = listen.rpartition(":")
            if not sep or not port.isdigit():
                host, port = listen, "0"
            target = f"{host}:{int(port) + index if int(port) else 0}"
        where = parse_address(target)
        try:
            bound = security.bind(server, where, security.current())
        except security.SecurityError as exc:
            raise ProxyError(f"--record-listen: {exc}") from None
        if bound == 0:
            raise ProxyError(f"the recording proxy cannot listen on {target}")
        server.start()
        self._servers.append(server)
        return target if where.is_unix else f"{where.host}:{bound}"

    def _close_channels(self) -> None:
        for channel in self._channels:
            channel.close()

    def close(self) -> None:
        """Stop forwarding (open streams are cancelled) and finish the file."""
        stopped = [server.stop(grace=1.0) for server in self._servers]
        for event in stopped:
            event.wait(5.0)
        self._servers.clear()
        self._close_channels()
        if hasattr(self, "recorder"):
            self.recorder.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

