"""Guests that raise one synchronous exception each, for test_guest_exceptions.py: vector tables whose every entry
records what the handler sees, MMU set-up, and the same images run under QEMU with ``-d int`` to check the
syndromes against it.

The guests are self-contained (no register is preset), so QEMU runs the very image the harness builds. The guest
code is literal instruction words assembled with llvm-mc (the source is in the comments).

A64: the vector table is at ``EXC_VBAR``, each of its 16 entries the same handler: x19 = x0, x20 = ESR_EL1,
x21 = FAR_EL1, x22 = ELR_EL1, x23 = SPSR_EL1, x24 = the entry's address, then PSCI SYSTEM_OFF.
AArch32: ``EXC_VBAR`` holds eight branches to eight stubs (r7 = the vector's index), then one handler (ARM state):
r4 = CPSR, r5 = IFSR, r6 = IFAR, r8 = r0, r9 = DFSR, r10 = DFAR, r11 = LR_<mode>, r12 = SPSR_<mode>, SYSTEM_OFF.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.differential.encoders import A64 as E64
from tests.exitpath.harness import (
    A32,
    A64,
    LOAD,
    T32,
    Result,
    build_image,
    entry_point,
    words,
)

EXC_VBAR = LOAD + 0x3000
TABLES = LOAD + 0x4000  # A64: the level-1 table; AArch32: the 16 KiB first-level table (16 KiB aligned)
UNMAPPED_VA = 0x8000_0000  # AArch64 level-1 entry 2 / AArch32 section 0x800: invalid unless a test maps it

A64_HANDLER = [
    0xAA0003F3,  # mov  x19, x0
    0xD5385214,  # mrs  x20, esr_el1
    0xD5386015,  # mrs  x21, far_el1
    0xD5384036,  # mrs  x22, elr_el1
    0xD5384017,  # mrs  x23, spsr_el1
    0x10000018,  # adr  x24, .
    0xD2800100,  # mov  x0, #8
    0xF2B08000,  # movk x0, #0x8400, lsl #16   (PSCI SYSTEM_OFF)
    0xD4000002,  # hvc  #0
]
A64_SET_VBAR = [
    *E64.mov_imm(9, EXC_VBAR),  # mov x9, #EXC_VBAR
    0xD518C009,  # msr  vbar_el1, x9
    0xD5033FDF,  # isb
]
A64_TO_EL0 = [  # ERET to the next instruction at EL0t
    0xD518401F,  # msr  spsr_el1, xzr
    0x10000069,  # adr  x9, .+12
    0xD5184029,  # msr  elr_el1, x9
    0xD69F03E0,  # eret
]
# 4 KiB granule, 39-bit VA (T0SZ 25, the walk starts at level 1), inner/outer write-back, inner shareable.
A64_TCR = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32)
A64_MAIR = 0xFF00  # Attr0 Device-nGnRnE, Attr1 Normal write-back
A64_MMU_ON = [
    *E64.mov_imm(2, A64_MAIR),
    *E64.mov_imm(3, A64_TCR),
    *E64.mov_imm(4, TABLES),
    0xD518A202,  # msr  mair_el1, x2
    0xD5182043,  # msr  tcr_el1, x3
    0xD5182004,  # msr  ttbr0_el1, x4
    0xD5033FDF,  # isb
    0xD5381005,  # mrs  x5, sctlr_el1
    0xB24000A5,  # orr  x5, x5, #1              (M)
    0xD5181005,  # msr  sctlr_el1, x5
    0xD5033FDF,  # isb
]


def a64_block(base: int, *, read_only: bool = False, el0: bool = False, pxn: bool = False) -> bytes:
    """A level-1 block descriptor (1 GiB) of Normal memory: access flag, inner shareable, AP and PXN as asked."""
    desc = base | (1 << 2) | (3 << 8) | (1 << 10) | 1
    desc |= (1 << 7) if read_only else 0  # AP[2]: read-only
    desc |= (1 << 6) if el0 else 0  # AP[1]: EL0 access
    desc |= (1 << 53) if pxn else 0
    return desc.to_bytes(8, "little")


def a64_tables(entry2: bytes = bytes(8), *, el0: bool = False) -> bytes:
    """Level 1: [0] devices (Device-nGnRnE), [1] RAM, [2] ``entry2`` (invalid by default). With ``el0``, RAM is
    read-only at EL0 and EL1 (memory EL0 may write is never executable at EL1)."""
    device = (0 | (3 << 8) | (1 << 10) | 1 | (1 << 54) | (1 << 53)).to_bytes(8, "little")
    return device + a64_block(0x4000_0000, el0=el0, read_only=el0) + entry2


def a64_vectors() -> bytes:
    table = bytearray(0x800)
    handler = words(*A64_HANDLER)
    for entry in range(16):
        table[entry * 0x80:entry * 0x80 + len(handler)] = handler
    return bytes(table)


# ----- AArch32 ---------------------------------------------------------------------------------------------

def _a32_vector_words() -> list[int]:
    # 0x00-0x1c: b 0x20 + 8*i;  0x20 + 8*i: mov r7, #i; b common (0x60)
    out = []
    for i in range(8):
        target = 0x20 + 8 * i
        out.append(0xEA000000 | (((target - (4 * i + 8)) >> 2) & 0xFFFFFF))
    for i in range(8):
        here = 0x20 + 8 * i + 4
        out += [0xE3A07000 | i, 0xEA000000 | (((0x60 - (here + 8)) >> 2) & 0xFFFFFF)]  # mov r7, #i; b common
    out += [
        0xE1A08000,  # mov  r8, r0
        0xEE159F10,  # mrc  p15, 0, r9, c5, c0, 0    (DFSR)
        0xEE16AF10,  # mrc  p15, 0, r10, c6, c0, 0   (DFAR)
        0xE1A0B00E,  # mov  r11, lr
        0xE14FC000,  # mrs  r12, spsr
        0xEE155F30,  # mrc  p15, 0, r5, c5, c0, 1    (IFSR)
        0xEE166F50,  # mrc  p15, 0, r6, c6, c0, 2    (IFAR)
        0xE10F4000,  # mrs  r4, cpsr
        0xE3000008,  # movw r0, #8
        0xE3480400,  # movt r0, #0x8400              (PSCI SYSTEM_OFF)
        0xE1400070,  # hvc  #0
    ]
    return out


A32_SET_VBAR = [
    0xE3000000 | ((EXC_VBAR & 0xF000) << 4) | (EXC_VBAR & 0xFFF),  # movw r0, #lo16(EXC_VBAR)
    0xE3400000 | ((EXC_VBAR >> 28) << 16) | ((EXC_VBAR >> 16) & 0xFFF),  # movt r0, #hi16(EXC_VBAR)
    0xEE0C0F10,  # mcr  p15, 0, r0, c12, c0, 0   (VBAR)
    0xF57FF06F,  # isb
]
T32_SET_VBAR = [
    0xF243, 0x0000,  # movw r0, #0x3000
    0xF2C4, 0x0008,  # movt r0, #0x4008
    0xEE0C, 0x0F10,  # mcr  p15, 0, r0, c12, c0, 0
    0xF3BF, 0x8F6F,  # isb  sy
]
A32_TO_USER = [0xF1020010]  # cps #0x10
T32_TO_USER = [0xF3AF, 0x8110]  # cps #0x10


A32_MMU_ON = [  # short-descriptor tables at TABLES (TTBCR 0), domain 0 client, SCTLR.M
    0xE3040000,  # movw r0, #0x4000
    0xE3440008,  # movt r0, #0x4008              (TABLES)
    0xEE020F10,  # mcr  p15, 0, r0, c2, c0, 0    (TTBR0)
    0xE3A00000,  # mov  r0, #0
    0xEE020F50,  # mcr  p15, 0, r0, c2, c0, 2    (TTBCR)
    0xE3A00001,  # mov  r0, #1
    0xEE030F10,  # mcr  p15, 0, r0, c3, c0, 0    (DACR: domain 0 client)
    0xEE110F10,  # mrc  p15, 0, r0, c1, c0, 0
    0xE3800001,  # orr  r0, r0, #1
    0xEE010F10,  # mcr  p15, 0, r0, c1, c0, 0    (SCTLR.M)
    0xF57FF06F,  # isb
]


A32_LPAE_MMU_ON = [  # long-descriptor tables at TABLES (TTBCR.EAE, T0SZ 0: the walk starts at level 1)
    0xE3040000,  # movw r0, #0x4000
    0xE3440008,  # movt r0, #0x4008              (TABLES)
    0xE3A01000,  # mov  r1, #0
    0xEC410F02,  # mcrr p15, 0, r0, r1, c2       (TTBR0, 64-bit)
    0xE3A00102,  # mov  r0, #0x80000000
    0xEE020F50,  # mcr  p15, 0, r0, c2, c0, 2    (TTBCR: EAE)
    0xE30F0F00,  # movw r0, #0xff00
    0xEE0A0F12,  # mcr  p15, 0, r0, c10, c2, 0   (MAIR0: Attr0 Device, Attr1 Normal write-back)
    0xEE110F10,  # mrc  p15, 0, r0, c1, c0, 0
    0xE3800001,  # orr  r0, r0, #1
    0xEE010F10,  # mcr  p15, 0, r0, c1, c0, 0    (SCTLR.M)
    0xF57FF06F,  # isb
]


def a32_lpae_tables(entry2: int = 0) -> bytes:
    """Level 1 (1 GiB blocks): [0] devices, [1] RAM (Normal, PL1 read/write), [2] ``entry2``, [3] invalid."""
    device = 0x0000_0000 | (1 << 10) | 0x1
    ram = 0x4000_0000 | (1 << 10) | (3 << 8) | (1 << 2) | 0x1
    return b"".join(d.to_bytes(8, "little") for d in (device, ram, entry2, 0))


def a32_lpae_block(base: int, *, read_only: bool = False) -> int:
    return base | (1 << 10) | (3 << 8) | (1 << 2) | ((1 << 7) if read_only else 0) | 0x1


def a32_section(base: int, *, read_only: bool = False) -> int:
    """A first-level section descriptor (1 MiB), domain 0, strongly ordered: full access, or PL1 read-only."""
    return base | 0x2 | ((1 << 15) | (1 << 10) if read_only else (3 << 10))


def a32_tables(extra: dict[int, int] | None = None) -> bytes:
    """The first-level table: RAM's first MiB (the guest, its vectors and this table) flat, plus ``extra``
    (section index -> descriptor)."""
    table = bytearray(0x4000)
    for index, desc in {0x400: a32_section(0x4000_0000), **(extra or {})}.items():
        table[4 * index:4 * index + 4] = desc.to_bytes(4, "little")
    return bytes(table)


def a32_vectors() -> bytes:
    return words(*_a32_vector_words())


# ----- running the guests here and under QEMU ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Seen:
    """What the handler recorded. A64: ESR/FAR/ELR/SPSR_EL1 and the vector offset. AArch32: ``esr`` is the
    DFSR or IFSR (as ``ifsr`` says), ``far`` DFAR or IFAR, ``elr`` LR_<mode>, ``spsr`` SPSR_<mode>, ``vector`` the
    vector offset and ``mode`` the mode the handler ran in."""

    esr: int
    far: int
    elr: int
    spsr: int
    vector: int
    mode: int = 0
    dfsr: int = 0
    dfar: int = 0
    ifsr: int = 0
    ifar: int = 0

    @property
    def ec(self) -> int:
        return self.esr >> 26


def seen(res: Result) -> Seen:
    assert res.powered_off, res.final
    r = res.regs
    if res.isa == A64:
        assert EXC_VBAR <= r["x24"] < EXC_VBAR + 0x800, (res.final, hex(r["x24"]))
        return Seen(r["x20"], r["x21"], r["x22"], r["x23"], r["x24"] - 4 * 5 - EXC_VBAR)  # the `adr` is the 6th
    vector = 4 * r["r7"]
    abort_prefetch = vector == 0x0C
    return Seen(r["r5"] if abort_prefetch else r["r9"], r["r6"] if abort_prefetch else r["r10"], r["r11"], r["r12"],
                vector, r["r4"] & 0x1F, r["r9"], r["r10"], r["r5"], r["r6"])


def guest_images(isa: str, body: bytes, tables: bytes = b"") -> dict[int, bytes]:
    """Everything the guest needs in RAM besides the harness image: the vector table and page tables."""
    images = {EXC_VBAR: a64_vectors() if isa == A64 else a32_vectors()}
    if tables:
        images[TABLES] = tables
    return images


QEMU = {A64: ("qemu-system-aarch64", "cortex-a57"), A32: ("qemu-system-arm", "cortex-a15"),
        T32: ("qemu-system-arm", "cortex-a15")}


@dataclass(frozen=True, slots=True)
class QemuEntry:
    """One "Taking exception" record of QEMU's ``-d int`` log."""

    number: int
    name: str
    fields: dict[str, int]


