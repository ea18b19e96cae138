"""The load tester's guest, written as ARM machine code here so no cross toolchain is needed.

Every vCPU runs the same program (vCPU 0 starts the others with PSCI CPU_ON, passing each its index
as the context id):

1. a warm-up loop of the access mix, so first-use costs (stream set-up, decode caches) stay out of the
   measurement;
2. a barrier: the vCPU sets its ``ready`` flag in RAM and spins on the ``go`` word (RAM only, no exits),
   so the load tester can pause the VM with no exit in flight, take the warm-up histogram and release
   every vCPU at once;
3. the measured loop: N iterations (then secondaries set ``done`` and call CPU_OFF; vCPU 0 waits for
   every ``done`` and calls SYSTEM_OFF), or forever (the load tester deletes the VM).

The image starts with the data page (go word, ready and done flags, each vCPU's device address), the
code follows at +0x1000 (its own page, so flag writes never invalidate translated code).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

RAM_BASE = 0x4000_0000
RAM_SIZE = 16 << 20
IMAGE_BASE = RAM_BASE + 0x20_0000  # clear of the 1 MiB device tree the virt board puts at the start of RAM
GO_OFFSET = 0x000
READY_OFFSET = 0x100
DONE_OFFSET = 0x400
TABLE_OFFSET = 0x800
CODE_OFFSET = 0x1000
COMPUTE_SLOT = RAM_BASE + 0x1_0000  # the RAM word the compute loop loads and stores
MAX_VCPUS = 64
MAX_MIX = 64

PSCI_CPU_ON_64 = 0xC400_0003
PSCI_CPU_ON_32 = 0x8400_0003
PSCI_CPU_OFF = 0x8400_0002
PSCI_SYSTEM_OFF = 0x8400_0008

ARCHES = ("aarch64", "arm")
SIZES = (1, 2, 4, 8)


class GuestError(ValueError):
    """A guest that cannot be generated; the message names the option at fault."""


@dataclass(frozen=True)
class Access:
    """One access of the loop body."""

    is_write: bool


def parse_mix(text: str) -> tuple[Access, ...]:
    """``"4w1r"`` -> four writes then one read, in the order written; a bare letter counts once."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or not re.fullmatch(r"(\d*[rw])+", compact):
        raise GuestError(f"--mix {text!r}: expected counts and letters like 1r, 4w1r or 2r2w (r = read, w = write)")
    body: list[Access] = []
    for count, letter in re.findall(r"(\d*)([rw])", compact):
        n = int(count) if count else 1
        if n == 0:
            raise GuestError(f"--mix {text!r}: a count of 0 {letter!r} makes no access")
        body += [Access(letter == "w")] * n
    if len(body) > MAX_MIX:
        raise GuestError(f"--mix {text!r}: {len(body)} accesses per iteration; at most {MAX_MIX}")
    return tuple(body)


def mix_text(mix: tuple[Access, ...]) -> str:
    """The canonical spelling of a mix (runs of the same direction merged): ``4w1r``."""
    out: list[str] = []
    for access in mix:
        letter = "w" if access.is_write else "r"
        if out and out[-1][-1] == letter:
            out[-1] = f"{int(out[-1][:-1]) + 1}{letter}"
        else:
            out.append(f"1{letter}")
    return "".join(out)


