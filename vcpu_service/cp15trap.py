"""The AArch32 generic timer on Unicorn: find the guest's MRC/MCR/MRRC/MCRR of CP15 c14 and answer them.

Unicorn 2.1.4 drops writes to CNT[PV]_CTL and CNT[PV]_CVAL (``docs/timer-hooks.md``) and, unlike AArch64, has no
instruction hook for coprocessor accesses. A code hook on every instruction would make a guest about six times
slower, so the trap is built from hooks that cost nothing once code is known:

* a block hook covers only memory no guest code has run from yet. The first block run from a page stops the
  vCPU *before* any of it executes (the hook puts PC back to the block's start and stops);
* the vCPU loop then scans that page for the encodings (``find_sites``, at ARM and Thumb alignment), puts a code
  hook on each candidate, drops the block hook from the page and the page's translations, and resumes: from then
  on the page runs at full speed, and only a real timer access calls Python;
* a candidate is decoded again when it runs, in the state it runs in (``decode``), so data that merely looks like
  an MCR costs nothing and a Thumb instruction at an ARM candidate's address is left alone.

Known gap: code written over a page after it was scanned is not rescanned (firmware that loads code over code it
already ran from, rare before an OS).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Collection
from typing import NamedTuple

from unicorn import UC_HOOK_BLOCK, UC_HOOK_CODE, Uc
from unicorn import arm_const as a32

from vcpu_service import fastreg
from vcpu_service.arch import Arch
from vcpu_service.gentimer import GenericTimer

PAGE = 0x1000
_TOP = 0xFFFF_FFFF
_CPSR_T = 1 << 5

# A32 MRC/MCR p15 with CRn 14: cond 1110 opc1 L CRn=1110 Rt 1111 opc2 1 CRm (little-endian bytes b0..b3).
_A32_MCR = re.compile(
    b"(?=[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x10) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0F) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0E) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0E) + b"])",
    re.DOTALL,
)
# A32 MRRC/MCRR p15 with CRm 14: cond 1100 010L Rt2 Rt 1111 opc1 CRm=1110.
_A32_MCRR = re.compile(
    b"(?=[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0E) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0F) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0xE0 == 0x40) + b"]"
    + b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0C) + b"])",
    re.DOTALL,
)
# T32: first halfword 1110 1110 opc1 L CRn=1110 (MRC/MCR) or 1110 1100 010L Rt2 (MRRC/MCRR); the second says
# coproc 15 (bits 8-11). Matched on the first halfword's bytes and checked in Python.
_T32_FIRST = re.compile(
    b"(?=[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x0F == 0x0E or b & 0xE0 == 0x40) + b"]"
    + b"[\xee\xec])",
    re.DOTALL,
)


class TimerAccess(NamedTuple):
    """One decoded CP15 timer access: the register (AArch64 name), direction, and the core registers used."""

    name: str
    is_read: bool
    rt: int
    rt2: int | None  # the high word's register for MRRC/MCRR


def decode(word: int, thumb: bool) -> TimerAccess | None:
    """The timer register an MRC/MCR/MRRC/MCRR names, or None. ``word`` is the A32 word, or for T32 the first
    halfword in bits 31:16 and the second in 15:0 (the coprocessor fields sit at the same bits in both)."""
    if thumb:
        if word >> 28 != 0xE:
            return None
    elif word >> 28 == 0xF:
        return None  # MRC2/MCR2 and the unconditional space
    if (word >> 8) & 0xF != 15:
        return None
    if (word & 0x0F000010) == 0x0E000010:  # MRC/MCR
        opc1, crn, crm, opc2 = (word >> 21) & 7, (word >> 16) & 0xF, word & 0xF, (word >> 5) & 7
        name = GenericTimer.name_aa32(opc1, crn, crm, opc2)
        rt = (word >> 12) & 0xF
        if name is None or rt == 15:
            return None
        return TimerAccess(name, bool(word & (1 << 20)), rt, None)
    if (word & 0x0FE00000) == 0x0C400000:  # MRRC/MCRR
        opc1, crm = (word >> 4) & 0xF, word & 0xF
        name = GenericTimer.name_aa32_64(opc1, crm)
        rt, rt2 = (word >> 12) & 0xF, (word >> 16) & 0xF
        if name is None or 15 in (rt, rt2):
            return None
        return TimerAccess(name, bool(word & (1 << 20)), rt, rt2)
    return None


def find_sites(data: bytes, base: int) -> list[int]:
    """Addresses in ``data`` (at ``base``) that hold, as ARM or as Thumb code, a CP15 timer access."""
    sites: set[int] = set()
    for pattern in (_A32_MCR, _A32_MCRR):
        for m in pattern.finditer(data):
            at = m.start()
            if at % 4 == 0 and decode(int.from_bytes(data[at:at + 4], "little"), False) is not None:
                sites.add(base + at)
    for m in _T32_FIRST.finditer(data):
        at = m.start()
        if at % 2 or at + 4 > len(data):
            continue
        word = int.from_bytes(data[at:at + 2], "little") << 16 | int.from_bytes(data[at + 2:at + 4], "little")
        if decode(word, True) is not None:
            sites.add(base + at)
    return sorted(sites)


class TimerTrap:
    """The hooks of one vCPU's Unicorn instance that route AArch32 timer accesses to ``read``/``write``."""

    def __init__(self, uc: Uc, arch: Arch, read: Callable[[str], int], write: Callable[[str, int], None],
                 readable: Collection[str], writable: Collection[str]) -> None:
        self._uc = uc
        self._arch = arch
        self._readable = readable  # others (CNTVOFF without EL2, writes to the counters) are Unicorn's: UNDEF
        self._writable = writable
        self._read = read
        self._write = write
        self._scanned: list[tuple[int, int]] = []  # sorted, merged [start, end) ranges already instrumented
        self._block_hooks: list[int] = []
        self._pending: set[int] = set()  # pages whose first block stopped the vCPU
        self.sites: dict[int, int] = {}  # address -> code hook
        self.traps = 0
        self._cover()

    # ----- coverage --------------------------------------------------------------------------------------------
    def _gaps(self) -> list[tuple[int, int]]:
        gaps, at = [], 0
        for start, end in self._scanned:
            if start > at:
                gaps.append((at, start - 1))
            at = end
        if at <= _TOP:
            gaps.append((at, _TOP))
        return gaps

    def _cover(self) -> None:
        for hook in self._block_hooks:
            self._uc.hook_del(hook)
        self._block_hooks = [self._uc.hook_add(UC_HOOK_BLOCK, self._on_new_block, None, lo, hi)
                             for lo, hi in self._gaps()]

    def _mark(self, page: int) -> None:
        ranges = self._scanned
        i = bisect.bisect_left(ranges, (page, page))
        ranges.insert(i, (page, page + PAGE))
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self._scanned = merged

    # ----- hooks (inside emu_start) ----------------------------------------------------------------------------
    def _on_new_block(self, uc: Uc, address: int, size: int, _user: object) -> None:
        last = address + max(size, 1) - 1
        self._pending.update(range(address & ~(PAGE - 1), (last & ~(PAGE - 1)) + PAGE, PAGE))
        cpsr = fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR)
        fastreg.reg_write(uc, a32.UC_ARM_REG_PC, address | (1 if cpsr & _CPSR_T else 0))  # run none of it yet
        uc.emu_stop()

    def _on_site(self, uc: Uc, address: int, _size: int, _user: object) -> None:
        thumb = bool(fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & _CPSR_T)
        if thumb:
            word = fastreg.mem_read_le(uc, address, 2) << 16 | fastreg.mem_read_le(uc, address + 2, 2)
        else:
            word = fastreg.mem_read_le(uc, address, 4)
        access = decode(word, thumb)
        if access is None or access.name not in (self._readable if access.is_read else self._writable):
            return  # data that looked like one, the other instruction set, or an UNDEF: Unicorn runs it
        arch = self._arch
        if not thumb and not arch.condition_passed(uc, word):
            fastreg.reg_write(uc, a32.UC_ARM_REG_PC, address + 4)
            return
        self.traps += 1
        if access.is_read:
            value = self._read(access.name)
            arch.write_gpr(uc, access.rt, value & 0xFFFF_FFFF)
            if access.rt2 is not None:
                arch.write_gpr(uc, access.rt2, value >> 32 & 0xFFFF_FFFF)
        else:
            value = arch.read_gpr(uc, access.rt)
            if access.rt2 is not None:
                value |= arch.read_gpr(uc, access.rt2) << 32
            self._write(access.name, value)
        fastreg.reg_write(uc, a32.UC_ARM_REG_PC, (address + 4) | (1 if thumb else 0))

    # ----- the vCPU loop ---------------------------------------------------------------------------------------
    def instrument_pending(self) -> bool:
        """After emu_start returned: scan the pages whose first block stopped the vCPU, hook their timer accesses
        and let them run. True if there were any (the vCPU then resumes at the same PC)."""
        if not self._pending:
            return False
        uc = self._uc
        pages, self._pending = sorted(self._pending), set()
        for page in pages:
            try:
                data = bytes(uc.mem_read(page, PAGE))
            except Exception:
                data = b""  # not backed (a device, or the guest's MMU maps nothing): nothing can run from it
            for site in find_sites(data, page):
                if site not in self.sites:
                    self.sites[site] = uc.hook_add(UC_HOOK_CODE, self._on_site, None, site, site)
            self._mark(page)
        self._cover()
        for page in pages:
            uc.ctl_remove_cache(page, page + PAGE)
        return True
