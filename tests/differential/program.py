"""One batch as one guest program: load every register from a table, do the access, dump every register and flag.

Memory layout (the same in both runs; only the window differs: RAM in the reference, a scratch device in mmiosplit)::

    RAM_BASE  code: prologue, one block per instance, epilogue (PSCI SYSTEM_OFF)
    RECORDS   one record per instance: the input registers, then the output dump (poisoned until written)
    SEED      self-seeded programs only: the window's initial bytes, copied into the device by the guest
    READBACK  self-seeded programs only: the window's final bytes, copied back by the guest

Each instance block, with P the batch's reserved pointer register (pointing at the instance's record)::

    A64:      ldr T,[P,#sp]; mov sp,T; ldr T,[P,#nzcv]; msr nzcv,T; ldr xN,[P,#8N] for every N != P
              <access>
              str xN,[P,#out+8N] for every N; mov T,sp; str T,[P,#out+sp]; mrs T,nzcv; str T,[P,#out+nzcv]
              add P,P,#record
    AArch32:  the same with r0..r14, msr APSR_nzcvq / mrs apsr, and (T32) an optional IT block around the access

The prologue sets the data endianness for the whole batch (A64: SCTLR_EL1.EE or E0E via mrs/orr/msr; AArch32:
SETEND BE), so the tables are stored, and the dumps read, in that byte order. An unprivileged batch first drops to
EL0 (ERET to EL0t) or User mode (CPS); its final HVC is then UNDEFINED, which is how both of its runs end.

A self-seeded program (used over gRPC, where the device's bytes cannot be loaded from outside) first copies SEED into
the window and at the end copies the window to READBACK, with plain ISV=1 word loads and stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tests.differential.encoders import A32, A64, T32, Halfwords
from tests.differential.generate import Batch, Instance
from vcpu_service.decode import Isa

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x40_0000
RECORDS = RAM_BASE + 0x20_0000
SEED = RAM_BASE + 0x30_0000
READBACK = RAM_BASE + 0x38_0000
PSCI_SYSTEM_OFF = 0x8400_0008
POISON = 0xA5
SCTLR_EE = 25
SCTLR_E0E = 24
USR_MODE = 0x10


@dataclass(frozen=True, slots=True)
class RecordLayout:
    """Where the input table and the output dump of one instance live inside its record."""

    word: int  # bytes per register slot
    names: tuple[str, ...]  # the slots: general registers, then SP (A64) and the flags

    @property
    def half(self) -> int:
        return self.word * len(self.names)

    @property
    def size(self) -> int:
        return 2 * self.half

    def slot(self, name: str) -> int:
        return self.word * self.names.index(name)


A64_LAYOUT = RecordLayout(8, (*(f"x{n}" for n in range(31)), "sp", "nzcv"))
A32_LAYOUT = RecordLayout(4, (*(f"r{n}" for n in range(15)), "apsr"))


def _byte_order(batch: Batch) -> Literal["big", "little"]:
    return "big" if batch.big_endian else "little"


def layout_for(isa: Isa) -> RecordLayout:
    return A64_LAYOUT if isa is Isa.A64 else A32_LAYOUT


@dataclass(frozen=True, slots=True)
class Program:
    """A batch turned into a guest image."""

    batch: Batch
    image: bytes  # loaded at RAM_BASE
    entry: int  # bit 0 set for Thumb
    self_seeded: bool
    instance_code: tuple[tuple[int, int], ...]  # [start, end) of each instance's block, for a failing PC
    access_pcs: tuple[int, ...]  # address of each instance's access instruction
    final_pc: int  # the PSCI SYSTEM_OFF HVC (UNDEFINED when unprivileged: the run ends on that exception)

    @property
    def expected_ending(self) -> str:
        """How both runs must end (see `runners.RunResult.ending`)."""
        return f"exception at 0x{self.final_pc:x}" if self.batch.unprivileged else "powered off"

    @property
    def layout(self) -> RecordLayout:
        return layout_for(self.batch.isa)

    @property
    def records_size(self) -> int:
        return self.layout.size * len(self.batch.instances)

    def instance_at(self, pc: int) -> Instance | None:
        """The instance whose block holds pc, if any."""
        for instance, (start, end) in zip(self.batch.instances, self.instance_code, strict=True):
            if start <= pc < end:
                return instance
        return None

    def dump(self, records: bytes, index: int) -> tuple[int, ...]:
        """The output registers of instance `index`, from the bytes of the records area."""
        lay = self.layout
        start = index * lay.size + lay.half
        order = _byte_order(self.batch)
        return tuple(
            int.from_bytes(records[start + k * lay.word:start + (k + 1) * lay.word], order)
            for k in range(len(lay.names))
        )


class _Code:
    """Code being laid out from RAM_BASE: words for A64/A32, halfwords for T32 (instructions are little-endian)."""

    def __init__(self, isa: Isa) -> None:
        self.isa = isa
        self.data = bytearray()

    @property
    def pc(self) -> int:
        return RAM_BASE + len(self.data)

    def a(self, *words: int) -> None:
        for w in words:
            self.data += w.to_bytes(4, "little")

    def t(self, *insns: Halfwords) -> None:
        for insn in insns:
            for hw in insn:
                self.data += hw.to_bytes(2, "little")

    def aarch32(self, a32: int, t32: Halfwords) -> None:
        """One AArch32 instruction, in the encoding of the program's instruction set."""
        if self.isa is Isa.A32:
            self.a(a32)
        else:
            self.t(t32)

    def halfwords(self, halfwords: tuple[int, ...]) -> None:
        for hw in halfwords:
            self.data += hw.to_bytes(2, "little")

    # --- ISA-neutral helpers over registers 0..30 / 0..14 ---
    def mov_imm(self, rd: int, value: int) -> None:
        if self.isa is Isa.A64:
            self.a(*A64.mov_imm(rd, value))
        elif self.isa is Isa.A32:
            self.a(*A32.mov_imm(rd, value))
        else:
            self.t(*T32.mov_imm(rd, value))

    def ldr(self, rt: int, rn: int, offset: int) -> None:
        if self.isa is Isa.A64:
            self.a(A64.ldr(rt, rn, offset))
        elif self.isa is Isa.A32:
            self.a(A32.ldr(rt, rn, offset))
        else:
            self.t(T32.ldr_w(rt, rn, offset))

    def str(self, rt: int, rn: int, offset: int) -> None:
        if self.isa is Isa.A64:
            self.a(A64.str(rt, rn, offset))
        elif self.isa is Isa.A32:
            self.a(A32.str(rt, rn, offset))
        else:
            self.t(T32.str_w(rt, rn, offset))

    def add_imm(self, rd: int, rn: int, value: int) -> None:
        if self.isa is Isa.A64:
            self.a(A64.add_imm(rd, rn, value))
        elif self.isa is Isa.A32:
            self.a(A32.add_imm(rd, rn, value))
        else:
            self.t(T32.addw(rd, rn, value))

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy length bytes word by word with x0/r0 through pointers in registers 1 and 2 (4 KiB at a time)."""
        word = 8 if self.isa is Isa.A64 else 4
        for chunk in range(0, length, 0x1000):
            self.mov_imm(1, src + chunk)
            self.mov_imm(2, dst + chunk)
            for off in range(0, min(0x1000, length - chunk), word):
                self.ldr(0, 1, off)
                self.str(0, 2, off)

    def power_off(self) -> int:
        """PSCI SYSTEM_OFF, then UDF: a program that is not stopped there ends on an exception, never loops.

        Returns the address of the HVC. Unprivileged, HVC is UNDEFINED, and the run ends on that exception there.
        """
        self.mov_imm(0, PSCI_SYSTEM_OFF)
        hvc = self.pc
        if self.isa is Isa.A64:
            self.a(A64.hvc(0), A64.UDF)
        elif self.isa is Isa.A32:
            self.a(A32.hvc(0), A32.UDF)
        else:
            self.t(T32.hvc(0), T32.UDF)
        return hvc


def _temp(isa: Isa, reserved: int) -> int:
    """A scratch register for SP/flags moves: not P, and (T32 MSR/MRS) not SP."""
    return next(r for r in range(15) if r != reserved and r != 13) if isa is not Isa.A64 else (reserved + 1) % 31


def _instance_block(code: _Code, instance: Instance, reserved: int, lay: RecordLayout) -> int:
    """Emit one instance block; returns the address of the access instruction."""
    isa, p = code.isa, reserved
    temp = _temp(isa, p)
    gprs = 31 if isa is Isa.A64 else 15
    if isa is Isa.A64:
        code.ldr(temp, p, lay.slot("sp"))
        code.a(A64.add_imm(31, temp, 0))
        code.ldr(temp, p, lay.slot("nzcv"))
        code.a(A64.msr_nzcv(temp))
    else:
        code.ldr(temp, p, lay.slot("apsr"))
        code.aarch32(A32.msr_apsr_nzcvq(temp), T32.msr_apsr_nzcvq(temp))
    for n in range(gprs):
        if n != p:
            code.ldr(n, p, lay.word * n)
    access_pc = code.pc
    if isa is Isa.T32:
        code.halfwords(instance.code)
        # The access is somewhere in the IT block: find its halfwords.
        hws = instance.code
        access = (instance.encoding,) if instance.encoding <= 0xFFFF else (instance.encoding >> 16,
                                                                           instance.encoding & 0xFFFF)
        k = next(i for i in range(len(hws)) if tuple(hws[i:i + len(access)]) == access)
        access_pc += 2 * k
    else:
        code.a(*instance.code)
    # A branch to the next instruction ends the translation block here. Unicorn flushes its translations on
    # every emu_start, so without it each exit would retranslate everything up to the end of the page.
    if isa is Isa.A64:
        code.a(A64.b(4))
    else:
        code.aarch32(A32.b(4), T32.B_NEXT)
    for n in range(gprs):
        code.str(n, p, lay.half + lay.word * n)
    if isa is Isa.A64:
        code.a(A64.add_imm(temp, 31, 0))
        code.str(temp, p, lay.half + lay.slot("sp"))
        code.a(A64.mrs_nzcv(temp))
        code.str(temp, p, lay.half + lay.slot("nzcv"))
    else:
        code.aarch32(A32.mrs_apsr(temp), T32.mrs_apsr(temp))
        code.str(temp, p, lay.half + lay.slot("apsr"))
    code.add_imm(p, p, lay.size)
    return access_pc


def _records(batch: Batch, lay: RecordLayout) -> bytes:
    order = _byte_order(batch)
    out = bytearray()
    for instance in batch.instances:
        values = list(instance.regs)
        values += [instance.sp, instance.flags] if batch.isa is Isa.A64 else [instance.flags]
        out += b"".join(v.to_bytes(lay.word, order) for v in values)
        out += bytes([POISON]) * lay.half
    return bytes(out)


def build_program(batch: Batch, self_seeded: bool = False) -> Program:
    """Lay out a batch as a guest image loaded at RAM_BASE."""
    isa, lay = batch.isa, layout_for(batch.isa)
    if lay.size * len(batch.instances) > SEED - RECORDS:
        raise ValueError(f"{len(batch.instances)} instances do not fit in the records area")
    if batch.window_size > READBACK - SEED or batch.window_size > RAM_BASE + RAM_SIZE - READBACK:
        raise ValueError(f"a window of {batch.window_size:#x} bytes does not fit the seed/readback areas")
    code = _Code(isa)
    if self_seeded:
        code.copy(SEED, batch.window_base, batch.used)
    if isa is Isa.A64:
        # EE sets the data endianness at EL1 and E0E at EL0. The bit that does not apply is set when the one that
        # does is clear, so that reading the wrong one shows up as a mismatch.
        code.a(A64.mrs_sctlr_el1(0))
        code.a(A64.orr_bit(0, 0, SCTLR_EE if batch.big_endian != batch.unprivileged else SCTLR_E0E))
        code.a(A64.msr_sctlr_el1(0), A64.ISB)
        if batch.unprivileged:
            code.a(A64.adr(0, 16), A64.msr_elr_el1(0), A64.msr_spsr_el1(31), A64.ERET)  # to EL0t, just after
    else:
        if batch.unprivileged:
            code.aarch32(A32.cps(USR_MODE), T32.cps(USR_MODE))
        if batch.big_endian:
            code.aarch32(A32.setend(True), T32.setend(True))
    code.mov_imm(batch.reserved, RECORDS)
    ranges: list[tuple[int, int]] = []
    access_pcs: list[int] = []
    for instance in batch.instances:
        start = code.pc
        access_pcs.append(_instance_block(code, instance, batch.reserved, lay))
        ranges.append((start, code.pc))
    if self_seeded:
        code.copy(batch.window_base, READBACK, batch.used)
    final_pc = code.power_off()
    if code.pc > RECORDS:
        raise ValueError(f"the code of {len(batch.instances)} instances does not fit below the records area")
    image = bytearray(code.data)
    image += bytes(RECORDS - RAM_BASE - len(image))
    image += _records(batch, lay)
    if self_seeded:
        image += bytes(SEED - RAM_BASE - len(image))
        image += batch.window[:batch.used]
    return Program(batch, bytes(image), RAM_BASE | int(isa is Isa.T32), self_seeded, tuple(ranges),
                   tuple(access_pcs), final_pc)
