"""ARM PrimeCell GPIO (PL061), enough for QEMU virt's GPIO block (the poweroff key's controller).

Offsets from the PL061 Technical Reference Manual (ARM DDI 0190): GPIODATA is a 256-word window whose
address bits [9:2] mask which pins a read sees or a write changes; ID bytes as QEMU's ``pl061_id``.
An output pin reads back what was written; an input pin reads what ``set_input`` drives (0 until then).

Interrupts follow QEMU's ``pl061_update``: an input pin configured edge-sensitive (IS clear) latches RIS on
the edge IEV selects, or on both with IBE; a level-sensitive one (IS set) holds RIS while its level equals
IEV. The combined output GPIOINTR (line 0, "gpiointr", level; what ``virt`` wires to SPI 7) is RIS & IE,
driven after every register access and input change.
"""

from __future__ import annotations

from device_service.model import AccessResult, DeviceModel, LineSpec, RegionSpec
from device_service.registers import Register, RegisterBank, primecell_id_registers

PRIMECELL_ID = (0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
DATA_WINDOW_END = 0x400
REGION_SIZE = 0x1000


class Pl061(DeviceModel):
    """Eight GPIO pins with direction, interrupt configuration and the masked data window."""

    type_name = "pl061"
    compatible = ("arm,pl061", "arm,primecell")

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base)
        self.data = 0
        self.inputs = 0  # levels driven on the pins from outside
        self.regs = RegisterBank([
            Register("DIR", 0x400, mask=0xFF),
            Register("IS", 0x404, mask=0xFF),
            Register("IBE", 0x408, mask=0xFF),
            Register("IEV", 0x40C, mask=0xFF),
            Register("IE", 0x410, mask=0xFF),
            Register("RIS", 0x414, access="ro"),
            Register("MIS", 0x418, access="ro", on_read=lambda: self.regs["RIS"] & self.regs["IE"]),
            Register("IC", 0x41C, access="wo", mask=0xFF, on_write=self._clear),
            Register("AFSEL", 0x420, mask=0xFF),
            *primecell_id_registers(PRIMECELL_ID),
        ])

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, REGION_SIZE, access_sizes=(1, 2, 4))]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(0, "gpiointr")]

    def read(self, offset: int, size: int) -> AccessResult:
        if offset < DATA_WINDOW_END:
            if offset % 4:
                return self.regs.read(offset, size)  # not a word boundary: refused as unaligned
            mask = (offset >> 2) & 0xFF
            direction = self.regs["DIR"]
            return AccessResult.success(((self.data & direction) | (self.inputs & ~direction)) & mask)
        result = self.regs.read(offset, size)
        self._update()
        return result

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        if offset < DATA_WINDOW_END:
            if offset % 4:
                return self.regs.write(offset, size, value)
            mask = (offset >> 2) & 0xFF & self.regs["DIR"]
            self.data = (self.data & ~mask) | (value & mask)
            return AccessResult.success()
        result = self.regs.write(offset, size, value)
        self._update()
        return result

    def reset(self) -> None:
        with self.lock:
            self.regs.reset()
            self.data = 0
            self._update()

    def set_input(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` (0-7) from outside, as a board wires a key to it; edges latch as configured."""
        if not 0 <= pin < 8:
            raise ValueError(f"{self.name}: no GPIO pin {pin}")
        bit = 1 << pin
        with self.lock:
            old = self.inputs
            self.inputs = old | bit if level else old & ~bit
            changed = (old ^ self.inputs) & bit & ~self.regs["DIR"]
            if changed and not self.regs["IS"] & bit:  # edge-sensitive
                rising = bool(self.inputs & bit)
                if self.regs["IBE"] & bit or rising == bool(self.regs["IEV"] & bit):
                    self.regs["RIS"] |= bit
            self._update()

    def _update(self) -> None:
        """Level-sensitive pins hold RIS while their level equals IEV; GPIOINTR is RIS & IE (``pl061_update``)."""
        level_pins = self.regs["IS"] & ~self.regs["DIR"] & 0xFF
        if level_pins:
            matching = ~(self.inputs ^ self.regs["IEV"]) & level_pins
            self.regs["RIS"] = (self.regs["RIS"] & ~level_pins) | matching
        self.irq_lines[0].set(bool(self.regs["RIS"] & self.regs["IE"]))

    def _clear(self, old: int, new: int) -> None:
        self.regs["RIS"] &= ~new
