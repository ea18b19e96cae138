"""An in-process harness for the exit path: a guest built from instruction words, real device models, a Vm.

Every run goes through the real exit path (``vcpu_service.exits``) with the device models reached through
``LocalEndpoint``, so a test takes milliseconds. The guest is laid out as:

=====================  ===============================================================================
``LOAD + 0x000``       the harness prologue (A32/T32: set VBAR; every ISA: load x0/r0 from the pool),
                       then the test body, then the epilogue (keep x0/r0 in x19/r8, PSCI SYSTEM_OFF)
``LOAD + 0x7f8``       the pool: the initial x0/r0 (PSCI power-on always starts the boot vCPU with 0)
``LOAD + 0x800``       the vector table. A64: the same handler at +0x000, +0x200 and +0x400 (synchronous,
                       current EL SP0 / SPx, lower EL AArch64); A32/T32: the data abort handler at +0x10.
                       Each handler copies the syndrome registers to registers and calls SYSTEM_OFF.
``DATA``               free RAM for the test (``LOAD + 0x1000``)
=====================  ===============================================================================

Registers other than x0/r0 are preset with ``Vm.set_registers`` before the start, VBAR_EL1 included on
A64 (AArch32 has no named VBAR, so its prologue writes it with MCR). The handlers and the epilogue own
x19..x23 (A64) and r8..r12 (AArch32): test bodies leave them alone. Policies default to what the
VcpuService fills in for a config that sets none: RAZ/WI for holes, an external abort for the rest.
"""

from __future__ import annotations

import copy
import itertools
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from device_service.bus import DeviceBus
from device_service.config import create_device, parse_device_specs
from device_service.local import LocalEndpoint
from device_service.model import BUS_ACCESS_SIZES, AccessError, AccessResult, DeviceModel, RegionSpec
from mmiosplit.v1 import vcpu_pb2
from vcpu_service.domain import ErrorKind, EventKind, FaultPolicy, Policies, UnmappedPolicy, VmEvent
from vcpu_service.exits import ExitStats
from vcpu_service.tracelog import ExitRecord
from vcpu_service.vm import ImageSpec, Vm, VmSpec

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 * 2**20
LOAD = 0x4008_0000
POOL = LOAD + 0x7F8
VBAR = LOAD + 0x800
DATA = LOAD + 0x1000
DEV = 0x0A00_0000  # the default Probe device, "dev"
DEV_SIZE = 0x2000
HOLE = 0x2000_0000  # nothing is mapped here

MASK64 = 0xFFFF_FFFF_FFFF_FFFF
MASK32 = 0xFFFF_FFFF

A64, A32, T32 = "a64", "a32", "t32"
ISAS = (A64, A32, T32)

# PSCI SYSTEM_OFF, preceded by saving x0/r0 (which the call needs) in x19/r8.
A64_EPILOGUE = [
    0xAA0003F3,  # mov  x19, x0
    0xD2800100,  # mov  x0, #0x8
    0xF2B08000,  # movk x0, #0x8400, lsl #16      (x0 = 0x84000008, SYSTEM_OFF)
    0xD4000002,  # hvc  #0
    0x14000000,  # b    .
]
A64_HANDLER = [
    0xAA0003F3,  # mov  x19, x0
    0xD5385214,  # mrs  x20, esr_el1
    0xD5386015,  # mrs  x21, far_el1
    0xD5384036,  # mrs  x22, elr_el1
    0xD5384017,  # mrs  x23, spsr_el1
    0xD2800100,  # mov  x0, #0x8
    0xF2B08000,  # movk x0, #0x8400, lsl #16
    0xD4000002,  # hvc  #0
    0x14000000,  # b    .
]
A64_PROLOGUE = [
    0x58003FC0,  # ldr  x0, LOAD+0x7f8             (the pool)
]

