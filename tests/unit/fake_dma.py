"""An in-memory ``Dma`` for device-model tests: guest RAM as a bytearray inside one granted window.

Device models reach guest memory only through ``DeviceModel.dma``; the real handle (granted windows,
carried over the device-initiated stream) belongs to the host. These tests need only the protocol:
reads and writes inside the window work, anything touching outside it raises ``DmaError`` and writes
nothing, as the real handle promises.
"""

from __future__ import annotations

from device_service.model import Dma, DmaError


class FakeDma:
    """``size`` bytes of guest RAM at guest-physical ``base``; records every access for tests to inspect."""

    def __init__(self, base: int = 0x4000_0000, size: int = 1 << 20) -> None:
        self.base = base
        self.ram = bytearray(size)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def _offset(self, address: int, length: int, verb: str) -> int:
        offset = address - self.base
        if offset < 0 or length < 0 or offset + length > len(self.ram):
            raise DmaError(f"fake: DMA {verb} of {length} bytes at {address:#x} is outside the window "
                           f"{self.base:#x}+{len(self.ram):#x}")
        return offset

    def read(self, address: int, length: int) -> bytes:
        offset = self._offset(address, length, "read")
        self.reads.append((address, length))
        return bytes(self.ram[offset : offset + length])

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data), "write")
        self.writes.append((address, len(data)))
        self.ram[offset : offset + len(data)] = data

    # --- helpers for tests (not part of the protocol) -------------------------------------------

    def put(self, address: int, data: bytes) -> None:
        """Store bytes as the guest would, without recording a device access."""
        offset = self._offset(address, len(data), "put")
        self.ram[offset : offset + len(data)] = data

    def get(self, address: int, length: int) -> bytes:
        """Look at guest memory without recording a device access."""
        offset = self._offset(address, length, "get")
        return bytes(self.ram[offset : offset + length])


def _check() -> Dma:
    return FakeDma()  # mypy: FakeDma implements the Dma protocol
