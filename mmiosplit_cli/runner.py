"""The client side of a run: create the VM, wire its console to a terminal or pipes, wait for the end.

Shared by ``mmiosplit run``, ``mmiosplit demo`` and the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from mmiosplit import security
from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc

# Exit status of `mmiosplit run` by how the guest ended.
EXIT_STATUS = {
    vcpu_pb2.VM_EVENT_KIND_POWERED_OFF: 0,
    vcpu_pb2.VM_EVENT_KIND_ERROR: 1,
    vcpu_pb2.VM_EVENT_KIND_HALTED: 3,
    vcpu_pb2.VM_EVENT_KIND_BUDGET_EXHAUSTED: 4,
    vcpu_pb2.VM_EVENT_KIND_TIMED_OUT: 5,
    vcpu_pb2.VM_EVENT_KIND_STOPPED: 6,
}
EXIT_CONFIG_ERROR = 2


class RunError(RuntimeError):
    """The VM could not be created or started; the message is the service's own."""


@dataclass
class RunResult:
    vm_id: str
    final: vcpu_pb2.VmEvent
    events: list[vcpu_pb2.VmEvent]
    console: bytes
    stats: vcpu_pb2.GetStatsResponse
    regions: list[vcpu_pb2.MappedRegion] = field(default_factory=list)
    # With on_trace: how many exits the trace delivered, and why it ended early ("" when it did not).
    traced: int = 0
    trace_error: str = ""

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.final.kind, 1)


class ConsoleInput:
    """Bytes for the guest's UART; feed() from any thread, close() to end the input side."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def feed(self, data: bytes) -> None:
        self._q.put(data)

    def close(self) -> None:
        self._q.put(None)

    def requests(self, device: str, vm_id: str = "") -> Iterator[device_pb2.ConsoleRequest]:
        yield device_pb2.ConsoleRequest(device=device, vm_id=vm_id)
        while True:
            data = self._q.get()
            if data is None:
                return
            yield device_pb2.ConsoleRequest(input=data)


def channel(address: str) -> grpc.Channel:
    """A channel to a service with this process's credentials (``mmiosplit.security``)."""
    return security.channel(address)