A32_PROLOGUE = [
    0xE3000800,  # movw r0, #0x0800
    0xE3440008,  # movt r0, #0x4008
    0xEE0C0F10,  # mcr  p15, 0, r0, c12, c0, 0    (VBAR = LOAD + 0x800)
    0xF57FF06F,  # isb  sy
    0xE59F07E0,  # ldr  r0, [pc, #0x7e0]          (the pool at LOAD+0x7f8)
]
A32_EPILOGUE = [
    0xE1A08000,  # mov  r8, r0
    0xE3000008,  # movw r0, #8
    0xE3480400,  # movt r0, #0x8400
    0xE1400070,  # hvc  #0
    0xEAFFFFFE,  # b    .
]
A32_HANDLER = [  # at VBAR + 0x10, entered in ARM state (SCTLR.TE = 0) and Abort mode
    0xE1A08000,  # mov  r8, r0
    0xEE159F10,  # mrc  p15, 0, r9, c5, c0, 0     (DFSR)
    0xEE16AF10,  # mrc  p15, 0, r10, c6, c0, 0    (DFAR)
    0xE1A0B00E,  # mov  r11, lr                   (LR_abt)
    0xE14FC000,  # mrs  r12, spsr                 (SPSR_abt)
    0xE3000008,  # movw r0, #8
    0xE3480400,  # movt r0, #0x8400
    0xE1400070,  # hvc  #0
    0xEAFFFFFE,  # b    .
]
T32_PROLOGUE = [
    0xF640, 0x0000,  # movw  r0, #0x0800
    0xF2C4, 0x0008,  # movt  r0, #0x4008
    0xEE0C, 0x0F10,  # mcr   p15, 0, r0, c12, c0, 0
    0xF3BF, 0x8F6F,  # isb   sy
    0xF8DF, 0x07E4,  # ldr.w r0, [pc, #0x7e4]     (the pool at LOAD+0x7f8)
]
T32_EPILOGUE = [
    0x4680,  # mov   r8, r0
    0xF240, 0x0008,  # movw  r0, #8
    0xF2C8, 0x4000,  # movt  r0, #0x8400
    0xF7E0, 0x8000,  # hvc   #0
    0xE7FE,  # b     .
]

A64_REGS = [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate", "nzcv", "elr_el1", "esr_el1", "far_el1",
                                           "sp_el0", "sp_el1", "vbar_el1"]
A32_REGS = [f"r{i}" for i in range(13)] + ["sp", "lr", "pc", "cpsr"]


def words(*ws: int) -> bytes:
    """Little-endian 32-bit instruction words (A64, A32)."""
    return struct.pack(f"<{len(ws)}I", *ws)


def halfwords(*hws: int) -> bytes:
    """Thumb code from halfwords: a 32-bit T32 instruction is written as its two halfwords, first one first."""
    return struct.pack(f"<{len(hws)}H", *hws)


def code(isa: str, *units: int) -> bytes:
    """Instruction words for A64/A32, halfwords for T32."""
    return halfwords(*units) if isa == T32 else words(*units)


def body_offset(isa: str) -> int:
    """Where the test body starts, relative to LOAD."""
    return {A64: 4 * len(A64_PROLOGUE), A32: 4 * len(A32_PROLOGUE), T32: 2 * len(T32_PROLOGUE)}[isa]


def body_addr(isa: str, offset: int = 0) -> int:
    """The guest address of byte ``offset`` of the test body (without the Thumb bit)."""
    return LOAD + body_offset(isa) + offset


def build_image(isa: str, body: bytes, x0: int = 0) -> bytes:
    """Prologue + body + epilogue, the pool and the vector table, as one image loaded at LOAD."""
    image = bytearray(0x1000)
    if isa == A64:
        text = words(*A64_PROLOGUE) + body + words(*A64_EPILOGUE)
        for vector in (0x000, 0x200, 0x400):
            handler = words(*A64_HANDLER)
            image[0x800 + vector:0x800 + vector + len(handler)] = handler
    else:
        prologue, epilogue = (words(*A32_PROLOGUE), words(*A32_EPILOGUE)) if isa == A32 else \
            (halfwords(*T32_PROLOGUE), halfwords(*T32_EPILOGUE))
        text = prologue + body + epilogue
        handler = words(*A32_HANDLER)
        image[0x810:0x810 + len(handler)] = handler
    if len(text) > 0x7F8:
        raise ValueError(f"guest code of {len(text)} bytes does not fit below the pool")
    image[:len(text)] = text
    image[0x7F8:0x800] = (x0 & MASK64).to_bytes(8, "little")
    return bytes(image)


def entry_point(isa: str) -> int:
    return LOAD | 1 if isa == T32 else LOAD


def architecture(isa: str) -> str:
    return "aarch64" if isa == A64 else "arm"


# ----- policies -----------------------------------------------------------------------------------------

_FAULT = {"abort": FaultPolicy.ABORT, "stop": FaultPolicy.STOP}
_UNMAPPED = {"razwi": UnmappedPolicy.RAZ_WI, "abort": UnmappedPolicy.ABORT,
             "stop": UnmappedPolicy.STOP}


def policies(*, unmapped: str = "razwi", device_error: str = "abort", deadline: str = "abort",
             nisv: str = "abort") -> Policies:
    """The VM defaults (what the VcpuService fills in for unset fields) unless overridden."""
    return Policies(unmapped_access=_UNMAPPED[unmapped], device_error=_FAULT[device_error],
                             deadline=_FAULT[deadline], nisv=_FAULT[nisv])


