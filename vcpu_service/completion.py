"""Completion arithmetic of an MMIO access: the `kvm_handle_mmio_return()` data path, fixed.

Pure functions over bytes and integers. `data` is always in guest-memory byte order, the
`kvm_run.mmio.data` rule: the first `len` bytes as they would appear if the vCPU had done the
access directly to a byte array.

Unlike upstream arm64 KVM (`vcpu_data_host_to_guest()` masks to the access width *after* sign
extension, so LDRSB/LDRSH/LDRSW come back zero-extended; kvm-mmio.md 0.5 and 2.2), these implement
the architecture: sign-extend to the register width, then cut a W (or AArch32) target to 32 bits.
"""

from vcpu_service.decode import Syndrome

__all__ = ["load_value", "store_data"]

_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def load_value(data: bytes, syn: Syndrome, big_endian: bool) -> int:
    """The value a load writes to Rt, from the `syn.size` bytes the device returned.

    Assembles the bytes per the guest's data endianness (A64: SCTLR_ELx.EE/E0E, AArch32: CPSR.E),
    sign-extends when SSE is set, then keeps 32 bits for a W target (A64 `sf` False) or any AArch32
    target and 64 bits otherwise. Writing the result to Rt=31 on A64 is the caller's job to drop
    (it is XZR/WZR). Raises ValueError if `syn` is a store or `data` is not `syn.size` bytes.
    """
    if syn.wnr:
        raise ValueError("load_value() called with a store syndrome (WnR=1)")
    if len(data) != syn.size:
        raise ValueError(f"MMIO load of {syn.size} bytes expected {syn.size} data bytes, got {len(data)}")
    value = int.from_bytes(data, "big" if big_endian else "little")
    bits = 8 * syn.size
    if syn.sse and bits < 64:
        sign = 1 << (bits - 1)
        value = (value ^ sign) - sign
    return value & (_MASK64 if syn.sf else _MASK32)


def store_data(reg_value: int, syn: Syndrome, big_endian: bool) -> bytes:
    """The `syn.size` bytes a store puts in guest memory: the low bytes of Rt, in guest byte order.

    `reg_value` is Rt's value as the caller read it. On A64, Rt=31 in a store is XZR/WZR and reads
    as zero, never SP: the caller must pass 0 for `syn.srt == 31` (as KVM's `vcpu_get_reg()` does).
    Negative Python ints are taken as two's complement. Raises ValueError if `syn` is a load.
    """
    if not syn.wnr:
        raise ValueError("store_data() called with a load syndrome (WnR=0)")
    value = reg_value & ((1 << (8 * syn.size)) - 1)
    return value.to_bytes(syn.size, "big" if big_endian else "little")
