"""Finish a store-exclusive that a stop from outside cut in half.

Unicorn checks for a stop request after every guest load and store, not only between translation blocks
(``check_exit_request`` in its ``tcg-op.c``), and a stop there resumes *at* the instruction, which runs again.
Loads and plain stores are idempotent, but a store-exclusive is not: its compare-and-swap has stored the new value
when the check fires, before it writes its status register and clears the monitor. Run again, it finds memory
changed, fails, and the guest's retry loop applies the update a second time (measured: an LDXR/ADD/STXR counter
loop stopped from another thread 163 times ended 136 too high). Kicks from outside (interrupts, pauses) happen
all the time, so this would corrupt every lock and counter a guest keeps.

When a vCPU stopped from outside sits on a store-exclusive, ``finish_cut_store`` reads the exclusive monitor
(QEMU's ``exclusive_addr``/``exclusive_val``, found in Unicorn's saved context once per architecture, as
``exceptions.raised`` finds ``env->exception``). If the monitor still covers the address and memory already
holds the value being stored while it no longer holds the value the load-exclusive saw, the store happened:
the instruction is completed by hand (status 0, monitor cleared, PC past it). Otherwise it has not run, and
running it again is right.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from unicorn import UC_PROT_ALL, Uc
from unicorn import arm64_const as a64
from unicorn import arm_const as a32

from vcpu_service import fastreg
from vcpu_service.arch import AArch64, Arch, ArchError, close_uc

_MONITOR = struct.Struct("<QQQ")  # exclusive_addr, exclusive_val, exclusive_high (target/arm/cpu.h)
_PROBE_ADDR = 0x2468
_PROBE_VALUE = 0x1357_9BDF_2468_ACE0
_offsets: dict[str, int] = {}
_lock = threading.Lock()
_NO_MONITOR = (1 << 64) - 1


class StoreExclusive:
    """A decoded store-exclusive: status register, value register(s), base register, bytes per element."""

    __slots__ = ("base", "pair", "size", "status", "value", "value2")

    def __init__(self, status: int, value: int, value2: int | None, base: int, size: int) -> None:
        self.status, self.value, self.value2, self.base, self.size = status, value, value2, base, size
        self.pair = value2 is not None


def decode_a64(word: int) -> StoreExclusive | None:
    """STXR/STLXR/STXP/STLXP (any size), or None."""
    if word & 0x3F800000 != 0x08000000 or word & (1 << 22):  # load/store exclusive, o2 = 0, L = 0
        return None
    size = 1 << (word >> 30)
    pair = bool(word & (1 << 21))
    if pair and size < 4:
        return None
    return StoreExclusive((word >> 16) & 31, word & 31, (word >> 10) & 31 if pair else None, (word >> 5) & 31, size)


def decode_a32(word: int) -> StoreExclusive | None:
    """STREX/STREXB/STREXH/STREXD in ARM state (STREXD stores Rt and Rt+1), or None."""
    if word >> 28 == 0xF or word & 0x0F900FF0 != 0x01800F90:
        return None
    op = (word >> 21) & 3
    size = {0: 4, 1: 8, 2: 1, 3: 2}[op]
    rt = word & 0xF
    return StoreExclusive((word >> 12) & 0xF, rt, rt + 1 if op == 1 else None, (word >> 16) & 0xF,
                          4 if op == 1 else size)


def decode_t32(hw1: int, hw2: int) -> StoreExclusive | None:
    """STREX (T1) and STREXB/STREXH/STREXD (T1) in Thumb state, or None."""
    if hw1 & 0xFFF0 == 0xE840:  # STREX Rd, Rt, [Rn, #imm]
        if hw2 & 0xFF:
            return None  # an offset: not handled here, so left to run again (rare)
        return StoreExclusive((hw2 >> 8) & 0xF, hw2 >> 12, None, hw1 & 0xF, 4)
    if hw1 & 0xFFF0 == 0xE8C0 and (hw2 >> 4) & 0xF in (4, 5, 7):
        op = (hw2 >> 4) & 0xF
        rt, rt2, rd = hw2 >> 12, (hw2 >> 8) & 0xF, hw2 & 0xF
        return StoreExclusive(rd, rt, rt2 if op == 7 else None, hw1 & 0xF, {4: 1, 5: 2, 7: 4}[op])
    return None


def _context_bytes(uc: Uc) -> tuple[object, bytes]:
    context = uc.context_save()
    return context, ctypes.string_at(context.context.value, context.size)


def _monitor_offset(arch: Arch) -> int:
    """Where ``exclusive_addr`` sits in a saved context of ``arch``: found by a load-exclusive of a known value."""
    offset = _offsets.get(arch.name)
    if offset is not None:
        return offset
    with _lock:
        if arch.name in _offsets:
            return _offsets[arch.name]
        candidates: set[int] | None = None
        # Two probes with different registers, so that the registers holding the address and value do not match.
        for a64_word, a32_word, (rn, rt) in ((0xC85F7C01, 0xE1901F9F, (0, 1)), (0xC85F7C43, 0xE1923F9F, (2, 3))):
            address, value = _PROBE_ADDR + 16 * rn, _PROBE_VALUE ^ rt
            uc = arch.new_uc("")
            try:
                uc.mem_map(0, 0x4000, UC_PROT_ALL)
                uc.mem_write(address, struct.pack("<Q", value))
                if isinstance(arch, AArch64):
                    uc.mem_write(0x1000, struct.pack("<I", a64_word))  # ldxr xRt, [xRn]
                    expected = (address, value)
                else:
                    uc.mem_write(0x1000, struct.pack("<I", a32_word))  # ldrex rRt, [rRn]
                    expected = (address, value & 0xFFFF_FFFF)
                arch.write_gpr(uc, rn, address)
                uc.emu_start(0x1000, 0x1004, 0, 1)
                _ctx, blob = _context_bytes(uc)
            finally:
                close_uc(uc)
            needle = struct.pack("<QQ", *expected)
            hits = {i for i in range(0, len(blob) - _MONITOR.size, 8) if blob[i:i + 16] == needle}
            candidates = hits if candidates is None else candidates & hits
        found = sorted(candidates or ())
        if len(found) != 1:
            raise ArchError(f"cannot locate the exclusive monitor in this libunicorn's {arch.name} context "
                            f"(candidates {found})")
        _offsets[arch.name] = found[0]
        return found[0]


def finish_cut_store(arch: Arch, uc: Uc, pc: int) -> bool:
    """If the instruction at ``pc`` is a store-exclusive whose store already happened (see the module docstring),
    complete it by hand and return True; otherwise change nothing and return False."""
    thumb = False
    if isinstance(arch, AArch64):
        insn = decode_a64(fastreg.mem_read_le(uc, pc, 4))
    elif fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & (1 << 5):
        thumb = True
        insn = decode_t32(fastreg.mem_read_le(uc, pc, 2), fastreg.mem_read_le(uc, pc + 2, 2))
    else:
        word = fastreg.mem_read_le(uc, pc, 4)
        insn = decode_a32(word) if arch.condition_passed(uc, word) else None
    if insn is None:
        return False
    offset = _monitor_offset(arch)
    context, blob = _context_bytes(uc)
    mon_addr, mon_val, mon_high = _MONITOR.unpack_from(blob, offset)
    address = arch.read_gpr(uc, insn.base) if insn.base != 31 or not isinstance(arch, AArch64) else \
        fastreg.reg_read(uc, a64.UC_ARM64_REG_SP)
    if mon_addr == _NO_MONITOR or mon_addr != address:
        return False
    bits = insn.size * 8
    mask = (1 << bits) - 1
    new = arch.read_gpr(uc, insn.value) & mask
    old = mon_val
    if insn.pair:
        assert insn.value2 is not None
        new |= (arch.read_gpr(uc, insn.value2) & mask) << bits
        if isinstance(arch, AArch64) and insn.size == 8:
            old = mon_val | mon_high << 64
        width = insn.size * 2
    else:
        width = insn.size
    memory = int.from_bytes(uc.mem_read(address, width), "big" if arch.big_endian_data(uc) else "little")
    if memory != new or memory == old:
        return False  # not stored yet (or storing what was there: running it again changes nothing)
    ctypes.memmove(context.context.value + offset, struct.pack("<Q", _NO_MONITOR), 8)  # type: ignore[attr-defined]
    uc.context_restore(context)
    arch.write_gpr(uc, insn.status, 0)
    next_pc = pc + 4
    if thumb:
        fastreg.reg_write(uc, a32.UC_ARM_REG_PC, next_pc | 1)
    elif isinstance(arch, AArch64):
        fastreg.reg_write(uc, a64.UC_ARM64_REG_PC, next_pc)
    else:
        fastreg.reg_write(uc, a32.UC_ARM_REG_PC, next_pc)
    return True
