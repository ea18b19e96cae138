"""PSCI 1.1 over HVC, handled in the vcpu service as KVM does in the kernel.

The decision is pure (function id and arguments in, an action out); the vCPU loop carries it out.

Which HVCs are PSCI calls: all of them, at EL1 (PL1 on AArch32). QEMU's ``virt`` without EL2 (the board this
service models) has the HVC conduit, and since QEMU 7.1 (PSCI 1.1) ``arm_is_psci_call`` is true for every HVC
on that conduit: a function id it does not know returns NOT_SUPPORTED (-1) in x0/r0 and the guest goes on (Debian
12's QEMU 7.2 does this; before 7.1 an unknown id made the HVC UNDEFINED, as EL2 is absent). KVM answers every
HVC as an SMCCC call the same way. So no HVC at EL1 reaches the guest's vectors. An HVC at EL0 (User mode) is
UNDEFINED before any of this: Unicorn raises it as an undefined instruction, which the guest takes at its vector
(``exceptions``). A 64-bit function id from AArch32 is NOT_SUPPORTED, as in QEMU. SMC is no conduit: on virt,
which has no EL3, it is UNDEFINED (QEMU's ``pre_smc``; KVM injects an undefined instruction too).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PSCI_VERSION = 0x8400_0000
CPU_SUSPEND_32 = 0x8400_0001
CPU_OFF = 0x8400_0002
CPU_ON_32 = 0x8400_0003
CPU_ON_64 = 0xC400_0003
AFFINITY_INFO_32 = 0x8400_0004
AFFINITY_INFO_64 = 0xC400_0004
MIGRATE_INFO_TYPE = 0x8400_0006
SYSTEM_OFF = 0x8400_0008
SYSTEM_RESET = 0x8400_0009
PSCI_FEATURES = 0x8400_000A
SMCCC_VERSION = 0x8000_0000
SMC64 = 0x4000_0000  # the SMC64/HVC64 calling convention bit of a function id

SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2
DENIED = -3
ALREADY_ON = -4
ON_PENDING = -5

VERSION_1_1 = 0x0001_0001
# MIGRATE_INFO_TYPE: "Trusted OS is not present or does not require migration".
MIGRATE_NOT_REQUIRED = 2

SUPPORTED = frozenset(
    {PSCI_VERSION, CPU_OFF, CPU_ON_32, CPU_ON_64, AFFINITY_INFO_32, AFFINITY_INFO_64, MIGRATE_INFO_TYPE,
     SYSTEM_OFF, SYSTEM_RESET, PSCI_FEATURES}
)

NAMES = {
    PSCI_VERSION: "PSCI_VERSION", CPU_OFF: "CPU_OFF", CPU_ON_32: "CPU_ON", CPU_ON_64: "CPU_ON",
    AFFINITY_INFO_32: "AFFINITY_INFO", AFFINITY_INFO_64: "AFFINITY_INFO", MIGRATE_INFO_TYPE: "MIGRATE_INFO_TYPE",
    SYSTEM_OFF: "SYSTEM_OFF", SYSTEM_RESET: "SYSTEM_RESET", PSCI_FEATURES: "PSCI_FEATURES",
}


class PsciAction(enum.Enum):
    """What the vCPU loop must do after a PSCI call besides writing x0/r0."""

    NONE = "none"
    CPU_ON = "cpu_on"
    CPU_OFF = "cpu_off"
    AFFINITY_INFO = "affinity_info"
    SYSTEM_OFF = "system_off"
    SYSTEM_RESET = "system_reset"


@dataclass(frozen=True, slots=True)
class PsciCall:
    """A decoded PSCI call; `result` is final unless the action needs the VM (CPU_ON, AFFINITY_INFO)."""

    function: int
    action: PsciAction
    result: int = SUCCESS
    target: int = 0
    entry: int = 0
    context: int = 0

    @property
    def name(self) -> str:
        return NAMES.get(self.function, f"0x{self.function:08x}")


def decode_call(x0: int, x1: int, x2: int, x3: int, is_64bit: bool) -> PsciCall:
    """Interpret a PSCI/SMCCC call from the guest's x0..x3 (r0..r3 on AArch32)."""
    fn = x0 & 0xFFFF_FFFF
    if fn & SMC64 and not is_64bit:
        return PsciCall(fn, PsciAction.NONE, NOT_SUPPORTED)
    if fn == PSCI_VERSION:
        return PsciCall(fn, PsciAction.NONE, VERSION_1_1)
    if fn == PSCI_FEATURES:
        queried = x1 & 0xFFFF_FFFF
        return PsciCall(fn, PsciAction.NONE, SUCCESS if queried in SUPPORTED else NOT_SUPPORTED)
    if fn == MIGRATE_INFO_TYPE:
        return PsciCall(fn, PsciAction.NONE, MIGRATE_NOT_REQUIRED)
    if fn in (CPU_ON_32, CPU_ON_64):
        mask = 0xFFFF_FFFF_FFFF_FFFF if fn == CPU_ON_64 else 0xFFFF_FFFF
        return PsciCall(fn, PsciAction.CPU_ON, target=x1 & mask, entry=x2 & mask, context=x3 & mask)
    if fn in (AFFINITY_INFO_32, AFFINITY_INFO_64):
        return PsciCall(fn, PsciAction.AFFINITY_INFO, target=x1, context=x2)
    if fn == CPU_OFF:
        return PsciCall(fn, PsciAction.CPU_OFF)
    if fn == SYSTEM_OFF:
        return PsciCall(fn, PsciAction.SYSTEM_OFF)
    if fn == SYSTEM_RESET:
        return PsciCall(fn, PsciAction.SYSTEM_RESET)
    return PsciCall(fn, PsciAction.NONE, NOT_SUPPORTED)


def mpidr_to_vcpu(mpidr: int) -> int:
    """vCPU index from an MPIDR affinity value: Aff0 + 16 * Aff1 (flat numbering, as QEMU's virt)."""
    return (mpidr & 0xFF) + 16 * ((mpidr >> 8) & 0xFF)


def vcpu_affinity(index: int) -> int:
    """MPIDR's affinity fields for vCPU ``index``, the inverse of ``mpidr_to_vcpu``."""
    return (index % 16) | (index // 16) << 8
