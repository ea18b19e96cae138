"""A GICv2 (distributor + CPU interface) kept inside the vcpu service, as KVM keeps its vGIC in the kernel.

It follows QEMU's ``arm_gic`` as the ``virt`` board builds it: revision 2, no security extensions, no
virtualization extensions, 8 priority bits, ``num-irq`` = 256 SPIs + 32 internal = 288. Register semantics
(including QEMU's own choices where the architecture leaves room) are taken from QEMU's
``hw/intc/arm_gic.c``, ``hw/intc/gic_internal.h`` and ``hw/intc/arm_gic_common.c``; the code is ours.

Pure Python, no Unicorn, no gRPC: callers give the CPU index of the accessing vCPU explicitly. One lock
guards all state because several vCPU threads access the registers while device lines change from another
thread. The IRQ/FIQ outputs are recomputed after every change (QEMU's ``gic_update``); a change of a CPU's
IRQ line bumps ``generation`` and calls ``on_irq_change(cpu, level)`` (``on_fiq_change`` for its FIQ line)
*after* the lock is released, so the hook may call back into the GIC (e.g. ``pending_for``) or kick a vCPU
without deadlocking; deliveries are serialised and carry the output as it is then, so the last one a CPU gets
is never stale (``_notify``).

Interrupt latency: an SPI raised with a timestamp (``set_spi(..., since_ns=)``, the device's raise time) keeps
it until the guest completes the interrupt; the GIC appends "raised to acknowledged" (GICC_IAR) and "raised to
EOI" (GICC_EOIR) samples in ns to ``ack_ns`` and ``eoi_ns``, which ``take_latency`` hands over.
"""

from __future__ import annotations

import array
import threading
import time
from collections.abc import Callable

# virt board addresses (QEMU hw/arm/virt.c memmap VIRT_GIC_DIST / VIRT_GIC_CPU).
GICD_BASE = 0x0800_0000
GICD_SIZE = 0x1_0000
GICC_BASE = 0x0801_0000
GICC_SIZE = 0x1_0000
# What the model decodes inside those windows: the distributor page and the GICv2 CPU interface (0x2000,
# GICC_DIR at 0x1000). The rest of each window is unassigned in QEMU, so an access there is refused.
GICD_DECODED = 0x1000
GICC_DECODED = 0x2000

VIRT_NUM_IRQ = 256 + 32  # QEMU virt: NUM_IRQS + GIC_INTERNAL
GIC_INTERNAL = 32
GIC_NR_SGIS = 16
GIC_NCPU = 8
GIC_MAXIRQ = 1020
ALL_CPU_MASK = (1 << GIC_NCPU) - 1
SPURIOUS = 1023
GROUP1_HIDDEN = 1022  # IAR/HPPIR answer for a Group 1 interrupt when GICC_CTLR.AckCtl is clear
IDLE_PRIORITY = 0x100
NR_APRS = 4  # 128 group priorities / 32
MIN_BPR = 0
MIN_ABPR = 1

# GICD_CTLR / GICC_CTLR bits (GICv2 without security extensions).
GICD_CTLR_EN_GRP0 = 1 << 0
GICD_CTLR_EN_GRP1 = 1 << 1
GICC_CTLR_EN_GRP0 = 1 << 0
GICC_CTLR_EN_GRP1 = 1 << 1
GICC_CTLR_ACK_CTL = 1 << 2
GICC_CTLR_FIQ_EN = 1 << 3
GICC_CTLR_CBPR = 1 << 4
GICC_CTLR_EOIMODE = 1 << 9
GICC_CTLR_V2_MASK = 0x21F

# Distributor register offsets.
GICD_CTLR, GICD_TYPER, GICD_IIDR = 0x000, 0x004, 0x008
GICD_IGROUPR = 0x080
GICD_ISENABLER, GICD_ICENABLER = 0x100, 0x180
GICD_ISPENDR, GICD_ICPENDR = 0x200, 0x280
GICD_ISACTIVER, GICD_ICACTIVER = 0x300, 0x380
GICD_IPRIORITYR, GICD_ITARGETSR, GICD_ICFGR = 0x400, 0x800, 0xC00
GICD_SGIR, GICD_CPENDSGIR, GICD_SPENDSGIR = 0xF00, 0xF10, 0xF20
GICD_IDREGS = 0xFD0

