"""DMA by device models into guest RAM, through the windows a VM grants each device service.

A ``GuestDma`` is one device service's view of one VM's memory (``mmiosplit.mmio.DmaTarget``): every request
must lie wholly inside one granted window, or it is refused with a ``DmaError`` naming the device, the address
and the windows, and nothing is read or written. The transports carry its calls: over gRPC the Watch stream's
reader thread serves them (never a vCPU's thread, so a device may DMA while a vCPU waits for its completion), in
process the model calls it directly.

A write tells the VM which bytes changed (``on_write``), so that code Unicorn translated from them is dropped
before a vCPU runs it again (the ROMD mirrors' patch log does the same for flash).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mmiosplit.mmio import DmaError, DmaWindow
from vcpu_service.memory import RamBlock

#: The largest single DMA request served (a device splits bigger transfers).
MAX_DMA_BYTES = 16 << 20


def check_windows(service: str, windows: Iterable[DmaWindow], ram: Iterable[RamBlock]) -> tuple[DmaWindow, ...]:
    """The windows, each checked to be non-empty, inside one RAM block, and named once; ValueError otherwise."""
    blocks = list(ram)
    out: list[DmaWindow] = []
    for w in windows:
        where = f"DMA window {w.name!r} of device service {service}"
        if not w.name:
            raise ValueError(f"a DMA window of device service {service} needs a name")
        if any(o.name == w.name for o in out):
            raise ValueError(f"{where} is granted twice")
        if w.size <= 0:
            raise ValueError(f"{where} is empty")
        if not any(b.contains(w.base, w.size) for b in blocks):
            ram_text = ", ".join(f"0x{b.base:x}-0x{b.end - 1:x}" for b in blocks) or "none"
            raise ValueError(f"{where} (0x{w.base:x}-0x{w.end - 1:x}) is not inside one RAM region ({ram_text})")
        out.append(w)
    return tuple(out)


class GuestDma:
    """What one device service's devices may reach of one VM's RAM."""

    def __init__(self, service: str, windows: tuple[DmaWindow, ...], ram: Callable[[int, int], RamBlock | None],
                 on_write: Callable[[int, int], None] | None = None) -> None:
        self.service = service
        self._windows = windows
        self._ram = ram
        self._on_write = on_write
        self.reads = self.writes = 0
        self.bytes_read = self.bytes_written = 0
        self.refused = 0

    @property
    def windows(self) -> tuple[DmaWindow, ...]:
        return self._windows

    def _block(self, device: str, verb: str, address: int, length: int) -> RamBlock:
        what = f"{device}: DMA {verb} of {length} bytes at 0x{address:x}"
        if length > MAX_DMA_BYTES:
            self.refused += 1
            raise DmaError(f"{what} refused: more than {MAX_DMA_BYTES} bytes in one request")
        if address < 0 or length < 0:
            self.refused += 1
            raise DmaError(f"{what} refused: negative address or length")
        for window in self._windows:
            if window.base <= address and address + length <= window.end:
                block = self._ram(address, length)
                if block is not None:
                    return block
        self.refused += 1
        granted = ", ".join(map(str, self._windows)) or "none"
        raise DmaError(f"{what} refused: outside every DMA window granted to device service {self.service} "
                       f"(windows: {granted})")

    def dma_read(self, device: str, address: int, length: int) -> bytes:
        block = self._block(device, "read", address, length)
        try:
            data = block.read(address, length)
        except ValueError:  # the VM was deleted meanwhile (its RAM is unmapped)
            raise DmaError(f"{device}: DMA read at 0x{address:x} failed: the VM's memory is gone") from None
        self.reads += 1
        self.bytes_read += length
        return data

    def dma_write(self, device: str, address: int, data: bytes) -> None:
        block = self._block(device, "write", address, len(data))
        try:
            block.write(address, data)
        except ValueError:
            raise DmaError(f"{device}: DMA write at 0x{address:x} failed: the VM's memory is gone") from None
        self.writes += 1
        self.bytes_written += len(data)
        if self._on_write is not None and data:
            self._on_write(address, address + len(data))