def qemu_available(isa: str) -> bool:
    return shutil.which(QEMU[isa][0]) is not None


# QEMU's virt board puts its device tree in the first MiB of RAM, where the harness loads the guest, and refuses
# to load anything over it. So QEMU starts a copy stub above it, which copies the guest where the harness puts it.
QEMU_STUB = 0x4040_0000
STUB = {
    A64: [  # x1 = the table of (dest, src, len) triples, len 0 ends it and is followed by the entry point
        0x10000161,  # adr  x1, table
        0xA8C10C22,  # 1: ldp x2, x3, [x1], #16
        0xF8408424,  # ldr  x4, [x1], #8
        0xB40000C4,  # cbz  x4, 3f
        0xF8408465,  # 2: ldr x5, [x3], #8
        0xF8008445,  # str  x5, [x2], #8
        0xF1002084,  # subs x4, x4, #8
        0x54FFFFA1,  # b.ne 2b
        0x17FFFFF9,  # b    1b
        0xF9400020,  # 3: ldr x0, [x1]
        0xD61F0000,  # br   x0
    ],
    A32: [
        0xE28F1024,  # adr  r1, table
        0xE8B1001C,  # 1: ldm r1!, {r2, r3, r4}
        0xE3540000,  # cmp  r4, #0
        0x0A000004,  # beq  3f
        0xE4935004,  # 2: ldr r5, [r3], #4
        0xE4825004,  # str  r5, [r2], #4
        0xE2544004,  # subs r4, r4, #4
        0x1AFFFFFB,  # bne  2b
        0xEAFFFFF7,  # b    1b
        0xE5910000,  # 3: ldr r0, [r1]
        0xE12FFF10,  # bx   r0
    ],
}