# ----- device models made for these tests ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Access:
    """One access as a device model saw it."""

    offset: int
    size: int
    is_write: bool
    value: int


class Probe(DeviceModel):
    """RAM-like registers that log every access, can refuse chosen accesses and can hold an access open.

    * ``memory`` is little-endian like the scratch device; ``load`` pre-fills it.
    * ``log`` lists every access in the order the model received it (refused ones too).
    * ``fail`` decides which accesses the model refuses (a device error).
    * ``gate``: when set, every access first sets ``entered`` and then waits for the gate (up to 10 s).
    * ``posted_from``: offsets from there on form a second region whose writes are posted.
    * ``journal``: a list shared by several probes, to see the order of accesses across devices.
    """

    type_name = "probe"
    compatible = ("mmiosplit-test,probe",)

    def __init__(self, name: str = "dev", base: int = DEV, size: int = DEV_SIZE, *,
                 fail: Callable[[Access], bool] | None = None, gate: threading.Event | None = None,
                 posted_from: int | None = None, access_sizes: tuple[int, ...] = BUS_ACCESS_SIZES,
                 journal: list[tuple[str, Access]] | None = None) -> None:
        super().__init__(name, base)
        self.size = size
        self.memory = bytearray(size)
        self.log: list[Access] = []
        self.fail = fail
        self.gate = gate
        self.entered = threading.Event()
        self.posted_from = posted_from
        self.access_sizes = access_sizes
        self.journal = journal

    def regions(self) -> list[RegionSpec]:
        if self.posted_from is None:
            return [RegionSpec("regs", 0, self.size, access_sizes=self.access_sizes)]
        posted = RegionSpec("posted", self.posted_from, self.size - self.posted_from, posted=True,
                            access_sizes=self.access_sizes)
        if self.posted_from == 0:
            return [posted]
        return [RegionSpec("regs", 0, self.posted_from, access_sizes=self.access_sizes), posted]

    def load(self, offset: int, value: int, size: int) -> None:
        """Pre-fill ``size`` bytes at ``offset`` with ``value``, little-endian (the register value)."""
        self.memory[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _access(self, access: Access) -> AccessResult:
        self.log.append(access)
        if self.journal is not None:
            self.journal.append((self.name, access))
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(10)
        if self.fail is not None and self.fail(access):
            return AccessResult.failure(AccessError.DEVICE_FAULT, f"probe refuses {access}")
        if access.offset < 0 or access.offset + access.size > self.size:
            return AccessResult.failure(AccessError.OUT_OF_RANGE, f"offset {access.offset:#x} is out of range")
        if access.is_write:
            self.load(access.offset, access.value, access.size)
            return AccessResult.success()
        return AccessResult.success(int.from_bytes(self.memory[access.offset:access.offset + access.size], "little"))

    def read(self, offset: int, size: int) -> AccessResult:
        return self._access(Access(offset, size, False, 0))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return self._access(Access(offset, size, True, value))

    def reset(self) -> None:
        self.memory[:] = bytes(self.size)
        self.log.clear()

    @property
    def reads(self) -> list[Access]:
        return [a for a in self.log if not a.is_write]

    @property
    def writes(self) -> list[Access]:
        return [a for a in self.log if a.is_write]


def refuse_from(offset: int) -> Callable[[Access], bool]:
    """A ``Probe.fail`` that refuses every access at ``offset`` or above (a device error)."""
    return lambda access: access.offset >= offset


class Counter(DeviceModel):
    """A fetch-and-increment register: every read returns the number of reads before it; writes add up."""

    type_name = "counter"
    compatible = ("mmiosplit-test,counter",)

    def __init__(self, name: str = "counter", base: int = 0x0A10_0000, size: int = 0x1000) -> None:
        super().__init__(name, base)
        self.size = size
        self.count = 0
        self.written: list[int] = []

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, self.size)]

    def read(self, offset: int, size: int) -> AccessResult:
        value = self.count
        self.count += 1
        return AccessResult.success(value & ((1 << (8 * size)) - 1))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        self.written.append(value)
        return AccessResult.success()

    def reset(self) -> None:
        self.count = 0
        self.written.clear()