# CPU interface register offsets.
GICC_CTLR, GICC_PMR, GICC_BPR, GICC_IAR, GICC_EOIR = 0x00, 0x04, 0x08, 0x0C, 0x10
GICC_RPR, GICC_HPPIR, GICC_ABPR = 0x14, 0x18, 0x1C
GICC_AIAR, GICC_AEOIR, GICC_AHPPIR = 0x20, 0x24, 0x28
GICC_APR0, GICC_NSAPR0, GICC_IIDR, GICC_DIR = 0xD0, 0xE0, 0xFC, 0x1000

# PIDR4..PIDR7, PIDR0..PIDR3, CIDR0..CIDR3 at 0xFD0..0xFFC: the bytes QEMU's GICv2 returns.
GICV2_ID_REGS = (0x04, 0x00, 0x00, 0x00, 0x90, 0xB4, 0x2B, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
GICD_IIDR_VALUE = 0x0000_043B  # Arm JEP106 implementer, as QEMU
GICC_IIDR_VALUE = (2 << 16) | 0x43B  # architecture version 2, Arm implementer

IrqListener = Callable[[int, bool], None]


class GicAccessError(Exception):
    """An access the GIC refuses (bad size, misaligned, or outside the decoded page); the caller turns it
    into a device error / external abort, as QEMU answers MEMTX_ERROR or an unassigned access."""


class Gic:
    """GICv2 state for ``num_cpu`` CPU interfaces and ``num_irq`` interrupt IDs (a multiple of 32)."""

    def __init__(
        self,
        num_cpu: int,
        num_irq: int = VIRT_NUM_IRQ,
        priority_bits: int = 8,
        on_irq_change: IrqListener | None = None,
        on_fiq_change: IrqListener | None = None,
    ) -> None:
        if not 1 <= num_cpu <= GIC_NCPU:
            raise ValueError(f"GICv2 supports 1..{GIC_NCPU} CPU interfaces, not {num_cpu}")
        if num_irq < 32 or num_irq % 32 or num_irq > GIC_MAXIRQ + 4:
            raise ValueError(f"{num_irq} interrupts: must be a multiple of 32 between 32 and 1024")
        if not 4 <= priority_bits <= 8:
            raise ValueError("priority_bits must be 4..8")
        self.num_cpu = num_cpu
        self.num_irq = min(num_irq, GIC_MAXIRQ)
        self._typer_irq = num_irq
        self._prio_mask = (0xFF << (8 - priority_bits)) & 0xFF
        self.on_irq_change = on_irq_change
        #: The FIQ outputs: a Group 0 interrupt with GICC_CTLR.FIQEn set is signalled as FIQ (QEMU's gic_update).
        self.on_fiq_change = on_fiq_change
        self.generation = 0
        self._lock = threading.Lock()
        # Orders deliveries of the outputs (``_notify``); taken before ``_lock`` and before the listener's locks.
        self._deliver = threading.RLock()
        self.ack_ns = array.array("q")
        self.eoi_ns = array.array("q")
        self._reset_locked()

    # ----------------------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Return to the power-on state QEMU's ``arm_gic_common_reset_hold`` gives (lines dropped too)."""
        with self._lock:
            self._reset_locked()
            changes = self._update()
        self._notify(changes)

    def _reset_locked(self) -> None:
        n, c = self.num_irq, self.num_cpu
        # Per-interrupt CPU bitmasks (bit = CPU interface), as QEMU's gic_irq_state.
        self._enabled = [0] * n
        self._pending = [0] * n
        self._active = [0] * n
        self._level = [0] * n
        self._group = [0] * n
        self._edge = [False] * n
        self._prio_banked = [[0] * GIC_INTERNAL for _ in range(c)]
        self._prio_spi = [0] * (n - GIC_INTERNAL)
        self._target = [1 if c == 1 else 0] * n
        self._sgi_pending = [[0] * GIC_NR_SGIS for _ in range(c)]  # [cpu][sgi] -> source CPU mask
        for sgi in range(GIC_NR_SGIS):
            self._enabled[sgi] = ALL_CPU_MASK
            self._edge[sgi] = True
        self._ctlr = 0
        self._cpu_ctlr = [0] * c
        self._pmr = [0] * c
        self._bpr = [MIN_BPR] * c
        self._abpr = [MIN_ABPR] * c
        self._running = [IDLE_PRIORITY] * c
        self._current_pending = [SPURIOUS] * c
        self._apr = [[0] * NR_APRS for _ in range(c)]
        self._nsapr = [[0] * NR_APRS for _ in range(c)]
        self._irq_out = [False] * c
        self._fiq_out = [False] * c
        self._raised_ns = [0] * n  # SPI -> when its line rose (device clock), until the guest's EOI

    def _priority(self, irq: int, cpu: int) -> int:
        return self._prio_banked[cpu][irq] if irq < GIC_INTERNAL else self._prio_spi[irq - GIC_INTERNAL]

    def _test_pending(self, irq: int, cm: int) -> bool:
        # A level-triggered interrupt is pending while its line is high, or when latched through ISPENDR.
        return bool(self._pending[irq] & cm) or (not self._edge[irq] and bool(self._level[irq] & cm))

    def _group_of(self, irq: int, cpu: int) -> int:
        return 1 if self._group[irq] & (1 << cpu) else 0

    def _update(self) -> list[tuple[int, bool]]:
        """Recompute HPPI and the IRQ/FIQ outputs of every CPU; return the outputs that changed, as (CPU, is FIQ)."""
        changes: list[tuple[int, bool]] = []
        pending, level = self._pending, self._level
        # Only interrupts latched or with a line high can be pending; skip the rest of the 288 cheaply.
        candidates = [irq for irq in range(self.num_irq) if pending[irq] or level[irq]]
        for cpu in range(self.num_cpu):
            cm = 1 << cpu
            self._current_pending[cpu] = SPURIOUS
            irq_level = fiq_level = False
            if self._ctlr & 3 and self._cpu_ctlr[cpu] & 3:
                best_irq, best_prio = SPURIOUS, IDLE_PRIORITY
                for irq in candidates:
                    if (
                        self._enabled[irq] & cm
                        and not self._active[irq] & cm
                        and (irq < GIC_INTERNAL or self._target[irq] & cm)
                        and self._test_pending(irq, cm)
                    ):
                        prio = self._priority(irq, cpu)
                        if prio < best_prio:
                            best_irq, best_prio = irq, prio
                if best_prio < self._pmr[cpu]:
                    self._current_pending[cpu] = best_irq
                    if best_prio < self._running[cpu]:
                        group = self._group_of(best_irq, cpu)
                        if self._ctlr & (1 << group) and self._cpu_ctlr[cpu] & (1 << group):
                            if group == 0 and self._cpu_ctlr[cpu] & GICC_CTLR_FIQ_EN:
                                fiq_level = True
                            else:
                                irq_level = True
            if fiq_level != self._fiq_out[cpu]:
                self._fiq_out[cpu] = fiq_level
                changes.append((cpu, True))
            if irq_level != self._irq_out[cpu]:
                self._irq_out[cpu] = irq_level
                changes.append((cpu, False))
        if changes:
            self.generation += 1
        return changes

    def _notify(self, changes: list[tuple[int, bool]]) -> None:
        """Tell the listeners the IRQ (``on_irq_change``) and FIQ (``on_fiq_change``) outputs that changed, one
        delivery at a time, each with the output as it is when delivered rather than the level computed under the
        lock.

        Two threads may compute changes one after the other (an acknowledge lowering the output, then a timer
        raising it) and reach this point in the other order: delivering the computed levels would leave the CPU
        with its line low under a GIC that says high, and a vCPU in WFI would sleep forever (EDK2 hung so in CI).
        The last delivery always reads a state no older than the last change."""
        if not changes:
            return
        with self._deliver:
            for cpu, fiq in changes:
                listener = self.on_fiq_change if fiq else self.on_irq_change
                if listener is not None:
                    listener(cpu, (self._fiq_out if fiq else self._irq_out)[cpu])

    # ----------------------------------------------------------------------------------- input lines

    def set_spi(self, spi: int, level: bool, since_ns: int = 0) -> None:
        """Drive shared peripheral line ``spi`` (0-based, interrupt ID 32 + spi; QEMU virt's "UART SPI 1" is
        ``set_spi(1, ...)``). Edge-configured: a rising edge latches pending on the targeted CPUs. ``since_ns``
        (CLOCK_MONOTONIC) is when the device raised it, for the latency samples."""
        irq = self._spi_irq(spi)
        with self._lock:
            if level and since_ns and not self._raised_ns[irq]:
                self._raised_ns[irq] = since_ns
            changes = self._set_line(irq, bool(level), ALL_CPU_MASK, self._target[irq])
        self._notify(changes)

    def pend_spi(self, spi: int, since_ns: int = 0) -> None:
        """Latch SPI ``spi`` pending on its targets, as a write of GICD_ISPENDR does (an edge-triggered device
        line), whatever the guest configured the SPI as."""
        irq = self._spi_irq(spi)
        with self._lock:
            if since_ns and not self._raised_ns[irq]:
                self._raised_ns[irq] = since_ns
            self._pending[irq] |= self._target[irq]
            changes = self._update()
        self._notify(changes)

    def take_latency(self) -> tuple[array.array[int], array.array[int]]:
        """The latency samples (ns) since the last call: raised to acknowledged, raised to EOI."""
        with self._lock:
            ack, eoi = self.ack_ns, self.eoi_ns
            self.ack_ns, self.eoi_ns = array.array("q"), array.array("q")
        return ack, eoi

    def _spi_irq(self, spi: int) -> int:
        """The interrupt ID of SPI ``spi``; ValueError when this GIC has no such SPI."""
        irq = spi + GIC_INTERNAL
        if not GIC_INTERNAL <= irq < self.num_irq:
            raise ValueError(f"SPI {spi} outside 0..{self.num_irq - GIC_INTERNAL - 1}")
        return irq

    def set_ppi(self, cpu: int, irq: int, level: bool) -> None:
        """Drive CPU ``cpu``'s private line for interrupt ID ``irq`` (16..31, e.g. timer PPIs 27 and 30)."""
        self._check_cpu(cpu)
        if not GIC_NR_SGIS <= irq < GIC_INTERNAL:
            raise ValueError(f"PPI interrupt ID {irq} outside 16..31")
        with self._lock:
            changes = self._set_line(irq, bool(level), 1 << cpu, 1 << cpu)
        self._notify(changes)

    def _set_line(self, irq: int, level: bool, cm: int, target: int) -> list[tuple[int, bool]]:
        if level == bool(self._level[irq] & cm):
            return []
        if level:
            self._level[irq] |= cm
            if self._edge[irq]:
                self._pending[irq] |= target
        else:
            self._level[irq] &= ~cm
        return self._update()

    # --------------------------------------------------------------------------------- vCPU queries

    def pending_for(self, cpu: int) -> bool:
        """Whether CPU ``cpu``'s IRQ output is asserted now: distributor and CPU interface enabled for the
        best interrupt's group, its priority below PMR and the running priority. The vCPU loop takes an IRQ
        exception (if PSTATE.I allows) or leaves WFI when this is true."""
        self._check_cpu(cpu)
        with self._lock:
            return self._irq_out[cpu]

    def can_signal(self, cpu: int) -> bool:
        """Whether the distributor and CPU ``cpu``'s interface are enabled for some group, so that an interrupt
        arriving later could be signalled to it (a WFI that cannot otherwise be woken halts)."""
        self._check_cpu(cpu)
        with self._lock:
            return bool(self._ctlr & 3 and self._cpu_ctlr[cpu] & 3)

    def fiq_pending_for(self, cpu: int) -> bool:
        """Whether CPU ``cpu``'s FIQ output is asserted (Group 0 interrupt with GICC_CTLR.FIQEn set)."""
        self._check_cpu(cpu)
        with self._lock:
            return self._fiq_out[cpu]

    def _check_cpu(self, cpu: int) -> None:
        if not 0 <= cpu < self.num_cpu:
            raise ValueError(f"CPU {cpu} outside 0..{self.num_cpu - 1}")

    # ------------------------------------------------------------------------------- distributor MMIO

    def dist_read(self, cpu: int, offset: int, size: int) -> int:
        """Read the distributor at ``offset`` (from GICD_BASE) as CPU ``cpu``: bytes, halfwords or words,
        composed byte by byte as QEMU's ``gic_dist_read`` does."""
        self._check_access(cpu, offset, size, GICD_DECODED, "distributor")
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._dist_readb(cpu, offset + i) << (8 * i)
            return value

    def dist_write(self, cpu: int, offset: int, size: int, value: int) -> None:
        """Write the distributor as CPU ``cpu``; GICD_SGIR acts only on a 32-bit write, as in QEMU."""
        self._check_access(cpu, offset, size, GICD_DECODED, "distributor")
        with self._lock:
            if size == 4 and offset == GICD_SGIR:
                self._send_sgi(cpu, value)
            else:
                for i in range(size):
                    self._dist_writeb(cpu, offset + i, (value >> (8 * i)) & 0xFF)
            changes = self._update()
        self._notify(changes)

    def _check_access(self, cpu: int, offset: int, size: int, decoded: int, what: str) -> None:
        self._check_cpu(cpu)
        if size not in (1, 2, 4):
            raise GicAccessError(f"GIC {what}: {size}-byte access at {offset:#x} (only 1, 2 or 4 bytes)")
        if offset % size:
            raise GicAccessError(f"GIC {what}: misaligned {size}-byte access at {offset:#x}")
        if not 0 <= offset < decoded:
            raise GicAccessError(f"GIC {what}: offset {offset:#x} is outside the decoded {decoded:#x} bytes")

    def _dist_readb(self, cpu: int, off: int) -> int:
        cm = 1 << cpu
        n = self.num_irq
        if off < 0x100:
            if off == GICD_CTLR:
                return self._ctlr
            if off == GICD_TYPER:
                return ((self._typer_irq // 32) - 1) | ((self.num_cpu - 1) << 5)
            if off < 0x0C:
                return (GICD_IIDR_VALUE >> (8 * (off - GICD_IIDR))) & 0xFF if off >= GICD_IIDR else 0
            if off >= GICD_IGROUPR:
                base = (off - GICD_IGROUPR) * 8
                return self._bits(base, lambda irq: bool(self._group[irq] & cm))
            return 0  # reserved: RAZ (QEMU logs a guest error)
        if off < 0x200:
            base = (off - (GICD_ISENABLER if off < GICD_ICENABLER else GICD_ICENABLER)) * 8
            return self._bits(base, lambda irq: bool(self._enabled[irq] & cm))
        if off < 0x300:
            base = (off - (GICD_ISPENDR if off < GICD_ICPENDR else GICD_ICPENDR)) * 8
            return self._bits(base, lambda irq: self._test_pending(irq, cm if irq < GIC_INTERNAL else ALL_CPU_MASK))
        if off < 0x400:
            base = (off - (GICD_ISACTIVER if off < GICD_ICACTIVER else GICD_ICACTIVER)) * 8
            return self._bits(
                base, lambda irq: bool(self._active[irq] & (cm if irq < GIC_INTERNAL else ALL_CPU_MASK))
            )
        if off < 0x800:
            irq = off - GICD_IPRIORITYR
            return self._priority(irq, cpu) & self._prio_mask if irq < n else 0
        if off < 0xC00:
            irq = off - GICD_ITARGETSR
            if self.num_cpu == 1 or irq >= n:
                return 0  # uniprocessor GIC: RAZ/WI
            return cm if irq < GIC_INTERNAL else self._target[irq]
        if off < 0xF00:
            base = (off - GICD_ICFGR) * 4
            value = 0
            for i in range(4):
                if base + i < n and self._edge[base + i]:
                    value |= 2 << (2 * i)
            return value
        if GICD_CPENDSGIR <= off < 0xF30:
            sgi = off - (GICD_CPENDSGIR if off < GICD_SPENDSGIR else GICD_SPENDSGIR)
            return self._sgi_pending[cpu][sgi]
        if off >= GICD_IDREGS:
            return GICV2_ID_REGS[(off - GICD_IDREGS) >> 2] if off % 4 == 0 else 0
        return 0  # GICD_SGIR (write-only) and reserved space: RAZ

    def _bits(self, base: int, test: Callable[[int], bool]) -> int:
        value = 0
        for i in range(8):
            if base + i < self.num_irq and test(base + i):
                value |= 1 << i
        return value

    def _dist_writeb(self, cpu: int, off: int, value: int) -> None:
        cm = 1 << cpu
        n = self.num_irq
        if off < 0x100:
            if off == GICD_CTLR:
                self._ctlr = value & (GICD_CTLR_EN_GRP0 | GICD_CTLR_EN_GRP1)
            elif off >= GICD_IGROUPR:
                base = (off - GICD_IGROUPR) * 8
                for i in range(min(8, n - base)):
                    mask = cm if base < GIC_INTERNAL else ALL_CPU_MASK  # banked for private interrupts
                    if value & (1 << i):
                        self._group[base + i] |= mask
                    else:
                        self._group[base + i] &= ~mask
            return  # TYPER/IIDR read-only; reserved WI
        if off < 0x400:
            self._write_bitmap(cpu, off, value)
            return
        if off < 0x800:
            irq = off - GICD_IPRIORITYR
            if irq < n:
                if irq < GIC_INTERNAL:
                    self._prio_banked[cpu][irq] = value & self._prio_mask
                else:
                    self._prio_spi[irq - GIC_INTERNAL] = value & self._prio_mask
            return
        if off < 0xC00:
            irq = off - GICD_ITARGETSR
            if self.num_cpu == 1 or irq < GIC_INTERNAL or irq >= n:
                return  # RAZ/WI uniprocessor; read-only for SGIs/PPIs
            self._target[irq] = value & ALL_CPU_MASK
            if self._pending[irq]:
                # Retargeting a pending SPI moves its pending state to the new targets (QEMU).
                self._pending[irq] = value & ALL_CPU_MASK
            return
        if off < 0xF00:
            base = (off - GICD_ICFGR) * 4
            if base < GIC_NR_SGIS:
                value |= 0xAA  # SGIs are always edge-triggered
            for i in range(min(4, n - base)):
                self._edge[base + i] = bool(value & (2 << (2 * i)))
            return
        if GICD_CPENDSGIR <= off < GICD_SPENDSGIR:
            sgi = off - GICD_CPENDSGIR
            self._sgi_pending[cpu][sgi] &= ~value
            if not self._sgi_pending[cpu][sgi]:
                self._pending[sgi] &= ~cm
            return
        if GICD_SPENDSGIR <= off < 0xF30:
            sgi = off - GICD_SPENDSGIR
            self._sgi_pending[cpu][sgi] |= value
            if self._sgi_pending[cpu][sgi]:
                # QEMU sets pending even for a zero write; we keep pending and the source mask consistent.
                self._pending[sgi] |= cm
            return
        # GICD_SGIR by bytes/halfwords, ID registers, reserved: WI

    def _write_bitmap(self, cpu: int, off: int, value: int) -> None:
        """ISENABLER..ICACTIVER: one byte covers 8 interrupts; SGI enables are fixed on, SGI pending is set
        and cleared only through GICD_SGIR/SPENDSGIR/CPENDSGIR."""
        reg = off & ~0x7F
        base = (off - reg) * 8
        if base >= self.num_irq:
            return
        private = base < GIC_INTERNAL
        cm = (1 << cpu) if private else ALL_CPU_MASK
        if base < GIC_NR_SGIS:
            if reg == GICD_ISENABLER:
                value = 0xFF
            elif reg in (GICD_ICENABLER, GICD_ISPENDR, GICD_ICPENDR):
                value = 0
        for i in range(8):
            if not value & (1 << i):
                continue
            irq = base + i
            if reg == GICD_ISENABLER:
                self._enabled[irq] |= cm
            elif reg == GICD_ICENABLER:
                self._enabled[irq] &= ~cm
            elif reg == GICD_ISPENDR:
                self._pending[irq] |= (1 << cpu) if private else self._target[irq]
            elif reg == GICD_ICPENDR:
                # QEMU clears the pending state on every CPU, PPIs included.
                self._pending[irq] &= ~ALL_CPU_MASK
            elif reg == GICD_ISACTIVER:
                self._active[irq] |= cm
            else:
                self._active[irq] &= ~cm

    def _send_sgi(self, cpu: int, value: int) -> None:
        sgi = value & 0xF
        target_filter = (value >> 24) & 3
        if target_filter == 0:
            mask = (value >> 16) & ALL_CPU_MASK
        elif target_filter == 1:
            mask = ALL_CPU_MASK ^ (1 << cpu)
        elif target_filter == 2:
            mask = 1 << cpu
        else:
            mask = ALL_CPU_MASK  # reserved filter: QEMU treats it as "all CPUs"
        mask &= (1 << self.num_cpu) - 1
        self._pending[sgi] |= mask
        for target in range(self.num_cpu):
            if mask & (1 << target):
                self._sgi_pending[target][sgi] |= 1 << cpu

    # ----------------------------------------------------------------------------- CPU interface MMIO

    def cpu_read(self, cpu: int, offset: int, size: int) -> int:
        """Read CPU ``cpu``'s interface at ``offset`` (from GICC_BASE). Reading GICC_IAR acknowledges."""
        self._check_access(cpu, offset, size, GICC_DECODED, "CPU interface")
        with self._lock:
            value = self._cpu_read_locked(cpu, offset)
            changes = self._update() if offset == GICC_IAR else []
        self._notify(changes)
        return value & ((1 << (8 * size)) - 1)

    def cpu_write(self, cpu: int, offset: int, size: int, value: int) -> None:
        """Write CPU ``cpu``'s interface (GICC_EOIR, GICC_DIR, masks, ...)."""
        self._check_access(cpu, offset, size, GICC_DECODED, "CPU interface")
        value &= (1 << (8 * size)) - 1
        with self._lock:
            self._cpu_write_locked(cpu, offset, value)
            changes = self._update()
        self._notify(changes)

    def _cpu_read_locked(self, cpu: int, off: int) -> int:
        if off == GICC_CTLR:
            return self._cpu_ctlr[cpu]
        if off == GICC_PMR:
            return self._pmr[cpu]
        if off == GICC_BPR:
            return self._bpr[cpu]
        if off == GICC_IAR:
            return self._acknowledge(cpu)
        if off == GICC_RPR:
            return min(self._running[cpu], 0xFF)
        if off == GICC_HPPIR:
            return self._visible_pending(cpu)
        if off == GICC_ABPR:
            return self._abpr[cpu]
        if GICC_APR0 <= off < GICC_APR0 + 4 * NR_APRS:
            return self._apr[cpu][(off - GICC_APR0) // 4]
        if GICC_NSAPR0 <= off < GICC_NSAPR0 + 4 * NR_APRS:
            return self._nsapr[cpu][(off - GICC_NSAPR0) // 4]
        if off == GICC_IIDR:
            return GICC_IIDR_VALUE
        # EOIR/DIR are write-only; AIAR/AEOIR/AHPPIR are not implemented by QEMU's GICv2: RAZ/WI.
        return 0

    def _cpu_write_locked(self, cpu: int, off: int, value: int) -> None:
        if off == GICC_CTLR:
            self._cpu_ctlr[cpu] = value & GICC_CTLR_V2_MASK
        elif off == GICC_PMR:
            self._pmr[cpu] = value & 0xFF & self._prio_mask
        elif off == GICC_BPR:
            self._bpr[cpu] = max(value & 7, MIN_BPR)
        elif off == GICC_EOIR:
            self._complete(cpu, value & 0x3FF)
        elif off == GICC_ABPR:
            self._abpr[cpu] = max(value & 7, MIN_ABPR)
        elif GICC_APR0 <= off < GICC_APR0 + 4 * NR_APRS:
            self._apr[cpu][(off - GICC_APR0) // 4] = value
            self._running[cpu] = self._prio_from_aprs(cpu)
        elif GICC_NSAPR0 <= off < GICC_NSAPR0 + 4 * NR_APRS:
            self._nsapr[cpu][(off - GICC_NSAPR0) // 4] = value
            self._running[cpu] = self._prio_from_aprs(cpu)
        elif off == GICC_DIR:
            self._deactivate(cpu, value & 0x3FF)
        # everything else: WI (QEMU logs a guest error)

    def _visible_pending(self, cpu: int) -> int:
        irq = self._current_pending[cpu]
        if irq < GIC_MAXIRQ and self._group_of(irq, cpu) == 1 and not self._cpu_ctlr[cpu] & GICC_CTLR_ACK_CTL:
            return GROUP1_HIDDEN
        return irq

    def _group_priority(self, cpu: int, irq: int) -> int:
        if not self._cpu_ctlr[cpu] & GICC_CTLR_CBPR and self._group_of(irq, cpu):
            bpr = self._abpr[cpu] - 1
        else:
            bpr = self._bpr[cpu]
        return self._priority(irq, cpu) & (0xFF << ((bpr & 7) + 1)) & 0xFF

    def _acknowledge(self, cpu: int) -> int:
        irq = self._visible_pending(cpu)
        if irq >= GIC_MAXIRQ:
            return irq
        if self._priority(irq, cpu) >= self._running[cpu]:
            return SPURIOUS
        prio = self._group_priority(cpu, irq)
        level = prio >> (MIN_BPR + 1)
        aprs = self._nsapr[cpu] if self._group_of(irq, cpu) else self._apr[cpu]
        aprs[level // 32] |= 1 << (level % 32)
        self._running[cpu] = prio
        self._active[irq] |= 1 << cpu
        if irq < GIC_NR_SGIS:
            sources = self._sgi_pending[cpu][irq]
            src = (sources & -sources).bit_length() - 1 if sources else 0
            self._sgi_pending[cpu][irq] &= ~(1 << src)
            if not self._sgi_pending[cpu][irq]:
                self._pending[irq] &= ~(1 << cpu)
            return irq | ((src & 7) << 10)
        # Clears only this CPU's latch; a level interrupt with its line high stays pending.
        self._pending[irq] &= ~(1 << cpu)
        raised = self._raised_ns[irq]
        if raised:
            self.ack_ns.append(max(1, time.monotonic_ns() - raised))
        return irq

    def _prio_from_aprs(self, cpu: int) -> int:
        for i in range(NR_APRS):
            bits = self._apr[cpu][i] | self._nsapr[cpu][i]
            if bits:
                return (i * 32 + (bits & -bits).bit_length() - 1) << (MIN_BPR + 1)
        return IDLE_PRIORITY

    def _complete(self, cpu: int, irq: int) -> None:
        if irq >= self.num_irq or self._running[cpu] == IDLE_PRIORITY:
            return  # spurious/non-existent ID, or nothing active: ignored
        group = self._group_of(irq, cpu)
        aprs = self._nsapr[cpu] if group else self._apr[cpu]
        for i in range(NR_APRS):
            if aprs[i]:
                aprs[i] &= aprs[i] - 1  # drop the highest active priority
                break
        self._running[cpu] = self._prio_from_aprs(cpu)
        if not self._cpu_ctlr[cpu] & GICC_CTLR_EOIMODE:
            self._active[irq] &= ~(1 << cpu)
        raised = self._raised_ns[irq]
        if raised:
            self._raised_ns[irq] = 0
            self.eoi_ns.append(max(1, time.monotonic_ns() - raised))

    def _deactivate(self, cpu: int, irq: int) -> None:
        if irq >= self.num_irq or not self._cpu_ctlr[cpu] & GICC_CTLR_EOIMODE:
            return  # GICC_DIR with EOImode clear is UNPREDICTABLE; QEMU ignores it
        self._active[irq] &= ~(1 << cpu)
