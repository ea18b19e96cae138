"""A device service that breaks the protocol on purpose, served for real over a UNIX socket.

It stands in for a buggy third-party device service: the vcpu service must turn each misbehaviour
into a clear VM error event and stay up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import PROTOCOL_VERSION

BASE = 0x0A00_0000


#: Modes of a minimal service: Describe and ExitStream only, no optional feature ("minimal" answers every access,
#: "minimal-hang" never does, "minimal-lines" also declares an interrupt line, which needs Watch).
MINIMAL = ("minimal", "minimal-hang", "minimal-lines")


class RogueDevice(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.release = threading.Event()
        self.features = [] if mode in MINIMAL else ["watch"]
        self.cancels = 0  # Cancel messages received
        self.watches = 0  # Watch calls received

    def Describe(self, request: device_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> device_pb2.DescribeResponse:
        # Watch (unless minimal), and none of the other optional parts (sessions, cancel).
        resp = device_pb2.DescribeResponse(service_name=f"rogue-{self.mode}", protocol_version=PROTOCOL_VERSION,
                                           features=self.features)
        dev = resp.devices.add(name="rogue0", type="rogue")
        dev.regions.add(name="regs", base=BASE, size=0x1000, kind=device_pb2.REGION_KIND_MMIO,
                        access_sizes=[1, 2, 4, 8])
        if self.mode not in ("minimal", "minimal-hang"):
            dev.lines.add(index=0, name="irq", trigger=device_pb2.LINE_TRIGGER_LEVEL)
        return resp

    def Watch(self, request_iterator: Iterator[device_pb2.WatchRequest],
              context: grpc.ServicerContext) -> Iterator[device_pb2.WatchResponse]:
        self.watches += 1
        if self.mode in MINIMAL:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        next(request_iterator, None)
        if self.mode != "storm":
            self.release.wait(30)
            return
        # An interrupt storm: the line toggles as fast as the stream carries it, with garbage mixed in (a line
        # the device never declared, a device that does not exist, generations going backwards).
        for n in range(1, 20001):
            levels = [device_pb2.LineLevel(device="rogue0", index=0, level=bool(n % 2))]
            if n % 97 == 0:
                levels.append(device_pb2.LineLevel(device="rogue0", index=7, level=True))
            if n % 89 == 0:
                levels.append(device_pb2.LineLevel(device="nobody", index=0, level=True))
            yield device_pb2.WatchResponse(lines=device_pb2.LineUpdate(
                generation=n if n % 101 else 1, levels=levels, raised_ns=n))
            if self.release.is_set():
                return
        self.release.wait(30)

    def ExitStream(self, request_iterator: Iterator[device_pb2.ExitStreamRequest],
                   context: grpc.ServicerContext) -> Iterator[device_pb2.ExitStreamResponse]:
        for req in request_iterator:
            if req.WhichOneof("body") == "hello":
                yield device_pb2.ExitStreamResponse(
                    seq=req.seq, welcome=device_pb2.StreamWelcome(protocol_version=PROTOCOL_VERSION,
                                                                 features=self.features))
                continue
            if req.WhichOneof("body") == "cancel":
                self.cancels += 1
                continue
            ok = device_pb2.COMPLETION_STATUS_OK
            if self.mode == "short":
                yield device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(status=ok,
                                                                                                  data=b"\x01"))
            elif self.mode == "badseq":
                yield device_pb2.ExitStreamResponse(seq=req.seq + 7, completion=device_pb2.Completion(
                    status=ok, data=bytes(req.exit.length)))
            elif self.mode == "error":
                yield device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(
                    status=device_pb2.COMPLETION_STATUS_DEVICE_ERROR, error="rogue0: register 0x0 is on fire"))
            elif self.mode in ("hang", "minimal-hang"):
                self.release.wait(30)
                return
            elif self.mode == "badstatus":
                yield device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(status=99))
            elif self.mode == "die":
                context.abort(grpc.StatusCode.INTERNAL, "rogue device crashed")
            elif self.mode == "empty":  # a response with a number and nothing in it
                yield device_pb2.ExitStreamResponse(seq=req.seq)
            elif self.mode == "unsolicited":  # a completion for a request never sent, before the real one
                yield device_pb2.ExitStreamResponse(seq=req.seq + 1, completion=device_pb2.Completion(status=ok))
                yield device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(
                    status=ok, data=bytes(req.exit.length)))
            elif self.mode in ("storm", "minimal"):
                yield device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(
                    status=ok, data=bytes(req.exit.length)))
            elif self.mode == "twice":  # every reply comes twice (a duplicated message)
                reply = device_pb2.ExitStreamResponse(seq=req.seq, completion=device_pb2.Completion(
                    status=ok, data=(0x5A).to_bytes(req.exit.length or 4, "little")))
                yield reply
                yield reply

    def Reset(self, request: device_pb2.ResetRequest, context: grpc.ServicerContext) -> device_pb2.ResetResponse:
        return device_pb2.ResetResponse()


class RogueServer:
    def __init__(self, mode: str, workdir: Path) -> None:
        self.servicer = RogueDevice(mode)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        device_pb2_grpc.add_DeviceServiceServicer_to_server(self.servicer, self.server)
        self.address = f"unix:{workdir / f'rogue-{mode}-{time.monotonic_ns()}.sock'}"
        self.server.add_insecure_port(self.address)
        self.server.start()

    def stop(self) -> None:
        self.servicer.release.set()
        self.server.stop(0)