# ----- running a guest -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Abort:
    """What the harness's exception handler saw. AArch64: ESR/FAR/ELR/SPSR_EL1 and the vector offset used.
    AArch32: DFSR, DFAR, LR_abt (in ``elr``) and SPSR_abt (in ``spsr``)."""

    esr: int
    far: int
    elr: int
    spsr: int
    vector: int

    @property
    def ec(self) -> int:
        return self.esr >> 26

    @property
    def il(self) -> int:
        return (self.esr >> 25) & 1

    @property
    def isv(self) -> int:
        return (self.esr >> 24) & 1

    @property
    def wnr(self) -> int:
        return (self.esr >> 6) & 1

    @property
    def dfsc(self) -> int:
        return self.esr & 0x3F


@dataclass
class Result:
    """The end of a run: the final event, every event, the registers (x0/r0 as the test body left it),
    each vCPU's exit counters (the numbers GetStats reports), the abort the guest took (if it did), RAM
    read back, the devices and the exit trace."""

    isa: str
    final: VmEvent
    events: list[VmEvent]
    regs: dict[str, int]
    exit_stats: list[ExitStats]
    abort: Abort | None
    ram: dict[int, bytes]
    bus: DeviceBus
    trace: list[ExitRecord]
    body_end: int = 0

    @property
    def powered_off(self) -> bool:
        return self.final.kind == EventKind.POWERED_OFF

    @property
    def finished_body(self) -> bool:
        """True when the guest powered off from the harness epilogue (it ran the whole body, no abort)."""
        return self.powered_off and self.abort is None and self.final.pc == self.epilogue_hvc_end

    @property
    def epilogue_hvc_end(self) -> int:
        """The PC SYSTEM_OFF reports: just after the epilogue's HVC."""
        return LOAD + self.body_end + (14 if self.isa == T32 else 16)

    def aborts_events(self) -> list[VmEvent]:
        return [e for e in self.events if e.kind == EventKind.EXTERNAL_ABORT]

    @property
    def vcpu_stats(self) -> ExitStats:
        return self.exit_stats[0]

    def device(self, name: str = "dev") -> DeviceModel:
        return self.bus.device(name)


def default_devices() -> list[DeviceModel]:
    return [Probe()]


class Machine:
    """One Vm over a LocalEndpoint, built from a test body; use as a context manager (deletes the Vm)."""

    def __init__(self, isa: str, body: bytes, *, regs: Mapping[str, int] | None = None,
                 devices: Sequence[DeviceModel] | None = None, specs: Sequence[str] = (),
                 pol: Policies | None = None, strict_kvm: bool = False, vcpus: int = 1,
                 cpu_model: str = "", ram: Mapping[int, bytes] | None = None, trace: bool = True) -> None:
        self.isa = isa
        self.body = body
        preset = dict(regs or {})
        zero = "x0" if isa == A64 else "r0"
        x0 = preset.pop(zero, 0)
        models = list(default_devices() if devices is None else devices)
        models += [create_device(s) for s in parse_device_specs(list(specs))]
        self.bus = DeviceBus(models)
        images = [ImageSpec("test", build_image(isa, body, x0), LOAD)]
        images += [ImageSpec(f"data@{a:#x}", d, a) for a, d in (ram or {}).items()]
        spec = VmSpec(architecture(isa), cpu_model=cpu_model, vcpu_count=vcpus, ram=[(RAM_BASE, RAM_SIZE)],
                      images=images, entry_point=entry_point(isa), policies=pol or policies(),
                      strict_kvm=strict_kvm, trace_exits=trace)
        self.vm = Vm(spec, [LocalEndpoint(self.bus)], ram_cap=RAM_SIZE)
        if isa == A64:
            preset.setdefault("vbar_el1", VBAR)
        if preset:
            self.vm.set_registers(0, list(preset.items()))

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.vm.delete()

    def start(self) -> None:
        self.vm.start()

    def wait(self, timeout: float = 10.0) -> VmEvent:
        final = self.vm.events.wait_final(timeout)
        assert final is not None, f"no final event within {timeout} s: {self.vm.events.snapshot()}"
        return final

    def registers(self, *names: str, vcpu: int = 0) -> dict[str, int]:
        regs, _pending = self.vm.get_registers(vcpu, list(names))
        return dict(regs)

    def result(self, final: VmEvent, read: Sequence[tuple[int, int]] = ()) -> Result:
        regs, abort = interpret(self.isa, final, self.registers(*register_names(self.isa)))
        ram = {address: self.vm.read_memory(address, length) for address, length in read}
        # The exit counters straight from the exit path (GetStats copies them; its latency summaries take
        # a quarter of a second to compute, too slow to do for every test).
        stats = [copy.deepcopy(v.exits.stats) for v in self.vm.vcpus]
        return Result(self.isa, final, self.vm.events.snapshot(), regs, stats, abort, ram, self.bus,
                      self.trace(), body_offset(self.isa) + len(self.body))

    def trace(self) -> list[ExitRecord]:
        """Every exit so far, as the exit path recorded it (syndrome, instruction length, outcome)."""
        if self.vm.trace is None:
            return []
        return list(itertools.chain.from_iterable(self.vm.trace.follow(lambda: False, poll_s=0)))


