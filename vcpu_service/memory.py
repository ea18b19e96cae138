"""Guest memory as the vcpu service holds it: RAM blocks every vCPU maps, and the mirrors of ROMD regions."""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

from mmiosplit.mmio import RemoteRegion


class RamBlock:
    """One RAM region: host memory that every vCPU's Unicorn maps with mem_map_ptr."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._pin = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(self._pin)

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, address: int, length: int) -> bool:
        return self.base <= address and address + length <= self.end

    def read(self, address: int, length: int) -> bytes:
        off = address - self.base
        return self._map[off:off + length]

    def write(self, address: int, data: bytes) -> None:
        off = address - self.base
        self._map[off:off + len(data)] = data

    def close(self) -> None:
        del self._pin
        self._map.close()


@dataclass(slots=True)
class Mirror:
    """The vcpu service's copy of a ROMD region: mapped read-only while enabled, else unmapped."""

    region: RemoteRegion
    block: RamBlock
    enabled: bool