def run_vm(
    vcpu_address: str,
    config: vcpu_pb2.VmConfig,
    *,
    console_device: str | None = None,
    console_out: Callable[[bytes], None] | None = None,
    console_in: ConsoleInput | None = None,
    on_event: Callable[[vcpu_pb2.VmEvent], None] | None = None,
    on_trace: Callable[[vcpu_pb2.ExitTrace], None] | None = None,
    stop_request: threading.Event | None = None,
    quiet_s: float = 0.2,
    trace_drain_s: float = 120.0,
) -> RunResult:
    """Run one VM to its final event and return what happened.

    The console of `console_device` (or the first UART the device services describe) is attached
    before the VM starts, so no output is missed; output keeps being collected until it has been quiet
    for `quiet_s` after the final event. With `on_trace`, the VM records its exits (`trace_exits` is
    set on a copy of `config`) and each one is passed to `on_trace`, in order, from a thread of its own;
    the trace is drained (for at most `trace_drain_s`) before the VM is deleted, since the service
    keeps it only as long as the VM.
    """
    if on_trace is not None and not config.trace_exits:
        traced_config = vcpu_pb2.VmConfig()
        traced_config.CopyFrom(config)
        traced_config.trace_exits = True
        config = traced_config
    vch = channel(vcpu_address)
    stub = vcpu_pb2_grpc.VcpuServiceStub(vch)
    try:
        created = stub.CreateVm(vcpu_pb2.CreateVmRequest(config=config), timeout=60)
    except grpc.RpcError as exc:
        vch.close()
        raise RunError(f"{exc.code().name}: {exc.details()}") from None
    vm_id = created.vm_id
    console = bytearray()
    last_output = [time.monotonic()]
    uart = next((r for r in created.regions if r.has_console and (console_device in (None, r.device))), None)
    if console_device and uart is None:
        stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id))
        vch.close()
        raise RunError(f"no UART named {console_device!r} among the devices")
    console_threads: list[threading.Thread] = []
    dch: grpc.Channel | None = None
    console_call = None
    if uart is not None:
        dch = channel(uart.device_service)
        inp = console_in or ConsoleInput()
        console_call = device_pb2_grpc.DeviceServiceStub(dch).Console(inp.requests(uart.device, vm_id))

        def read_console() -> None:
            try:
                for resp in console_call:
                    console.extend(resp.output)
                    last_output[0] = time.monotonic()
                    if console_out:
                        console_out(resp.output)
            except grpc.RpcError:
                pass

        t = threading.Thread(target=read_console, name="console", daemon=True)
        t.start()
        console_threads.append(t)
    events: list[vcpu_pb2.VmEvent] = []
    final: list[vcpu_pb2.VmEvent] = []
    done = threading.Event()

    def read_events() -> None:
        try:
            for resp in stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id)):
                events.append(resp.event)
                if on_event:
                    on_event(resp.event)
                if resp.event.kind in EXIT_STATUS:
                    final.append(resp.event)
                    break
        except grpc.RpcError as exc:
            final.append(vcpu_pb2.VmEvent(kind=vcpu_pb2.VM_EVENT_KIND_ERROR,
                                          reason=f"lost the vcpu service: {exc.code().name}"))
        done.set()

    threading.Thread(target=read_events, name="events", daemon=True).start()
    # The trace stream is opened before the VM starts, so it covers the run from its first exit.
    traced = [0]
    trace_error: list[str] = []
    trace_call = None
    trace_thread: threading.Thread | None = None
    if on_trace is not None:
        trace_call = stub.StreamExitTrace(vcpu_pb2.StreamExitTraceRequest(vm_id=vm_id))

        def read_trace() -> None:
            try:
                for resp in trace_call:
                    for record in resp.exits:
                        traced[0] += 1
                        on_trace(record)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    trace_error.append(f"{exc.code().name}: {exc.details()}")
            except Exception as exc:  # a failing callback must not take the run down with it
                trace_error.append(f"trace callback failed: {exc!r}")
                trace_call.cancel()

        trace_thread = threading.Thread(target=read_trace, name="trace", daemon=True)
        trace_thread.start()
    stats = vcpu_pb2.GetStatsResponse()
    try:
        try:
            stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
        except grpc.RpcError as exc:
            raise RunError(f"{exc.code().name}: {exc.details()}") from None
        while not done.wait(0.05):
            if stop_request is not None and stop_request.is_set():
                # Deleting the VM discards its statistics: pause it so they hold still, and keep them (the
                # KVM report of a guest that never powers off comes from here).
                with contextlib.suppress(grpc.RpcError):
                    stub.PauseVm(vcpu_pb2.PauseVmRequest(vm_id=vm_id), timeout=10)
                with contextlib.suppress(grpc.RpcError):
                    stats = stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id), timeout=10)
                stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id), timeout=30)
                done.wait(10)
                break
        if trace_thread is not None:
            # The service closes the trace before it sends the final event; what is left is the backlog
            # (a user who asked to stop does not wait long for it).
            drain_s = min(trace_drain_s, 5.0) if stop_request is not None and stop_request.is_set() else trace_drain_s
            trace_thread.join(drain_s)
            if trace_thread.is_alive():
                trace_error.append(f"the trace was still being delivered after {drain_s:g} s; cut short")
        # Console bytes travel on their own stream; let the last ones arrive.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and time.monotonic() - last_output[0] < quiet_s:
            time.sleep(0.02)
        try:
            stats = stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id), timeout=10)
            stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id), timeout=30)
        except grpc.RpcError:
            pass
    finally:
        if trace_call is not None:
            trace_call.cancel()
        if console_call is not None:
            console_call.cancel()
        if console_in is not None:
            console_in.close()
        if dch is not None:
            dch.close()
        vch.close()
    end = final[0] if final else vcpu_pb2.VmEvent(kind=vcpu_pb2.VM_EVENT_KIND_STOPPED, reason="interrupted")
    return RunResult(vm_id, end, events, bytes(console), stats, list(created.regions), traced[0],
                     "; ".join(trace_error))


def pump_stdin(inp: ConsoleInput, fd: int = 0) -> threading.Thread:
    """Copy a non-terminal stdin into the console until EOF (scripted runs)."""

    def pump() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            inp.feed(data)

    t = threading.Thread(target=pump, name="stdin", daemon=True)
    t.start()
    return t


def format_latency(stats: vcpu_pb2.GetStatsResponse) -> str:
    lat = stats.exit_latency
    if not lat.count:
        return f"{stats.exits} exits"
    return f"{stats.exits} exits, p50 {lat.p50_us:.1f} us, p99 {lat.p99_us:.1f} us"
