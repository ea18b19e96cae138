"""ARM PrimeCell GPIO (PL061), enough for QEMU virt's GPIO block (the poweroff key's controller).

Offsets from the PL061 Technical Reference Manual (ARM DDI 0190): GPIODATA is a 256-word window whose
address bits [9:2] mask which pins a read sees or a write changes; ID bytes as QEMU's ``pl061_id``.
No pin is driven from outside yet, so inputs read as 0; an output pin reads back what was written.
"""

from __future__ import annotations

from device_service.model import AccessResult, DeviceModel, RegionSpec
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

    def read(self, offset: int, size: int) -> AccessResult:
        if offset < DATA_WINDOW_END:
            if offset % 4:
                return self.regs.read(offset, size)  # not a word boundary: refused as unaligned
            mask = (offset >> 2) & 0xFF
            return AccessResult.success(self.data & self.regs["DIR"] & mask)
        return self.regs.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        if offset < DATA_WINDOW_END:
            if offset % 4:
                return self.regs.write(offset, size, value)
            mask = (offset >> 2) & 0xFF & self.regs["DIR"]
            self.data = (self.data & ~mask) | (value & mask)
            return AccessResult.success()
        return self.regs.write(offset, size, value)

    def reset(self) -> None:
        self.regs.reset()
        self.data = 0

    def _clear(self, old: int, new: int) -> None:
        self.regs["RIS"] &= ~new