def event_from_wire(e: vcpu_pb2.VmEvent) -> VmEvent:
    """A VmEvent from the gRPC API in the vcpu service's own terms, to compare runs over both transports."""
    kind = EventKind[vcpu_pb2.VmEventKind.Name(e.kind).removeprefix("VM_EVENT_KIND_")]
    error = ErrorKind[vcpu_pb2.VmErrorKind.Name(e.error_kind).removeprefix("VM_ERROR_KIND_")]
    return VmEvent(e.seq, kind, e.time, e.reason, e.vcpu_id, error, e.pc, e.fault_address, e.syndrome,
                   e.instruction, e.device)


def register_names(isa: str) -> list[str]:
    return A64_REGS if isa == A64 else A32_REGS


def interpret(isa: str, final: VmEvent, regs: dict[str, int]) -> tuple[dict[str, int], Abort | None]:
    """The registers as the test body left them, and the abort the handler recorded, from a final dump.

    After SYSTEM_OFF from the harness (epilogue or handler), x0/r0 is the value kept in x19/r8.
    """
    regs = dict(regs)
    abort = None
    if final.kind == EventKind.POWERED_OFF:
        aborted = VBAR <= final.pc < VBAR + 0x800
        if isa == A64:
            regs["x0"] = regs["x19"]
            if aborted:
                abort = Abort(regs["x20"], regs["x21"], regs["x22"], regs["x23"], (final.pc - VBAR) & ~0x7F)
        else:
            regs["r0"] = regs["r8"]
            if aborted:
                abort = Abort(regs["r9"], regs["r10"], regs["r11"], regs["r12"], 0x10)
    return regs, abort


def run(isa: str, body: bytes, *, read: Sequence[tuple[int, int]] = (), timeout: float = 10.0,
        **kw: object) -> Result:
    """Build, run to the final event, collect everything, delete. Keyword arguments go to ``Machine``."""
    with Machine(isa, body, **kw) as machine:  # type: ignore[arg-type]
        machine.start()
        final = machine.wait(timeout)
        return machine.result(final, read)


def nzcv(n: int = 0, z: int = 0, c: int = 0, v: int = 0) -> int:
    return (n << 31) | (z << 30) | (c << 29) | (v << 28)


# ----- assertions shared by the tests ----------------------------------------------------------------------

def expect_sea(res: Result, *, pc: int, far: int, write: bool = False, el0: bool = False,
               vector: int | None = None) -> Abort:
    """The guest took one precise synchronous external abort on the instruction at ``pc``: syndrome, fault
    address and return address as the architecture gives them, taken from SVC (AArch32) or EL1/EL0 (A64)."""
    a = res.abort
    assert res.powered_off and a is not None, (res.final, res.abort)
    if res.isa == A64:
        ec = 0x24 if el0 else 0x25
        # EC, IL=1, ISV=0 (an injected SEA has no instruction syndrome), WnR, DFSC 0x10 (synchronous external).
        assert a.esr == (ec << 26) | (1 << 25) | (int(write) << 6) | 0x10, hex(a.esr)
        assert a.far == far, hex(a.far)
        assert a.elr == pc, hex(a.elr)  # the instruction itself: it did not retire
        assert a.vector == (vector if vector is not None else 0x400 if el0 else 0x200), hex(a.vector)
        assert (a.spsr >> 2) & 3 == (0 if el0 else 1), hex(a.spsr)  # SPSR_EL1.M: the EL it came from
    else:
        # DFSR (short-descriptor): FS = 0b01000, synchronous external abort; bit 11 WnR.
        assert a.esr == 0x8 | (int(write) << 11), hex(a.esr)
        assert a.far == far, hex(a.far)  # DFAR
        assert a.elr == pc + 8, hex(a.elr)  # LR_abt = the aborted instruction + 8, ARM and Thumb alike
        assert res.regs["cpsr"] & 0x1F == 0x17, hex(res.regs["cpsr"])  # the handler runs in Abort mode
        assert a.spsr & 0x1F == 0x13, hex(a.spsr)  # taken from SVC mode
        assert bool(a.spsr & 0x20) == (res.isa == T32), hex(a.spsr)  # SPSR_abt.T: the state it came from
    events = res.aborts_events()
    assert len(events) == 1 and events[0].pc == pc and events[0].fault_address == far, events
    assert res.vcpu_stats.aborts == 1
    return a
