"""Register, memory and hook calls straight through libunicorn, for the exit path's hot few calls.

The Python binding's ``reg_read`` picks a register class, builds a ctypes object and checks types on
every call: about three times the cost of the C call itself (latency.md section 3c). An exit makes
half a dozen of them, so the exit path uses these instead. Only plain integer registers (GPRs, PC,
PSTATE, CPSR) and SCTLR_EL1 go this way; everything else keeps the binding.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from unicorn import UC_HOOK_MEM_WRITE, Uc, UcError
from unicorn import arm64_const as a64
from unicorn.unicorn_py3.arch.arm64 import UcRegCP64
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import uclib

_reg_read = uclib.uc_reg_read
_reg_write = uclib.uc_reg_write
_mem_read = uclib.uc_mem_read
_c_u64 = ctypes.c_uint64
_byref = ctypes.byref
_CP_REG = a64.UC_ARM64_REG_CP_REG


def reg_read(uc: Uc, reg: int) -> int:
    """A 32- or 64-bit integer register (a fresh buffer each call: vCPU and RPC threads may read at once)."""
    value = _c_u64()
    status = _reg_read(uc._uch, reg, _byref(value))
    if status:
        raise UcError(status)
    return value.value


def reg_write(uc: Uc, reg: int, value: int) -> None:
    """Write a 32- or 64-bit integer register (a 32-bit register takes the low word)."""
    status = _reg_write(uc._uch, reg, _byref(_c_u64(value)))
    if status:
        raise UcError(status)


def mem_read_le(uc: Uc, address: int, size: int) -> int:
    """``size`` bytes of guest memory as a little-endian integer (an instruction fetch)."""
    buf = ctypes.create_string_buffer(size)
    status = _mem_read(uc._uch, address, buf, size)
    if status:
        raise UcError(status)
    return int.from_bytes(buf.raw, "little")


_per_thread = threading.local()


def sctlr_el1(uc: Uc) -> int:
    """SCTLR_EL1 (op0=3, op1=0, CRn=1, CRm=0, op2=0), for the data endianness of an AArch64 access.

    Building the ctypes structure costs several times the read, and a posted store needs this once per
    write, so each thread keeps one (threads may read at once; one thread never twice at a time)."""
    try:
        reg, ref = _per_thread.sctlr
    except AttributeError:
        reg = UcRegCP64(1, 0, 3, 0, 0, 0)
        ref = _byref(reg)
        _per_thread.sctlr = (reg, ref)
    status = _reg_read(uc._uch, _CP_REG, ref)
    if status:
        raise UcError(status)
    return int(reg.val)


# uc_cb_hookmem_t: void (uc_engine *, uc_mem_type, uint64_t address, int size, int64_t value, void *user_data)
_HOOKMEM = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_void_p)
_hook_add = uclib.uc_hook_add


def hook_mem_write(uc: Uc, callback: Callable[[int, int, int], None], on_error: Callable[[BaseException], None],
                   begin: int, end: int) -> object:
    """A UC_HOOK_MEM_WRITE hook calling ``callback(address, size, value)`` with one Python frame instead
    of the binding's three (posted stores run it once per write). ctypes would print and drop an
    exception raised in it, so it goes to ``on_error`` (which must stop the emulation). Returns what
    must stay referenced as long as the hook is installed."""

    def trampoline(_uch: int, _access: int, address: int, size: int, value: int, _user: int) -> None:
        try:
            callback(address, size, value)
        except BaseException as exc:
            on_error(exc)

    fptr = _HOOKMEM(trampoline)
    handle = uc_hook_h()
    status = _hook_add(uc._uch, _byref(handle), UC_HOOK_MEM_WRITE, ctypes.cast(fptr, ctypes.c_void_p),
                       ctypes.c_void_p(0), ctypes.c_uint64(begin), ctypes.c_uint64(end))
    if status:
        raise UcError(status)
    return fptr
