"""ARM PrimeCell UART (PL011).

Offsets, reset values and bit names follow the PL011 Technical Reference
Manual (ARM DDI 0183); where the manual leaves room, behaviour follows QEMU's
``hw/char/pl011.c`` (7.2), because firmware console output is compared byte for
byte with QEMU's:

* transmission is instant and ignores UARTEN/TXE, so FR.TXFE is always set and
  the TX interrupt is raised on every DR write;
* changing LCR_H.FEN empties the receive FIFO;
* registers take 1-, 2- and 4-byte accesses at their own offset.

Every register whose read changes nothing (all but DR, which pops the RX FIFO, and the write-only
ICR) is a shadow register for 32-bit reads, the size U-Boot and Linux use: the vCPU process answers
them from a copy, so a guest polling FR costs no round trip. Input arriving on the console is the
one change that comes without a guest access, and ``receive`` reports it (``shadows_changed``).

The interrupt output UARTINTR (line 0, "uartintr", level) is RIS & IMSC, driven after every register access
and on receive, as QEMU's ``pl011_update``: the RX, TX and receive-timeout (RT) interrupts reach the GIC
through it. Other outputs (UARTRXINTR, UARTTXINTR...) are not wired on ``virt`` and are not modelled.

Differences from QEMU 7.2, taken from the manual: the RX interrupt fires when
the FIFO reaches the UARTIFLS trigger level (QEMU fires at one character), and
the receive-timeout status is set while received data waits (QEMU never sets
it), so drivers that wait for either still see their input. There is no
loopback (CR.LBE), no break, and no modem lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from device_service.model import AccessResult, DeviceModel, LineSpec, RegionSpec
from device_service.registers import Register, RegisterBank, primecell_id_registers

# UARTFR, flag register
FR_TXFE = 1 << 7  # transmit FIFO empty
FR_RXFF = 1 << 6  # receive FIFO full
FR_TXFF = 1 << 5  # transmit FIFO full
FR_RXFE = 1 << 4  # receive FIFO empty
FR_BUSY = 1 << 3

# UARTLCR_H, line control
LCR_H_FEN = 1 << 4  # FIFOs enabled

# UARTCR, control
CR_UARTEN = 1 << 0
CR_TXE = 1 << 8
CR_RXE = 1 << 9

# UARTIMSC / UARTRIS / UARTMIS / UARTICR bits
INT_RI = 1 << 0
INT_CTS = 1 << 1
INT_DCD = 1 << 2
INT_DSR = 1 << 3
INT_RX = 1 << 4
INT_TX = 1 << 5
INT_RT = 1 << 6  # receive timeout
INT_FE = 1 << 7
INT_PE = 1 << 8
INT_BE = 1 << 9
INT_OE = 1 << 10
INT_ALL = (1 << 11) - 1

#: Receive FIFO depth with LCR_H.FEN set; without it the FIFO is one character deep.
FIFO_DEPTH = 32

#: UARTIFLS.RXIFLSEL (bits 5:3) trigger levels in eighths of the FIFO: 1/8, 1/4, 1/2, 3/4, 7/8.
#: Reserved encodings behave as 1/2, the reset level.
RX_TRIGGER_EIGHTHS = (1, 2, 4, 6, 7)

#: UARTPeriphID0-3 and UARTPCellID0-3 (0xFE0-0xFFC). These are the bytes QEMU's
#: ``pl011_id_arm`` returns, not those of any one hardware revision, so that
#: firmware that prints them (U-Boot ``md``) matches QEMU byte for byte.
PRIMECELL_ID = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)

#: How much transmitted output the model keeps: the inspection log, and the
#: undelivered backlog while no sink is attached. Both keep at least the last
#: this-many bytes (trimmed in chunks, so at most twice as many).
TX_KEEP_BYTES = 64 * 1024

REGION_SIZE = 0x1000

#: Shadow registers are served for reads of this size only (other sizes exit as usual).
SHADOW_SIZE = 4


def _append_bounded(buffer: bytearray, data: bytes, keep: int) -> int:
    """Append, then drop the oldest bytes once the buffer holds twice ``keep``; returns bytes dropped."""
    buffer += data
    excess = len(buffer) - keep
    if len(buffer) >= 2 * keep:
        del buffer[:excess]
        return excess
    return 0


class Pl011(DeviceModel):
    """A PL011 UART whose transmitter drains instantly and whose receiver is fed by ``receive``."""

    type_name = "pl011"
    compatible = ("arm,pl011", "arm,primecell")

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base)
        self.rx_fifo: deque[int] = deque()
        #: Everything transmitted (at least the last TX_KEEP_BYTES), whether or not a sink took it.
        self.tx_log = bytearray()
        #: Transmitted bytes waiting for a sink; delivered by ``set_output``.
        self.tx_backlog = bytearray()
        #: Bytes that fell off the full backlog before any sink was attached.
        self.tx_dropped = 0
        self._sink: Callable[[bytes], None] | None = None
        self.regs = RegisterBank(
            [
                Register("DR", 0x000, mask=0xFF, on_read=self._read_dr, on_write=self._write_dr,
                         side_effect_free_read=False, volatile=True),
                Register("RSR", 0x004, mask=0xF, on_write=self._write_ecr),  # RSR on read, ECR on write
                Register("FR", 0x018, reset=FR_TXFE | FR_RXFE, access="ro", on_read=self._read_fr,
                         volatile=True),
                Register("ILPR", 0x020, mask=0xFF),
                Register("IBRD", 0x024, mask=0xFFFF),
                Register("FBRD", 0x028, mask=0x3F),
                Register("LCR_H", 0x02C, mask=0xFF, on_write=self._write_lcr_h),
                Register("CR", 0x030, reset=CR_RXE | CR_TXE, mask=0xFFFF),
                Register("IFLS", 0x034, reset=0x12, mask=0x3F),
                Register("IMSC", 0x038, mask=INT_ALL),
                Register("RIS", 0x03C, access="ro", volatile=True),
                Register("MIS", 0x040, access="ro", on_read=self._read_mis, volatile=True),
                Register("ICR", 0x044, access="wo", mask=INT_ALL, on_write=self._write_icr),
                Register("DMACR", 0x048, mask=0x7),
                *primecell_id_registers(PRIMECELL_ID),
            ]
        )  # fmt: skip
        self._shadow_registers = {r.offset: r for r in self.regs.side_effect_free_reads if r.access != "wo"}
        self._shadows = tuple((offset, SHADOW_SIZE) for offset in self._shadow_registers)

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, REGION_SIZE, access_sizes=(1, 2, 4), shadows=self._shadows)]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(0, "uartintr")]

    def peek(self, region: str, offset: int, size: int) -> bytes:
        """A shadow register's value now, as a 4-byte read returns it; refuses DR (its read pops the FIFO)
        and anything not declared. Called after every access to the UART, so it skips the access checks."""
        register = self._shadow_registers.get(offset) if region == "regs" and size == SHADOW_SIZE else None
        if register is None:
            raise ValueError(f"{self.name}: no shadow register of {size} bytes at {region}+{offset:#x}")
        value = register.on_read() if register.on_read is not None else self.regs.values[register.name]
        return value.to_bytes(SHADOW_SIZE, "little")

    def read(self, offset: int, size: int) -> AccessResult:
        result = self.regs.read(offset, size)
        self._update()
        return result

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        result = self.regs.write(offset, size, value)
        self._update()
        return result

    def reset(self) -> None:
        """Reset registers and empty the RX FIFO; transmitted output (log, backlog, sink) is kept."""
        with self.lock:
            self.regs.reset()
            self.rx_fifo.clear()
            self._update()

    def describe(self) -> dict[str, str]:
        return {"fifo-depth": str(FIFO_DEPTH)}

    # --- ConsoleDevice ---------------------------------------------------------------------

    def set_output(self, sink: Callable[[bytes], None] | None) -> None:
        """Send transmitted bytes to ``sink``; anything transmitted while none was attached goes first."""
        with self.lock:
            self._sink = sink
            if sink is not None and self.tx_backlog:
                pending = bytes(self.tx_backlog)
                self.tx_backlog.clear()
                sink(pending)

    def receive(self, data: bytes) -> int:
        """Put input into the RX FIFO while it has room; returns how many bytes were taken.

        FR, RIS and MIS change without a guest access, so the shadow copies are told (outside the lock).
        """
        with self.lock:
            taken = data[: self.rx_space()]
            if not taken:
                return 0
            before = len(self.rx_fifo)
            self.rx_fifo.extend(taken)
            trigger = self.rx_trigger_level()
            if before < trigger <= len(self.rx_fifo):
                self.regs["RIS"] |= INT_RX
            self.regs["RIS"] |= INT_RT
            self._update()
        self.shadows_changed()
        return len(taken)

    def rx_space(self) -> int:
        return self.fifo_depth() - len(self.rx_fifo)

    # --- state ---------------------------------------------------------------------------

    def fifo_depth(self) -> int:
        """32 characters with LCR_H.FEN set, else 1 (the manual's character mode)."""
        return FIFO_DEPTH if self.regs["LCR_H"] & LCR_H_FEN else 1

    def rx_trigger_level(self) -> int:
        """How many received characters raise the RX interrupt (UARTIFLS.RXIFLSEL)."""
        if not self.regs["LCR_H"] & LCR_H_FEN:
            return 1
        select = (self.regs["IFLS"] >> 3) & 0x7
        eighths = RX_TRIGGER_EIGHTHS[select] if select < len(RX_TRIGGER_EIGHTHS) else 4
        return FIFO_DEPTH * eighths // 8

    def _update(self) -> None:
        """Drive UARTINTR: any raw status bit that is unmasked (QEMU's ``pl011_update``)."""
        self.irq_lines[0].set(bool(self.regs["RIS"] & self.regs["IMSC"]))

    # --- register behaviour ------------------------------------------------------------------

    def _read_dr(self) -> int:
        """Pop the oldest received character; error bits 8-11 are always clear. Empty reads 0."""
        if not self.rx_fifo:
            return 0
        character = self.rx_fifo.popleft()
        if len(self.rx_fifo) < self.rx_trigger_level():
            self.regs["RIS"] &= ~INT_RX
        if not self.rx_fifo:
            self.regs["RIS"] &= ~INT_RT
        return character

    def _write_dr(self, old: int, new: int) -> None:
        character = bytes((new & 0xFF,))
        _append_bounded(self.tx_log, character, TX_KEEP_BYTES)
        if self._sink is not None:
            self._sink(character)
        else:
            self.tx_dropped += _append_bounded(self.tx_backlog, character, TX_KEEP_BYTES)
        self.regs["RIS"] |= INT_TX

    def _write_ecr(self, old: int, new: int) -> None:
        """Any write to UARTECR clears the receive error status."""
        self.regs["RSR"] = 0

    def _read_fr(self) -> int:
        depth = self.fifo_depth()
        level = len(self.rx_fifo)
        flags = FR_TXFE
        if level == 0:
            flags |= FR_RXFE
        if level >= depth:
            flags |= FR_RXFF
        return flags

    def _write_lcr_h(self, old: int, new: int) -> None:
        if (old ^ new) & LCR_H_FEN:
            self.rx_fifo.clear()
            self.regs["RIS"] &= ~(INT_RX | INT_RT)

    def _read_mis(self) -> int:
        return self.regs["RIS"] & self.regs["IMSC"]

    def _write_icr(self, old: int, new: int) -> None:
        self.regs["RIS"] &= ~new
