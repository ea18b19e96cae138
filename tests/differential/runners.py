"""Run a program three ways: plain Unicorn with RAM at the window, mmiosplit in-process, mmiosplit over gRPC.

All three start from the same CPU (`Arch.new_uc`: same model, same reset fixes), the same image and the same window
bytes, and end at PSCI SYSTEM_OFF (an unprivileged program: on its UNDEFINED HVC, which mmiosplit delivers to the
guest's vector, where nothing is: the reference enters it the same way, with `vcpu_service.exceptions`, so the final
states compare; the entry itself is checked against QEMU by tests/exitpath/test_guest_exceptions.py). Each returns a
`RunResult` with what the comparison needs: the records area (the dumps), the window's final bytes, the final
registers, and how the run ended. Every mmiosplit fault policy is STOP, so a failure ends the run with a reason
instead of an injected abort.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from unicorn import UC_ERR_INSN_INVALID, UC_HOOK_INTR, Uc, UcError

from device_service.bus import DeviceBus
from device_service.local import LocalEndpoint
from device_service.models.scratch import Scratch
from mmiosplit.v1 import common_pb2, vcpu_pb2, vcpu_pb2_grpc
from mmiosplit.wire import FINAL_EVENT_KINDS
from tests.differential.program import PSCI_SYSTEM_OFF, RAM_BASE, RAM_SIZE, READBACK, RECORDS, Program
from tests.exitpath.harness import event_from_wire
from vcpu_service import exceptions
from vcpu_service.arch import EXCEPTION_NAMES, EXCP_HVC, Arch, arch_by_name, close_uc
from vcpu_service.decode import Isa
from vcpu_service.domain import ErrorKind, EventKind, FaultPolicy, Policies, UnmappedPolicy, VmEvent
from vcpu_service.vm import ImageSpec, Vm, VmSpec

SCRATCH = "scratch0"
RUN_TIMEOUT_S = 60.0


@dataclass
class RunResult:
    """How one run of a program ended and what it left behind."""

    ok: bool  # it ended as the program must (`Program.expected_ending`)
    status: str  # "powered off", "exception at 0x<pc>", or why the run failed
    pc: int = 0  # where it ended
    detail: str = ""  # the run's own words for how it ended
    records: bytes = b""
    window: bytes = b""  # the first `batch.used` bytes at least; all of it when available
    registers: dict[str, int] = field(default_factory=dict)
    exits: int = 0  # completed exits (loads, non-posted stores)
    posted_writes: int = 0
    hand_decoded: int = 0
    seconds: float = 0.0


def arch_of(isa: Isa) -> Arch:
    return arch_by_name("aarch64" if isa is Isa.A64 else "arm")


def _registers(arch: Arch, uc: Uc) -> dict[str, int]:
    return {name: arch.read_named(uc, name) for name in arch.register_names()}


def run_reference(program: Program) -> RunResult:
    """The program in plain Unicorn, with RAM (holding the same bytes) where the scratch device would be."""
    batch = program.batch
    arch = arch_of(batch.isa)
    t0 = time.perf_counter()
    uc = arch.new_uc(batch.cpu_model)
    try:
        uc.mem_map(RAM_BASE, RAM_SIZE)
        uc.mem_write(RAM_BASE, program.image)
        uc.mem_map(batch.window_base, batch.window_size)
        uc.mem_write(batch.window_base, batch.window)
        ending: list[str] = []
        detail: list[str] = []
        raised_at: list[int] = []  # where the ending exception was raised (PC is at its vector afterwards)

        def on_interrupt(uc: Uc, intno: int, _user: object) -> None:
            if intno == EXCP_HVC and arch.psci_args(uc)[0] & 0xFFFF_FFFF == PSCI_SYSTEM_OFF:
                ending.append("powered off")
            else:
                ending.append(f"exception at 0x{arch.pc(uc):x}")
                detail.append(EXCEPTION_NAMES.get(intno, f"exception {intno}"))
                raised_at.append(arch.pc(uc))
                exceptions.take_reported(arch, uc, intno, exceptions.raised(arch, uc))
            uc.emu_stop()

        uc.hook_add(UC_HOOK_INTR, on_interrupt)
        begin = arch.set_entry(uc, program.entry, 0)
        try:
            # No timeout: Unicorn's timer thread polls every 2 us, a core's worth on a small machine. The
            # programs have no backward branch, and end on SYSTEM_OFF or the UDF after it.
            uc.emu_start(begin, arch.never_pc)
            status = ending[0] if ending else "emulation stopped without an ending"
        except UcError as exc:
            # An AArch32 HVC in User mode fails emu_start with UC_ERR_INSN_INVALID instead of raising UDEF.
            status = f"exception at 0x{arch.pc(uc):x}" if exc.errno == UC_ERR_INSN_INVALID else f"Unicorn error: {exc}"
            detail.append(str(exc))
            if exc.errno == UC_ERR_INSN_INVALID:
                raised_at.append(arch.pc(uc))
                exceptions.take_undefined_a32(arch, uc)
        pc = raised_at[0] if raised_at else arch.pc(uc)
        window = bytes(uc.mem_read(batch.window_base, batch.window_size))
        if program.self_seeded:
            window = bytes(uc.mem_read(READBACK, batch.used)) + window[batch.used:]
        return RunResult(
            ok=status == program.expected_ending, status=status, pc=pc, detail="; ".join(detail),
            records=bytes(uc.mem_read(RECORDS, program.records_size)), window=window,
            registers=_registers(arch, uc), seconds=time.perf_counter() - t0,
        )
    finally:
        close_uc(uc)


# Every fault ends the run with a reason: the differential must see failures, not injected aborts.
_STOP_POLICIES = Policies(UnmappedPolicy.STOP, FaultPolicy.STOP, FaultPolicy.STOP, FaultPolicy.STOP)
_WIRE_STOP_POLICIES = vcpu_pb2.Policies(
    unmapped_access=vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP, device_error=vcpu_pb2.FAULT_POLICY_STOP,
    deadline=vcpu_pb2.FAULT_POLICY_STOP, nisv=vcpu_pb2.FAULT_POLICY_STOP,
)


def _ending(final: VmEvent | None, program: Program) -> tuple[bool, str, int, str]:
    """(ended as expected, status in the reference's terms, pc, detail) from a VM's final event."""
    if final is None:
        return False, f"no final event within {RUN_TIMEOUT_S:g} s", 0, ""
    if final.kind is EventKind.POWERED_OFF:
        status = "powered off"
    elif final.kind is EventKind.ERROR and final.error_kind is ErrorKind.GUEST_EXCEPTION:
        status = f"exception at 0x{final.pc:x}"
    else:
        status = f"{final.kind.value}: {final.reason}"
    return status == program.expected_ending, status, int(final.pc), final.reason


def run_local(program: Program) -> RunResult:
    """The program through mmiosplit in this process: a Vm, a LocalEndpoint and a scratch device at the window."""
    batch = program.batch
    t0 = time.perf_counter()
    scratch = Scratch(SCRATCH, batch.window_base, size=batch.window_size, posted=batch.posted)
    bus = DeviceBus([scratch])
    if not program.self_seeded:
        device = bus.device(SCRATCH)
        assert isinstance(device, Scratch)
        device.memory[:] = batch.window
    arch = "aarch64" if batch.isa is Isa.A64 else "arm"
    spec = VmSpec(
        architecture=arch, cpu_model=batch.cpu_model, ram=[(RAM_BASE, RAM_SIZE)],
        images=[ImageSpec("differential", program.image, RAM_BASE)], entry_point=program.entry,
        policies=_STOP_POLICIES, wall_clock_seconds=RUN_TIMEOUT_S, name=f"differential {batch.seed}",
    )
    vm = Vm(spec, [LocalEndpoint(bus)], ram_cap=RAM_SIZE)
    try:
        vm.start()
        ok, status, pc, detail = _ending(vm.events.wait_final(RUN_TIMEOUT_S + 5), program)
        if not ok and vm.events.final is None:
            vm.finish(EventKind.STOPPED, reason="differential: no ending")
            vm.events.wait_final(10)
        registers = dict(vm.get_registers(0, [])[0])
        if status == "powered off":
            pc = registers["pc"]
        window = bytes(scratch.memory)
        if program.self_seeded:
            window = vm.read_memory(READBACK, batch.used) + window[batch.used:]
        stats = vm.vcpus[0].exits.stats  # not vm.stats(): its latency histograms cost ~100 ms
        return RunResult(
            ok=ok, status=status, pc=pc, detail=detail, records=vm.read_memory(RECORDS, program.records_size),
            window=window,
            registers=registers, exits=stats.exits, posted_writes=stats.posted_writes, hand_decoded=stats.hand_decoded,
            seconds=time.perf_counter() - t0,
        )
    finally:
        vm.delete()


class GrpcTarget:
    """A vcpu service and a device service (started by `mmiosplit_cli.launcher.local_services`) to run programs on.

    The device service hosts a scratch device at `windows[False]` and a posted one at `windows[True]`, each
    `window_size` bytes. Programs must be self-seeded with their window at the one that fits the batch, because
    nothing but the guest can load a remote device's bytes.
    """

    def __init__(self, vcpu_address: str, device_address: str, windows: dict[bool, int], window_size: int) -> None:
        from mmiosplit_cli.runner import channel

        self.device_address = device_address
        self.windows = windows
        self.window_size = window_size
        self._channel = channel(vcpu_address)
        self.stub = vcpu_pb2_grpc.VcpuServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def run(self, program: Program) -> RunResult:
        batch = program.batch
        if not program.self_seeded or batch.window_base != self.windows[batch.posted] or batch.used > self.window_size:
            raise ValueError("a gRPC run needs a self-seeded program whose window is the device service's")
        t0 = time.perf_counter()
        config = vcpu_pb2.VmConfig(
            architecture=common_pb2.ARCHITECTURE_AARCH64 if batch.isa is Isa.A64 else common_pb2.ARCHITECTURE_ARM,
            cpu_model=batch.cpu_model, vcpu_count=1, ram=[vcpu_pb2.MemoryRegion(base=RAM_BASE, size=RAM_SIZE)],
            device_services=[self.device_address],
            images=[vcpu_pb2.Image(name="differential", data=program.image, load_address=RAM_BASE)],
            entry_point=program.entry, policies=_WIRE_STOP_POLICIES,
            limits=vcpu_pb2.RunLimits(wall_clock_seconds=RUN_TIMEOUT_S), name=f"differential {batch.seed}",
        )
        vm_id = self.stub.CreateVm(vcpu_pb2.CreateVmRequest(config=config), timeout=30).vm_id
        try:
            final: list[VmEvent] = []
            done = threading.Event()

            def follow() -> None:
                stream = self.stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id),
                                                  timeout=RUN_TIMEOUT_S + 10)
                for response in stream:
                    if response.event.kind in FINAL_EVENT_KINDS:
                        final.append(event_from_wire(response.event))
                done.set()

            threading.Thread(target=follow, daemon=True).start()
            self.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
            done.wait(RUN_TIMEOUT_S + 15)
            ok, status, pc, detail = _ending(final[0] if final else None, program)
            regs = self.stub.GetRegisters(vcpu_pb2.GetRegistersRequest(vm_id=vm_id, vcpu_id=0), timeout=30)
            registers = {r.name: r.value for r in regs.registers}
            if status == "powered off":
                pc = registers["pc"]

            def read(address: int, length: int) -> bytes:
                request = vcpu_pb2.ReadMemoryRequest(vm_id=vm_id, address=address, length=length)
                return bytes(self.stub.ReadMemory(request, timeout=30).data)

            stats = self.stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id), timeout=30)
            return RunResult(
                ok=ok, status=status, pc=pc, detail=detail, records=read(RECORDS, program.records_size),
                window=read(READBACK, batch.used), registers=registers, exits=stats.exits,
                posted_writes=sum(v.posted_writes for v in stats.vcpus),
                hand_decoded=sum(v.hand_decoded for v in stats.vcpus), seconds=time.perf_counter() - t0,
            )
        finally:
            self.stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id), timeout=30)
