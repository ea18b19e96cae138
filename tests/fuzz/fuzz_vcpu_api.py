"""Target ``vcpu-api``: the vcpu service's ``VcpuServicer``, in process, over fuzzed VM configurations and calls.

Each input makes a ``VmConfig`` (parsed from raw bytes, or built field by field: architectures, CPU models and
machine names valid or not, vCPU counts, RAM regions aligned or not, overlapping, over the cap, images inside and
outside RAM, entry points, policy enums known and unknown, limits including negative and non-finite times, IRQ
routes and DMA grants to services that exist or not, now and then a device service address that does not parse
or does not answer), calls ``CreateVm``, then a sequence of the other RPCs (Start, Pause, Resume, GetRegisters,
SetRegisters, ReadMemory, WriteMemory, GetStats, StreamVmEvents, StreamExitTrace, Delete) on that VM or on an
id that does not exist, with a fake ``grpc.ServicerContext``; the VM is deleted at the end.

Checked: every call returns its response or aborts with a status other than INTERNAL (the servicer's "internal
error" for an exception it did not expect) and a message; no other exception escapes; no VM is left behind;
no thread ends with an exception, and the thread count comes back down after each input (a VM's vCPU, ticker
and watch threads end with it).
RAM is bounded by the servicer's cap (8 MiB here).
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import atheris
import grpc
from google.protobuf.message import DecodeError

from mmiosplit.v1 import common_pb2, vcpu_pb2
from tests.fuzz.common import Finding, check, check_threads, quiet_logs, watch_threads
from vcpu_service.server import VcpuServicer

RAM_CAP = 8 * 2**20
#: Threads an input may leave running for a moment (a vCPU thread finishing its delete).
THREAD_SLACK = 4

A64_OFF = struct.pack("<5I", 0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000, 0xD503201F)  # SYSTEM_OFF by HVC
A32_OFF = struct.pack("<4I", 0xE3000008, 0xE3480400, 0xE1400070, 0xEAFFFFFE)
A64_REGS = [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate", "nzcv", "elr_el1", "esr_el1", "far_el1",
                                           "sctlr_el1", "vbar_el1", "sp_el0", "sp_el1"]
A32_REGS = [f"r{i}" for i in range(16)] + ["sp", "lr", "pc", "cpsr"]
CPU_MODELS = ["", "cortex-a57", "cortex-a53", "cortex-a72", "max", "cortex-a15", "cortex-a7", "cortex-a9",
              "cortex-a8", "CORTEX-A57", "pentium", "\x00"]


class Aborted(Exception):  # what grpc's abort raises, by another name
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """What the servicer uses of ``grpc.ServicerContext``: abort, and is_active for the streams."""

    def __init__(self, active_polls: int = 0) -> None:
        self._polls = active_polls

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        self._polls -= 1
        return self._polls >= 0


_state: dict[str, Any] = {}


def _servicer() -> VcpuServicer:
    if "servicer" not in _state:
        _state["servicer"] = VcpuServicer(ram_cap=RAM_CAP, connect_timeout_s=0.05, default_deadline_ms=200,
                                          vm_lease_s=0)
    return _state["servicer"]


def _u64(fdp: atheris.FuzzedDataProvider) -> int:
    return fdp.PickValueInList([0, 1, 0x1000, 0x4000_0000, 0x4008_0000, 0xFFFF_F000, (1 << 64) - 0x1000,
                                (1 << 64) - 1, fdp.ConsumeIntInRange(0, (1 << 64) - 1)])


def _ram(fdp: atheris.FuzzedDataProvider, cfg: vcpu_pb2.VmConfig, wild: bool) -> None:
    if not wild:
        cfg.ram.add(base=0x4000_0000, size=fdp.PickValueInList([0x10_0000, 0x1000, RAM_CAP // 2]))
        if fdp.ConsumeBool():
            cfg.ram.add(base=fdp.PickValueInList([0x8000_0000, 0x4000_0000 + RAM_CAP, 0x1000]), size=0x1000)
        return
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        base = fdp.PickValueInList([0x4000_0000, 0x4000_0000, 0x0, 0x4010_0000, 0x4000_0800,
                                    (1 << 64) - 0x1000, _u64(fdp)])
        size = fdp.PickValueInList([0x10_0000, 0x10_0000, 0x1000, 0, 0x800, RAM_CAP, RAM_CAP + 0x1000, 1 << 40,
                                    (1 << 64) - 0x1000, _u64(fdp)])
        cfg.ram.add(base=base, size=size)


def _config(fdp: atheris.FuzzedDataProvider) -> vcpu_pb2.VmConfig:
    """Three times in four a configuration that should be accepted (fields drawn from valid values), else one
    drawn from anything, or parsed from raw bytes."""
    wild = fdp.ConsumeIntInRange(0, 3) == 3
    cfg = vcpu_pb2.VmConfig()
    if wild and fdp.ConsumeIntInRange(0, 3) == 3:
        with contextlib.suppress(DecodeError, RuntimeError, ValueError):
            cfg.ParseFromString(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 128)))
        return cfg
    arm = fdp.ConsumeBool()
    cfg.architecture = common_pb2.ARCHITECTURE_ARM if arm else common_pb2.ARCHITECTURE_AARCH64
    if wild:
        cfg.architecture = fdp.ConsumeIntInRange(0, 5)
        cfg.cpu_model = fdp.PickValueInList(CPU_MODELS)
        cfg.vcpu_count = fdp.PickValueInList([0, 1, 2, 4, 8, 9, 64, 65, 1 << 31])
    else:
        cfg.cpu_model = fdp.PickValueInList(["", "max"] + (["cortex-a15", "cortex-a7"] if arm else ["cortex-a53"]))
        cfg.vcpu_count = fdp.PickValueInList([1, 1, 2, 4])
    _ram(fdp, cfg, wild)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        data = fdp.PickValueInList([A32_OFF if arm else A64_OFF, b"", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))])
        load = fdp.PickValueInList([0x4008_0000, 0x4000_0000, 0x4000_0ffe] + ([0, _u64(fdp)] if wild else []))
        cfg.images.add(name=fdp.PickValueInList(["", "kernel", "x" * 100]), data=data, load_address=load)
    cfg.entry_point = fdp.PickValueInList([0x4008_0000, 0x4008_0001, 0x4000_0000, 0, _u64(fdp)])
    pol = cfg.policies
    pol.unmapped_access = fdp.ConsumeIntInRange(0, 4 if wild else 3)
    pol.device_error = fdp.ConsumeIntInRange(0, 3 if wild else 2)
    pol.deadline = fdp.ConsumeIntInRange(0, 3 if wild else 2)
    pol.nisv = fdp.ConsumeIntInRange(0, 3 if wild else 2)
    cfg.limits.instruction_budget = fdp.PickValueInList([0, 1, 10, 1000, 100_000, _u64(fdp)])
    times = [0.0, 0.05, 1.0, 1e300, 5e-324, math.inf]
    if wild:
        times += [-1.0, -math.inf, math.nan, fdp.ConsumeFloat()]
    cfg.limits.wall_clock_seconds = fdp.PickValueInList(times)
    cfg.exit_deadline_ms = fdp.PickValueInList([0, 1, 100, 0xFFFF_FFFF])
    cfg.name = fdp.PickValueInList(["", "fuzz", "\u2603" * 10])
    cfg.strict_kvm = fdp.ConsumeBool()
    cfg.trace_exits = fdp.ConsumeBool()
    cfg.machine = fdp.PickValueInList(["", "virt"] + (["VIRT", "sbsa", "\x00"] if wild else []))
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        cfg.irq_routes.add(device_service=fdp.PickValueInList(["", "local", "unix:/nonexistent"]),
                           device=fdp.PickValueInList(["pl011", "uart", ""]),
                           line=fdp.PickValueInList(["", "0", "uartintr", "99"]),
                           spi=fdp.PickValueInList([0, 1, 31, 32, 33, 987, 988, 0xFFFF_FFFF]))
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        cfg.dma_grants.add(device_service=fdp.PickValueInList(["", "unix:/nonexistent"]),
                           name=fdp.PickValueInList(["ram", ""]),
                           base=fdp.PickValueInList([0x4000_0000, 0, _u64(fdp)]),
                           size=fdp.PickValueInList([0x1000, 0, 1 << 30, _u64(fdp)]))
    if wild and fdp.ConsumeIntInRange(0, 7) == 7:  # an address that does not parse, or a service not there
        cfg.device_services.append(fdp.PickValueInList(["", "nonsense", "unix:", "host:99999",
                                                        "unix:/nonexistent/fuzz.sock"]))
    return cfg


def _call(what: str, fn: Callable[[], object]) -> object:
    """A response, or None after a clean abort; a Finding for INTERNAL or any other exception."""
    try:
        return fn()
    except Aborted as exc:
        check(exc.code is not grpc.StatusCode.INTERNAL, f"{what}: {exc}")
        check(bool(exc.details), f"{what}: aborted with {exc.code} and no message")
        return None
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{what} raised {type(exc).__name__}: {exc}") from exc


def _rpc(fdp: atheris.FuzzedDataProvider, servicer: VcpuServicer, vm_id: str, arm: bool) -> str:
    """One RPC on ``vm_id`` (or a bogus id); returns the name of the RPC."""
    ctx = FakeContext()
    vid = vm_id if fdp.ConsumeIntInRange(0, 15) < 15 else fdp.PickValueInList(["", "nope", vm_id + "x"])
    op = fdp.ConsumeIntInRange(0, 11)
    vcpu = fdp.PickValueInList([0, 0, 1, 7, 0xFFFF_FFFF])
    regs = A32_REGS if arm else A64_REGS
    req: Any
    if op == 0:
        _call("StartVm", lambda: servicer.StartVm(vcpu_pb2.StartVmRequest(vm_id=vid), ctx))  # type: ignore[arg-type]
    elif op == 1:
        _call("PauseVm", lambda: servicer.PauseVm(vcpu_pb2.PauseVmRequest(vm_id=vid), ctx))  # type: ignore[arg-type]
    elif op == 2:
        _call("ResumeVm", lambda: servicer.ResumeVm(vcpu_pb2.ResumeVmRequest(vm_id=vid), ctx))  # type: ignore[arg-type]
    elif op == 3:
        names = [fdp.PickValueInList([*regs, "", "x31", "bogus", "PC"]) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        req = vcpu_pb2.GetRegistersRequest(vm_id=vid, vcpu_id=vcpu, names=names)
        _call("GetRegisters", lambda: servicer.GetRegisters(req, ctx))  # type: ignore[arg-type]
    elif op == 4:
        req = vcpu_pb2.SetRegistersRequest(vm_id=vid, vcpu_id=vcpu)
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            req.registers.add(name=fdp.PickValueInList([*regs, "", "bogus"]), value=_u64(fdp))
        _call("SetRegisters", lambda: servicer.SetRegisters(req, ctx))  # type: ignore[arg-type]
    elif op == 5:
        req = vcpu_pb2.ReadMemoryRequest(vm_id=vid, address=_u64(fdp), length=fdp.PickValueInList(
            [0, 1, 4, 0x1000, 0x10_0001, 64 * 2**20 + 1, (1 << 64) - 1, fdp.ConsumeIntInRange(0, 0x2000)]))
        resp = _call("ReadMemory", lambda: servicer.ReadMemory(req, ctx))  # type: ignore[arg-type]
        if resp is not None:
            check(len(resp.data) == req.length, f"ReadMemory of {req.length} bytes gave {len(resp.data)}")  # type: ignore[attr-defined]
    elif op == 6:
        req = vcpu_pb2.WriteMemoryRequest(vm_id=vid, address=_u64(fdp), data=fdp.ConsumeBytes(
            fdp.ConsumeIntInRange(0, 64)))
        _call("WriteMemory", lambda: servicer.WriteMemory(req, ctx))  # type: ignore[arg-type]
    elif op == 7:
        req = vcpu_pb2.GetStatsRequest(vm_id=vid, include_histograms=fdp.ConsumeBool(), counters_only=fdp.ConsumeBool())
        _call("GetStats", lambda: servicer.GetStats(req, ctx))  # type: ignore[arg-type]
    elif op == 8:
        req = vcpu_pb2.StreamVmEventsRequest(vm_id=vid)
        _call("StreamVmEvents", lambda: list(servicer.StreamVmEvents(req, FakeContext(0))))  # type: ignore[arg-type]
    elif op == 9:
        req = vcpu_pb2.StreamExitTraceRequest(vm_id=vid)
        _call("StreamExitTrace", lambda: list(servicer.StreamExitTrace(req, FakeContext(0))))  # type: ignore[arg-type]
    elif op == 10:
        _call("DeleteVm", lambda: servicer.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vid), ctx))  # type: ignore[arg-type]
    else:
        time.sleep(0.001 * fdp.ConsumeIntInRange(0, 5))  # let a started guest run a little
    return str(op)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    quiet_logs()
    watch_threads()
    check_threads()  # what an earlier input left behind is not this one's finding
    servicer = _servicer()
    before = threading.active_count()
    cfg = _config(fdp)
    resp = _call("CreateVm", lambda: servicer.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), FakeContext()))  # type: ignore[arg-type]
    vm_id = resp.vm_id if resp is not None else "none"  # type: ignore[attr-defined]
    arm = cfg.architecture == common_pb2.ARCHITECTURE_ARM
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 12)):
            _rpc(fdp, servicer, vm_id, arm)
    finally:
        if resp is not None:
            _call("DeleteVm", lambda: servicer.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id), FakeContext()))  # type: ignore[arg-type]
    check_threads()
    check(not servicer._vms, f"VMs left behind: {list(servicer._vms)}")
    baseline = _state.setdefault("threads", before)
    deadline = time.monotonic() + 2.0
    while threading.active_count() > baseline + THREAD_SLACK and time.monotonic() < deadline:
        time.sleep(0.01)
    check(threading.active_count() <= baseline + THREAD_SLACK,
          f"{threading.active_count()} threads after the input, {baseline} before the first: "
          f"{sorted(t.name for t in threading.enumerate())}")