def _check(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise GuestError(f"{what} {value:#x} out of range {lo:#x}..{hi:#x}")
    return value


# ----- A64 -------------------------------------------------------------------------------------------------
class A64:
    """The few A64 encodings the guest needs (checked against capstone in the unit tests)."""

    HVC0 = 0xD400_0002

    @staticmethod
    def movz(rd: int, imm16: int, hw: int = 0) -> int:
        return 0xD280_0000 | hw << 21 | _check(imm16, 0, 0xFFFF, "imm16") << 5 | rd

    @staticmethod
    def movk(rd: int, imm16: int, hw: int) -> int:
        return 0xF280_0000 | hw << 21 | _check(imm16, 0, 0xFFFF, "imm16") << 5 | rd

    @staticmethod
    def mov_imm(rd: int, value: int) -> list[int]:
        value &= (1 << 64) - 1
        words = [A64.movz(rd, value & 0xFFFF)]
        words += [A64.movk(rd, (value >> (16 * hw)) & 0xFFFF, hw) for hw in (1, 2, 3) if (value >> (16 * hw)) & 0xFFFF]
        return words

    @staticmethod
    def mov(rd: int, rm: int) -> int:
        """MOV Xd, Xm (ORR Xd, XZR, Xm)."""
        return 0xAA00_03E0 | rm << 16 | rd

    @staticmethod
    def ldst(size: int, is_load: bool, rt: int, rn: int, offset: int = 0) -> int:
        """STR/LDR{B,H,,} Wt (Xt for 8 bytes), [Xn, #offset] (unsigned offset, zero-extending loads)."""
        sz = {1: 0, 2: 1, 4: 2, 8: 3}[size]
        imm12 = _check(offset // size, 0, 0xFFF, "offset/size")
        return 0x3900_0000 | sz << 30 | int(is_load) << 22 | imm12 << 10 | rn << 5 | rt

    @staticmethod
    def ldr_x_index(rt: int, rn: int, rm: int) -> int:
        """LDR Xt, [Xn, Xm, LSL #3]."""
        return 0xF860_7800 | rm << 16 | rn << 5 | rt

    @staticmethod
    def add_imm(rd: int, rn: int, imm12: int) -> int:
        return 0x9100_0000 | _check(imm12, 0, 0xFFF, "imm12") << 10 | rn << 5 | rd

    @staticmethod
    def add_lsl(rd: int, rn: int, rm: int, shift: int) -> int:
        """ADD Xd, Xn, Xm, LSL #shift."""
        return 0x8B00_0000 | rm << 16 | _check(shift, 0, 63, "shift") << 10 | rn << 5 | rd

    @staticmethod
    def add_reg(rd: int, rn: int, rm: int) -> int:
        return A64.add_lsl(rd, rn, rm, 0)

    @staticmethod
    def subs_imm(rd: int, rn: int, imm12: int) -> int:
        return 0xF100_0000 | _check(imm12, 0, 0xFFF, "imm12") << 10 | rn << 5 | rd

    @staticmethod
    def b(src: int, dst: int) -> int:
        return 0x1400_0000 | (((dst - src) >> 2) & 0x3FF_FFFF)

    @staticmethod
    def b_ne(src: int, dst: int) -> int:
        return 0x5400_0001 | (((dst - src) >> 2) & 0x7FFFF) << 5

    @staticmethod
    def cbz_w(rt: int, src: int, dst: int) -> int:
        return 0x3400_0000 | (((dst - src) >> 2) & 0x7FFFF) << 5 | rt

    @staticmethod
    def cbz_x(rt: int, src: int, dst: int) -> int:
        return 0xB400_0000 | (((dst - src) >> 2) & 0x7FFFF) << 5 | rt

    @staticmethod
    def cbnz_x(rt: int, src: int, dst: int) -> int:
        return 0xB500_0000 | (((dst - src) >> 2) & 0x7FFFF) << 5 | rt

    WFI = 0xD503_207F
    ISB = 0xD503_3FDF
    ERET = 0xD69F_03E0
    DAIFCLR_I = 0xD503_42FF  # MSR DAIFClr, #2 (unmask IRQ)
    DAIFSET_I = 0xD503_42DF  # MSR DAIFSet, #2

    @staticmethod
    def msr_vbar_el1(rt: int) -> int:
        return 0xD518_C000 | rt

    @staticmethod
    def cmp_reg(rn: int, rm: int) -> int:
        """CMP Xn, Xm (SUBS XZR, Xn, Xm)."""
        return 0xEB00_001F | rm << 16 | rn << 5

    @staticmethod
    def mov_imm32_fixed(rd: int, value: int) -> list[int]:
        """MOVZ + MOVK of a 32-bit value: always two words, so a forward address can be patched in."""
        return [A64.movz(rd, value & 0xFFFF), A64.movk(rd, (value >> 16) & 0xFFFF, 1)]


# ----- A32 -------------------------------------------------------------------------------------------------
class A32:
    """The few A32 encodings the guest needs (condition AL unless named)."""

    HVC0 = 0xE140_0070

    @staticmethod
    def movw(rd: int, imm16: int) -> int:
        _check(imm16, 0, 0xFFFF, "imm16")
        return 0xE300_0000 | (imm16 >> 12) << 16 | rd << 12 | (imm16 & 0xFFF)

    @staticmethod
    def movt(rd: int, imm16: int) -> int:
        return A32.movw(rd, imm16) | 0x40_0000

    @staticmethod
    def mov_imm(rd: int, value: int) -> list[int]:
        value &= 0xFFFF_FFFF
        words = [A32.movw(rd, value & 0xFFFF)]
        if value >> 16:
            words.append(A32.movt(rd, value >> 16))
        return words

    @staticmethod
    def mov(rd: int, rm: int) -> int:
        return 0xE1A0_0000 | rd << 12 | rm

    @staticmethod
    def ldst(size: int, is_load: bool, rt: int, rn: int, offset: int = 0) -> int:
        """STR/LDR{B,H,} Rt, [Rn, #offset]."""
        load = int(is_load) << 20
        if size == 2:
            imm8 = _check(offset, 0, 0xFF, "offset")
            return 0xE1C0_00B0 | load | rn << 16 | rt << 12 | (imm8 >> 4) << 8 | (imm8 & 0xF)
        imm12 = _check(offset, 0, 0xFFF, "offset")
        byte = {1: 1 << 22, 4: 0}[size]
        return 0xE580_0000 | byte | load | rn << 16 | rt << 12 | imm12

    @staticmethod
    def ldr_index(rt: int, rn: int, rm: int) -> int:
        """LDR Rt, [Rn, Rm, LSL #2]."""
        return 0xE790_0100 | rn << 16 | rt << 12 | rm

    @staticmethod
    def add_lsl(rd: int, rn: int, rm: int, shift: int) -> int:
        """ADD Rd, Rn, Rm, LSL #shift."""
        return 0xE080_0000 | rn << 16 | rd << 12 | _check(shift, 0, 31, "shift") << 7 | rm

    @staticmethod
    def add_imm(rd: int, rn: int, imm8: int) -> int:
        """ADD Rd, Rn, #imm8 (no rotation)."""
        return 0xE280_0000 | rn << 16 | rd << 12 | _check(imm8, 0, 0xFF, "imm8")

    @staticmethod
    def subs_imm(rd: int, rn: int, imm8: int) -> int:
        return 0xE250_0000 | rn << 16 | rd << 12 | _check(imm8, 0, 0xFF, "imm8")

    @staticmethod
    def cmp_imm(rn: int, imm8: int) -> int:
        return 0xE350_0000 | rn << 16 | _check(imm8, 0, 0xFF, "imm8")

    @staticmethod
    def b(src: int, dst: int, cond: int = 0xE) -> int:
        return cond << 28 | 0x0A00_0000 | (((dst - src - 8) >> 2) & 0xFF_FFFF)

    @staticmethod
    def b_ne(src: int, dst: int) -> int:
        return A32.b(src, dst, 0x1)

    @staticmethod
    def b_eq(src: int, dst: int) -> int:
        return A32.b(src, dst, 0x0)

    WFI = 0xE320_F003
    ISB = 0xF57F_F06F
    CPSIE_I = 0xF108_0080
    CPSID_I = 0xF10C_0080
    ERET_IRQ = 0xE25E_F004  # SUBS PC, LR, #4: return from an IRQ

    @staticmethod
    def mcr_vbar(rt: int) -> int:
        """MCR p15, 0, Rt, c12, c0, 0 (VBAR)."""
        return 0xEE0C_0F10 | rt << 12

    @staticmethod
    def cmp_reg(rn: int, rm: int) -> int:
        return 0xE150_0000 | rn << 16 | rm

    @staticmethod
    def mov_imm32_fixed(rd: int, value: int) -> list[int]:
        """MOVW + MOVT: always two words, so a forward address can be patched in."""
        return [A32.movw(rd, value & 0xFFFF), A32.movt(rd, (value >> 16) & 0xFFFF)]


# ----- the program -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IrqTarget:
    """The interrupt loop's device and GIC: each iteration writes ``fire`` (the device raises its line later, on
    its own), sleeps in WFI with IRQs masked, unmasks; the handler reads GICC_IAR, writes ``ack`` (the device
    lowers the line), writes GICC_EOIR and returns."""

    gicd: int
    gicc: int
    spi: int
    fire: int
    ack: int
    delay: int  # the register the guest writes ``delay_us`` to before the loop (-1: none)
    delay_us: int = 0


@dataclass(frozen=True)
class GuestProgram:
    """A generated image and where its parts are (for the load tester and for the tests)."""

    arch: str
    image: bytes
    load_address: int
    entry: int
    go_address: int
    ready_addresses: tuple[int, ...]
    warm_loop: tuple[int, int]  # [start, end) of the warm-up loop body and its branch; (0, 0) if none
    main_loop: tuple[int, int]  # [start, end) of the measured loop, its back branch included
    stop_address: int = 0  # compute programs: the address of the SYSTEM_OFF HVC (bare Unicorn stops there)

    @property
    def code(self) -> bytes:
        return self.image[CODE_OFFSET:]

    @property
    def code_address(self) -> int:
        return self.load_address + CODE_OFFSET


class _Asm:
    """A list of words with the address of the next one, and forward branches patched later."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.words: list[int] = []

    @property
    def here(self) -> int:
        return self.base + 4 * len(self.words)

    def emit(self, *words: int | list[int]) -> None:
        for w in words:
            if isinstance(w, list):
                self.words.extend(w)
            else:
                self.words.append(w)

    def hole(self) -> int:
        self.words.append(0)
        return self.base + 4 * (len(self.words) - 1)

    def patch(self, at: int, word: int) -> None:
        self.words[(at - self.base) // 4] = word

    def bytes(self) -> bytes:
        return struct.pack(f"<{len(self.words)}I", *self.words)


def iterations_for(exits: int, mix: tuple[Access, ...], posted: bool) -> int:
    """Loop iterations that make at least ``exits`` exits (posted writes when the mix has nothing else)."""
    per = sync_exits_per_iteration(mix, posted) or len(mix)
    return max(1, -(-exits // per))


def sync_exits_per_iteration(mix: tuple[Access, ...], posted: bool) -> int:
    """Synchronous exits one iteration makes: every read, and the writes unless they are posted."""
    return sum(1 for a in mix if not (a.is_write and posted))


def build_program(arch: str, mix: tuple[Access, ...], size: int, device_addresses: list[int],
                  warmup_iterations: int, iterations: int, irq: IrqTarget | None = None) -> GuestProgram:
    """The load tester's guest for ``len(device_addresses)`` vCPUs; ``iterations`` 0 loops forever.

    vCPU i accesses ``device_addresses[i]``; the write data is the loop counter. With ``irq`` the loop body is
    one interrupt round (``IrqTarget``) instead of the mix, on one vCPU.
    """
    if irq is not None and len(device_addresses) != 1:
        raise GuestError("--irq: the interrupt loop runs on one vCPU (--vcpus 1)")
    vcpus = len(device_addresses)
    if arch not in ARCHES:
        raise GuestError(f"--arch {arch!r}: expected one of {', '.join(ARCHES)}")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise GuestError(f"--vcpus {vcpus}: expected 1 to {MAX_VCPUS}")
    if size not in SIZES:
        raise GuestError(f"--size {size}: expected 1, 2, 4 or 8")
    if arch == "arm" and size == 8:
        raise GuestError("--size 8 needs --arch aarch64: A32 has no single-register 64-bit load or store "
                         "(LDRD/STRD carry no syndrome, so KVM cannot take them as MMIO exits)")
    if not mix:
        raise GuestError("--mix: the loop needs at least one access")
    if arch == "arm" and any(a > 0xFFFF_FFFF for a in device_addresses):
        raise GuestError("--device: a 32-bit guest cannot reach a device above 4 GiB")
    if warmup_iterations < 0 or iterations < 0 or max(warmup_iterations, iterations) >= 1 << 32:
        raise GuestError("--exits/--warmup: iteration counts must be 0 to 2^32-1")
    if arch == "aarch64":
        return _build_a64(mix, size, device_addresses, warmup_iterations, iterations, irq)
    return _build_a32(mix, size, device_addresses, warmup_iterations, iterations, irq)


A32_UDF = 0xE7F0_00F0
GICD_CTLR, GICD_ISENABLER, GICD_ITARGETSR = 0x000, 0x100, 0x800
GICC_CTLR, GICC_PMR, GICC_IAR, GICC_EOIR = 0x00, 0x04, 0x0C, 0x10


def _gic_setup(irq: IrqTarget) -> list[tuple[str, int, int]]:
    """(d: distributor / c: CPU interface / dev: the device, offset, value) writes that set the device's delay
    and enable the SPI for CPU 0 and the GIC."""
    intid = 32 + irq.spi
    writes = [("dev", irq.delay, irq.delay_us)] if irq.delay >= 0 else []
    return [*writes, ("d", GICD_ISENABLER + 4 * (intid // 32), 1 << intid % 32),
            ("d", GICD_ITARGETSR + (intid & ~3), 1 << 8 * (intid % 4)),
            ("d", GICD_CTLR, 1), ("c", GICC_PMR, 0xF0), ("c", GICC_CTLR, 1)]


def _data_page(arch: str, device_addresses: list[int]) -> bytearray:
    page = bytearray(CODE_OFFSET)
    fmt, stride = ("<Q", 8) if arch == "aarch64" else ("<I", 4)
    for i, address in enumerate(device_addresses):
        struct.pack_into(fmt, page, TABLE_OFFSET + stride * i, address)
    return page


def _program(arch: str, device_addresses: list[int], asm: _Asm, warm: tuple[int, int],
             main: tuple[int, int]) -> GuestProgram:
    image = bytes(_data_page(arch, device_addresses)) + asm.bytes()
    return GuestProgram(arch, image, IMAGE_BASE, IMAGE_BASE + CODE_OFFSET, IMAGE_BASE + GO_OFFSET,
                        tuple(IMAGE_BASE + READY_OFFSET + 8 * i for i in range(len(device_addresses))), warm, main)


def _build_a64(mix: tuple[Access, ...], size: int, device_addresses: list[int], warm_n: int,
               main_n: int, irq: IrqTarget | None = None) -> GuestProgram:
    # x19 vCPU index, x20 device address, x21 loop counter (and the write data), x22 ready flag,
    # x24 data page, x2 read target, x0-x3 PSCI arguments; with irq: x25 GICD, x23 GICC, x27 interrupts
    # handled, x28 the count the current round waits for, x9 the handler's.
    vcpus = len(device_addresses)
    entry = IMAGE_BASE + CODE_OFFSET
    a = _Asm(entry)
    a.emit(A64.mov(19, 0), A64.mov_imm(24, IMAGE_BASE))
    if vcpus > 1:
        skip = a.hole()
        for i in range(1, vcpus):
            a.emit(A64.mov_imm(0, PSCI_CPU_ON_64), A64.mov_imm(1, i), A64.mov_imm(2, entry), A64.mov_imm(3, i),
                   A64.HVC0)
        a.patch(skip, A64.cbnz_x(19, skip, a.here))
    a.emit(A64.add_imm(25, 24, TABLE_OFFSET), A64.ldr_x_index(20, 25, 19),
           A64.add_imm(22, 24, READY_OFFSET), A64.add_lsl(22, 22, 19, 3))
    vbar = 0
    if irq is not None:
        vbar = a.here
        a.emit(A64.mov_imm32_fixed(0, 0), A64.msr_vbar_el1(0), A64.ISB)
        a.emit(A64.mov_imm(25, irq.gicd), A64.mov_imm(23, irq.gicc), A64.movz(27, 0))
        for reg, offset, value in _gic_setup(irq):
            a.emit(A64.mov_imm(0, value), A64.ldst(4, False, 0, {"d": 25, "c": 23, "dev": 20}[reg], offset))

    def body() -> None:
        if irq is not None:
            a.emit(A64.add_imm(28, 27, 1), A64.ldst(4, False, 21, 20, irq.fire))
            wait = a.here
            a.emit(A64.WFI, A64.DAIFCLR_I, A64.ISB, A64.DAIFSET_I, A64.cmp_reg(27, 28))
            a.emit(A64.b_ne(a.here, wait))
            return
        for access in mix:
            a.emit(A64.ldst(size, not access.is_write, 21 if access.is_write else 2, 20))

    warm = (0, 0)
    if warm_n:
        a.emit(A64.mov_imm(21, warm_n))
        start = a.here
        body()
        a.emit(A64.subs_imm(21, 21, 1))
        a.emit(A64.b_ne(a.here, start))
        warm = (start, a.here)
    a.emit(A64.movz(0, 1), A64.ldst(4, False, 0, 22))  # ready = 1
    spin = a.here
    a.emit(A64.ldst(4, True, 0, 24))  # w0 = go
    a.emit(A64.cbz_w(0, a.here, spin))
    if main_n:
        a.emit(A64.mov_imm(21, main_n))
    start = a.here
    body()
    if main_n:
        a.emit(A64.subs_imm(21, 21, 1))
        a.emit(A64.b_ne(a.here, start))
    else:
        a.emit(A64.b(a.here, start))
    main = (start, a.here)
    if main_n:
        a.emit(A64.add_imm(26, 24, DONE_OFFSET))
        if vcpus > 1:
            primary = a.hole()
            a.emit(A64.add_lsl(26, 26, 19, 3), A64.movz(0, 1), A64.ldst(4, False, 0, 26),
                   A64.mov_imm(0, PSCI_CPU_OFF), A64.HVC0)
            a.emit(A64.b(a.here, a.here))
            a.patch(primary, A64.cbz_x(19, primary, a.here))  # vCPU 0 waits below for the others' done flags
            for i in range(1, vcpus):
                wait = a.here
                a.emit(A64.ldst(4, True, 0, 26, 8 * i))
                a.emit(A64.cbz_w(0, a.here, wait))
        a.emit(A64.mov_imm(0, PSCI_SYSTEM_OFF), A64.HVC0)
        a.emit(A64.b(a.here, a.here))
    if irq is not None:
        # The vector table (2 KiB aligned, 16 entries of 0x80): IRQ from the current EL (SP_EL0 and SP_ELx)
        # goes to the handler; every other entry is UDF, so an unexpected exception loops there and the vcpu
        # service ends the run naming it.
        while a.here % 0x800:
            a.emit(0)
        vectors = a.here
        for entry in range(16):
            slot = a.here
            a.emit([0] * 32)
            if entry in (1, 5):
                a.patch(slot, A64.b(slot, vectors + 0x800))
        a.emit(A64.ldst(4, True, 9, 23, GICC_IAR), A64.ldst(4, False, 9, 20, irq.ack),
               A64.ldst(4, False, 9, 23, GICC_EOIR), A64.add_imm(27, 27, 1), A64.ERET)
        for i, word in enumerate(A64.mov_imm32_fixed(0, vectors)):
            a.patch(vbar + 4 * i, word)
    return _program("aarch64", device_addresses, a, warm, main)


def _build_a32(mix: tuple[Access, ...], size: int, device_addresses: list[int], warm_n: int,
               main_n: int, irq: IrqTarget | None = None) -> GuestProgram:
    # r4 vCPU index, r5 device address, r6 loop counter (and the write data), r7 ready flag, r8 data page,
    # r9 scratch, r2 read target, r0-r3 PSCI arguments; with irq: r11 GICC, r12 interrupts handled, r3 the
    # count the current round waits for, r10 the handler's.
    vcpus = len(device_addresses)
    entry = IMAGE_BASE + CODE_OFFSET
    a = _Asm(entry)
    a.emit(A32.mov(4, 0), A32.mov_imm(8, IMAGE_BASE))
    if vcpus > 1:
        a.emit(A32.cmp_imm(4, 0))
        skip = a.hole()
        for i in range(1, vcpus):
            a.emit(A32.mov_imm(0, PSCI_CPU_ON_32), A32.mov_imm(1, i), A32.mov_imm(2, entry), A32.mov_imm(3, i),
                   A32.HVC0)
        a.patch(skip, A32.b_ne(skip, a.here))
    a.emit(A32.mov_imm(9, IMAGE_BASE + TABLE_OFFSET), A32.ldr_index(5, 9, 4),
           A32.mov_imm(7, IMAGE_BASE + READY_OFFSET), A32.add_lsl(7, 7, 4, 3))
    vbar = 0
    if irq is not None:
        vbar = a.here
        a.emit(A32.mov_imm32_fixed(0, 0), A32.mcr_vbar(0), A32.ISB)
        a.emit(A32.mov_imm(9, irq.gicd), A32.mov_imm(11, irq.gicc), A32.mov_imm(12, 0))
        for reg, offset, value in _gic_setup(irq):
            a.emit(A32.mov_imm(0, value), A32.ldst(4, False, 0, {"d": 9, "c": 11, "dev": 5}[reg], offset))

    def body() -> None:
        if irq is not None:
            a.emit(A32.add_imm(3, 12, 1), A32.ldst(4, False, 6, 5, irq.fire))
            wait = a.here
            a.emit(A32.WFI, A32.CPSIE_I, A32.ISB, A32.CPSID_I, A32.cmp_reg(12, 3))
            a.emit(A32.b_ne(a.here, wait))
            return
        for access in mix:
            a.emit(A32.ldst(size, not access.is_write, 6 if access.is_write else 2, 5))

    warm = (0, 0)
    if warm_n:
        a.emit(A32.mov_imm(6, warm_n))
        start = a.here
        body()
        a.emit(A32.subs_imm(6, 6, 1))
        a.emit(A32.b_ne(a.here, start))
        warm = (start, a.here)
    a.emit(A32.mov_imm(0, 1), A32.ldst(4, False, 0, 7))  # ready = 1
    spin = a.here
    a.emit(A32.ldst(4, True, 0, 8), A32.cmp_imm(0, 0))
    a.emit(A32.b_eq(a.here, spin))
    if main_n:
        a.emit(A32.mov_imm(6, main_n))
    start = a.here
    body()
    if main_n:
        a.emit(A32.subs_imm(6, 6, 1))
        a.emit(A32.b_ne(a.here, start))
    else:
        a.emit(A32.b(a.here, start))
    main = (start, a.here)
    if main_n:
        a.emit(A32.mov_imm(9, IMAGE_BASE + DONE_OFFSET))
        if vcpus > 1:
            a.emit(A32.cmp_imm(4, 0))
            primary = a.hole()
            a.emit(A32.add_lsl(9, 9, 4, 3), A32.mov_imm(0, 1), A32.ldst(4, False, 0, 9),
                   A32.mov_imm(0, PSCI_CPU_OFF), A32.HVC0)
            a.emit(A32.b(a.here, a.here))
            a.patch(primary, A32.b_eq(primary, a.here))  # vCPU 0 waits below for the others' done flags
            for i in range(1, vcpus):
                wait = a.here
                a.emit(A32.ldst(4, True, 0, 9, 8 * i), A32.cmp_imm(0, 0))
                a.emit(A32.b_eq(a.here, wait))
        a.emit(A32.mov_imm(0, PSCI_SYSTEM_OFF), A32.HVC0)
        a.emit(A32.b(a.here, a.here))
    if irq is not None:
        # The vector table (32-byte aligned, 8 entries): IRQ (0x18) goes to the handler, every other entry is
        # UDF, so an unexpected exception loops there and the vcpu service ends the run naming it.
        while a.here % 0x20:
            a.emit(A32_UDF)
        vectors = a.here
        a.emit([A32_UDF] * 8)
        a.patch(vectors + 0x18, A32.b(vectors + 0x18, vectors + 0x20))
        a.emit(A32.ldst(4, True, 10, 11, GICC_IAR), A32.ldst(4, False, 10, 5, irq.ack),
               A32.ldst(4, False, 10, 11, GICC_EOIR), A32.add_imm(12, 12, 1), A32.ERET_IRQ)
        for i, word in enumerate(A32.mov_imm32_fixed(0, vectors)):
            a.patch(vbar + 4 * i, word)
    return _program("arm", device_addresses, a, warm, main)


def build_compute_program(arch: str, iterations: int) -> GuestProgram:
    """A guest that never touches a device: ``iterations`` of load, add, store (RAM) and ALU work.

    Six instructions per iteration, then SYSTEM_OFF; ``stop_address`` is that HVC, where a bare Unicorn
    run of the same code stops, so both execute the same instructions.
    """
    if arch not in ARCHES:
        raise GuestError(f"--arch {arch!r}: expected one of {', '.join(ARCHES)}")
    if not 1 <= iterations < 1 << 32:
        raise GuestError(f"iterations {iterations}: expected 1 to 2^32-1")
    entry = IMAGE_BASE + CODE_OFFSET
    a = _Asm(entry)
    if arch == "aarch64":
        a.emit(A64.mov_imm(1, COMPUTE_SLOT), A64.mov_imm(2, iterations))
        loop = a.here
        a.emit(A64.ldst(8, True, 3, 1), A64.add_imm(3, 3, 1), A64.ldst(8, False, 3, 1), A64.add_reg(4, 4, 3),
               A64.subs_imm(2, 2, 1))
        a.emit(A64.b_ne(a.here, loop))
        main = (loop, a.here)
        a.emit(A64.mov_imm(0, PSCI_SYSTEM_OFF))
        stop = a.here
        a.emit(A64.HVC0, A64.b(a.here + 4, a.here + 4))
    else:
        a.emit(A32.mov_imm(1, COMPUTE_SLOT), A32.mov_imm(2, iterations))
        loop = a.here
        a.emit(A32.ldst(4, True, 3, 1), A32.add_imm(3, 3, 1), A32.ldst(4, False, 3, 1),
               A32.add_lsl(4, 4, 3, 0), A32.subs_imm(2, 2, 1))
        a.emit(A32.b_ne(a.here, loop))
        main = (loop, a.here)
        a.emit(A32.mov_imm(0, PSCI_SYSTEM_OFF))
        stop = a.here
        a.emit(A32.HVC0, A32.b(a.here + 4, a.here + 4))
    image = bytes(CODE_OFFSET) + a.bytes()
    return GuestProgram(arch, image, IMAGE_BASE, entry, IMAGE_BASE + GO_OFFSET, (), (0, 0), main, stop)


COMPUTE_INSTRUCTIONS_PER_ITERATION = 6
