"""Register and memory access straight through libunicorn, for the exit path's hot few calls.

The Python binding's ``reg_read`` picks a register class, builds a ctypes object and checks types on
every call: about three times the cost of the C call itself (latency.md section 3c). An exit makes
half a dozen of them, so the exit path uses these instead. Only plain integer registers (GPRs, PC,
PSTATE, CPSR) and SCTLR_EL1 go this way; everything else keeps the binding.
"""

from __future__ import annotations

import ctypes

from unicorn import Uc, UcError
from unicorn import arm64_const as a64
from unicorn.unicorn_py3.arch.arm64 import UcRegCP64
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
        raise UcError(status, reg)
    return value.value


def reg_write(uc: Uc, reg: int, value: int) -> None:
    """Write a 32- or 64-bit integer register (a 32-bit register takes the low word)."""
    status = _reg_write(uc._uch, reg, _byref(_c_u64(value)))
    if status:
        raise UcError(status, reg)


def mem_read_u32(uc: Uc, address: int) -> int:
    """Four bytes of guest memory as a little-endian word (an instruction fetch)."""
    buf = ctypes.create_string_buffer(4)
    status = _mem_read(uc._uch, address, buf, 4)
    if status:
        raise UcError(status)
    return int.from_bytes(buf.raw, "little")


def mem_read_u16(uc: Uc, address: int) -> int:
    """Two bytes of guest memory as a little-endian halfword (a Thumb fetch)."""
    buf = ctypes.create_string_buffer(2)
    status = _mem_read(uc._uch, address, buf, 2)
    if status:
        raise UcError(status)
    return int.from_bytes(buf.raw, "little")


def sctlr_el1(uc: Uc) -> int:
    """SCTLR_EL1 (op0=3, op1=0, CRn=1, CRm=0, op2=0), for the data endianness of an AArch64 access."""
    reg = UcRegCP64(1, 0, 3, 0, 0, 0)
    status = _reg_read(uc._uch, _CP_REG, _byref(reg))
    if status:
        raise UcError(status, _CP_REG)
    return int(reg.val)
