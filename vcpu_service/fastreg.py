"""Register, memory and hook calls straight through libunicorn, for the exit path's hot few calls.

The Python binding's ``reg_read`` picks a register class, builds a ctypes object and checks types on
every call: about three times the cost of the C call itself (latency.md section 3c). An exit makes
half a dozen of them, so the exit path uses these instead. Only plain integer registers (GPRs, PC,
PSTATE, CPSR) and SCTLR_EL1 go this way; everything else keeps the binding.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_WRITE, Uc, UcError
from unicorn import arm64_const as a64
from unicorn.unicorn_py3.arch.arm64 import UcRegCP64
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import uclib

# The same library through PyDLL: these calls keep the GIL. They take well under a microsecond, and handing
# the GIL to another thread and back (what ctypes does around every CDLL call) cost more than the call
# itself, several times per exit. Only calls that never run guest code or hooks may go this way.
_gil_held = ctypes.PyDLL(uclib._name)


def _held(name: str, *argtypes: object) -> Callable[..., int]:
    fn = getattr(_gil_held, name)
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return fn


_reg_read = _held("uc_reg_read", ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_reg_write = _held("uc_reg_write", ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_mem_read = _held("uc_mem_read", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
_c_u64 = ctypes.c_uint64
assert sys.byteorder == "little", "fastreg reads guest memory into host integers"
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
    """``size`` (at most 8) bytes of guest memory as a little-endian integer (an instruction fetch)."""
    value = _c_u64()  # read into the low bytes of a zeroed 64-bit integer: the host is little-endian
    status = _mem_read(uc._uch, address, _byref(value), size)
    if status:
        raise UcError(status)
    return value.value


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
_emu_start = uclib.uc_emu_start  # CDLL: releases the GIL while the guest runs, as it must (hooks take it back)


def emu_start(uc: Uc, begin: int, until: int) -> int:
    """Run the guest; returns Unicorn's status (0 or a UC_ERR_*) instead of raising it: a data abort ends every
    exit's slice with an error status, and building, raising and catching UcError for each cost more than the
    call. An exception a binding hook recorded is raised as the binding's own ``emu_start`` would."""
    uc._hook_exception = None
    status: int = _emu_start(uc._uch, begin, until, 0, 0)
    if uc._hook_exception is not None:
        raise uc._hook_exception
    return status


# uc_cb_eventmem_t: bool (uc_engine *, uc_mem_type, uint64_t address, int size, int64_t value, void *user_data)
_HOOKMEM_INVALID = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_void_p)


def hook_mem_invalid(uc: Uc, hook_type: int, callback: Callable[[int, int, int, int], bool],
                     on_error: Callable[[BaseException], None]) -> object:
    """An unmapped- or protected-memory hook calling ``callback(access, address, size, value)`` with one Python
    frame instead of the binding's three (every exit takes one). An exception goes to ``on_error`` (which must
    stop the emulation) and the access fails. Returns what must stay referenced while the hook is installed."""

    def trampoline(_uch: int, access: int, address: int, size: int, value: int, _user: int) -> bool:
        try:
            return callback(access, address, size, value)
        except BaseException as exc:
            on_error(exc)
            return False

    fptr = _HOOKMEM_INVALID(trampoline)
    handle = uc_hook_h()
    status = _hook_add(uc._uch, _byref(handle), hook_type, ctypes.cast(fptr, ctypes.c_void_p), ctypes.c_void_p(0),
                       ctypes.c_uint64(1), ctypes.c_uint64(0))
    if status:
        raise UcError(status)
    return fptr


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


# ----- stopping a vCPU from another thread --------------------------------------------------------------------

_lib = ctypes.CDLL(uclib._name)
_C_STOP = ctypes.cast(_lib.uc_emu_stop, ctypes.c_void_p)  # void (uc_engine *): extra hook arguments are ignored
_C_NOOP = ctypes.cast(_lib.uc_errno, ctypes.c_void_p)  # reads uc->errnum and returns: a hook that does nothing
_ALL = 0
_NONE = (1 << 64) - 1
_hook_begin_offset: int | None = None


def _block_hook(uc: Uc, callback: ctypes.c_void_p, begin: int, end: int) -> int:
    handle = uc_hook_h()
    status = _hook_add(uc._uch, _byref(handle), UC_HOOK_BLOCK, callback, ctypes.c_void_p(0), ctypes.c_uint64(begin),
                       ctypes.c_uint64(end))
    if status:
        raise UcError(status)
    return int(handle.value)


def _begin_offset(uc: Uc) -> int:
    """Where ``begin`` sits in libunicorn's ``struct hook`` (a ``uc_hook`` is its address), found once."""
    global _hook_begin_offset
    if _hook_begin_offset is None:
        begin, end = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888
        handle = _block_hook(uc, _C_NOOP, begin, end)
        raw = ctypes.string_at(handle, 128)
        at = raw.find(begin.to_bytes(8, "little"))
        if at < 0 or at % 8 or raw[at + 8:at + 16] != end.to_bytes(8, "little"):
            raise RuntimeError("libunicorn's struct hook does not hold begin and end where expected")
        _lib.uc_hook_del(uc._uch, ctypes.c_size_t(handle))
        _hook_begin_offset = at
    return _hook_begin_offset


class SafeStop:
    """Stop a running vCPU from another thread at the start of a translation block, never inside one.

    ``uc_emu_stop`` from another thread is honoured at Unicorn's next check, and it checks after every guest load
    and store, then resumes *at* that instruction: a load into its own base register (``ldr x0, [x0, #8]``) runs
    again from the wrong address, a store-exclusive stores twice. Measured: a pointer chase faulted, EDK2 died.
    Stops requested by a hook on the vCPU's own thread are exact (the hook runs between instructions), so this
    puts the stop in a block hook: a hook that does nothing, in C, covers all code, so every translated block
    calls Unicorn's hook helper at its start; a second block hook, whose callback is ``uc_emu_stop`` itself,
    matches no address until ``request`` widens its range to everything, which the helper sees at the next
    block. ``clear`` narrows it again once ``emu_start`` has returned. No Python runs per block.
    """

    def __init__(self, uc: Uc) -> None:
        offset = _begin_offset(uc)
        _block_hook(uc, _C_NOOP, 1, 0)  # begin > end: every address, so every block calls the helper
        handle = _block_hook(uc, _C_STOP, _NONE, _NONE)
        self._begin = ctypes.c_uint64.from_address(handle + offset)

    def request(self) -> None:
        """Stop at the next block boundary (any thread; an aligned 8-byte store)."""
        self._begin.value = _ALL

    def clear(self) -> None:
        """Called by the vCPU thread after ``emu_start`` returned."""
        self._begin.value = _NONE