def qemu_boot_image(isa: str, parts: dict[int, bytes]) -> bytes:
    """The copy stub, its table and the parts, as one image to load at QEMU_STUB."""
    wide = isa == A64
    stub = words(*STUB[A64 if wide else A32])
    n = len(parts)
    slot = 8 if wide else 4
    data_at = QEMU_STUB + len(stub) + slot * (3 * n + 4)
    table, blobs = b"", b""
    for dest, blob in parts.items():
        blob = blob + bytes(-len(blob) % 8)
        table += b"".join(v.to_bytes(slot, "little") for v in (dest, data_at + len(blobs), len(blob)))
        blobs += blob
    table += bytes(3 * slot) + entry_point(isa).to_bytes(slot, "little")
    image = stub + table
    return image + bytes(data_at - QEMU_STUB - len(image)) + blobs


def run_qemu(isa: str, body: bytes, ram: dict[int, bytes]) -> list[QemuEntry]:
    """Run the image the harness builds, plus ``ram``, on QEMU's virt board; return the exceptions it logged."""
    binary, cpu = QEMU[isa]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "guest.bin"
        path.write_bytes(qemu_boot_image(isa, {LOAD: build_image(isa, body), **ram}))
        log = Path(tmp) / "int.log"
        cmd = [binary, "-M", "virt", "-cpu", cpu, "-m", "128M", "-nographic", "-monitor", "none", "-serial", "null",
               "-nic", "none", "-no-reboot", "-d", "int", "-D", str(log),
               "-device", f"loader,file={path},addr=0x{QEMU_STUB:x},force-raw=on",
               "-device", f"loader,addr=0x{QEMU_STUB:x},cpu-num=0"]
        subprocess.run(cmd, check=True, timeout=20, capture_output=True)
        return parse_int_log(log.read_text())


_NUM = r"(0x[0-9a-fA-F]+|\d+)"


def parse_int_log(text: str) -> list[QemuEntry]:
    entries: list[QemuEntry] = []
    for line in text.splitlines():
        m = re.match(r"Taking exception (\d+) \[([^\]]+)\]", line)
        if m:
            entries.append(QemuEntry(int(m.group(1)), m.group(2), {}))
            continue
        if not entries:
            continue
        fields = entries[-1].fields
        if m := re.match(r"\.\.\.with ESR 0x[0-9a-f]+/(0x[0-9a-f]+)", line):
            fields["esr"] = int(m.group(1), 16)
        for name in ("FAR", "ELR", "DFSR", "DFAR", "IFSR", "IFAR"):
            if m := re.search(rf"{name} {_NUM}", line):
                fields[name.lower()] = int(m.group(1), 0)
        if m := re.match(r"\.\.\.to EL\d PC (0x[0-9a-f]+)", line):
            fields["pc"] = int(m.group(1), 16)
    return entries

