"""A small DMA engine for tests and demos (``dma-probe``): copies between guest memory and a 256-byte buffer.

Nothing like it exists on a real board; it is the smallest device that exercises what a virtio or fw_cfg
backend needs: DMA inside a register write (the vCPU waits for that write's completion meanwhile), DMA from a
thread of its own, and an interrupt line that says a transfer finished.

Registers (32-bit, little-endian), from the device's base:

======  ========  ==========================================================================================
0x00    ADDR_LO   guest-physical address of the transfer, low word
0x04    ADDR_HI   high word
0x08    LEN       bytes to move, 1-256
0x0C    CMD       write 1: guest memory -> buffer, 2: buffer -> guest memory, both inside the write;
                  3: buffer -> guest memory later, on the device's own thread (STATUS busy until then)
0x10    STATUS    0 done, 1 busy, 2 the DMA was refused (the error is in the buffer, and in the log)
0x14    DONE      reads 1 while the "done" interrupt (line 0) is raised; writing anything lowers it
0x100   BUF       the buffer, 256 bytes, any access size
======  ========  ==========================================================================================

Every finished command (done or refused) raises line 0 ("done", level) until DONE is written.
"""

from __future__ import annotations

import logging
import threading

from device_service.model import (
    AccessError,
    AccessResult,
    DeviceModel,
    DmaError,
    LineSpec,
    RegionSpec,
    check_span,
)

log = logging.getLogger("mmiosplit.devices")

ADDR_LO, ADDR_HI, LEN, CMD, STATUS, DONE = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14
BUF = 0x100
BUF_SIZE = 0x100
REGION_SIZE = 0x200

CMD_READ, CMD_WRITE, CMD_WRITE_LATER = 1, 2, 3
STATUS_DONE, STATUS_BUSY, STATUS_ERROR = 0, 1, 2


class DmaProbe(DeviceModel):
    """Moves up to 256 bytes between guest memory and its buffer by DMA, and says when it is done."""

    type_name = "dma-probe"
    compatible = ("mmiosplit,dma-probe",)
    does_dma = True

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base)
        self.buffer = bytearray(BUF_SIZE)
        self.regs = {ADDR_LO: 0, ADDR_HI: 0, LEN: 0}
        self.status = STATUS_DONE
        self.done = False
        self.last_error = ""

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, REGION_SIZE)]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(0, "done")]

    def reset(self) -> None:
        with self.lock:
            self.buffer = bytearray(BUF_SIZE)
            self.regs = {ADDR_LO: 0, ADDR_HI: 0, LEN: 0}
            self.status = STATUS_DONE
            self._set_done(False)

    def read(self, offset: int, size: int) -> AccessResult:
        error = check_span(offset, size, REGION_SIZE, "read")
        if error is not None:
            return error
        if offset >= BUF:
            return AccessResult.success(int.from_bytes(self.buffer[offset - BUF:offset - BUF + size], "little"))
        if size != 4 or offset % 4:
            return AccessResult.failure(AccessError.INVALID_ACCESS_SIZE, f"registers take aligned 4-byte reads, "
                                        f"not {size} bytes at {offset:#x}")
        if offset in self.regs:
            return AccessResult.success(self.regs[offset])
        if offset == STATUS:
            return AccessResult.success(self.status)
        if offset == DONE:
            return AccessResult.success(int(self.done))
        if offset == CMD:
            return AccessResult.success(0)
        return AccessResult.failure(AccessError.INVALID_REGISTER, f"no register at {offset:#x}")

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        error = check_span(offset, size, REGION_SIZE, "write")
        if error is not None:
            return error
        if offset >= BUF:
            self.buffer[offset - BUF:offset - BUF + size] = value.to_bytes(size, "little")
            return AccessResult.success()
        if size != 4 or offset % 4:
            return AccessResult.failure(AccessError.INVALID_ACCESS_SIZE, f"registers take aligned 4-byte writes, "
                                        f"not {size} bytes at {offset:#x}")
        if offset in self.regs:
            self.regs[offset] = value
        elif offset == DONE:
            self._set_done(False)
        elif offset == CMD:
            return self._command(value)
        elif offset != STATUS:
            return AccessResult.failure(AccessError.INVALID_REGISTER, f"no register at {offset:#x}")
        return AccessResult.success()

    @property
    def address(self) -> int:
        return self.regs[ADDR_HI] << 32 | self.regs[ADDR_LO]

    def _command(self, command: int) -> AccessResult:
        length = self.regs[LEN]
        if not 1 <= length <= BUF_SIZE:
            return AccessResult.failure(AccessError.DEVICE_FAULT, f"LEN {length} is not 1-{BUF_SIZE}")
        if self.status == STATUS_BUSY:
            return AccessResult.failure(AccessError.DEVICE_FAULT, "a transfer is still running")
        if command == CMD_READ:
            self._transfer(lambda: self.buffer.__setitem__(slice(0, length), self.dma.read(self.address, length)))
        elif command == CMD_WRITE:
            self._transfer(lambda: self.dma.write(self.address, bytes(self.buffer[:length])))
        elif command == CMD_WRITE_LATER:
            address, data = self.address, bytes(self.buffer[:length])
            self.status = STATUS_BUSY
            threading.Thread(target=self._later, args=(address, data), name=f"{self.name}-dma", daemon=True).start()
        else:
            return AccessResult.failure(AccessError.DEVICE_FAULT, f"unknown command {command}")
        return AccessResult.success()

    def _transfer(self, move: object) -> None:
        """Run one DMA (with the device's lock held, inside an access), then finish the command."""
        assert callable(move)
        try:
            move()
        except DmaError as exc:
            self._fail(str(exc))
        else:
            self.status = STATUS_DONE
        self._set_done(True)

    def _later(self, address: int, data: bytes) -> None:
        """The asynchronous write: the DMA runs without the device's lock (nothing waits on it), then the device
        finishes under its lock and raises the line without any access."""
        try:
            self.dma.write(address, data)
            error = ""
        except DmaError as exc:
            error = str(exc)
        with self.lock:
            if error:
                self._fail(error)
            else:
                self.status = STATUS_DONE
            self._set_done(True)

    def _fail(self, message: str) -> None:
        self.status = STATUS_ERROR
        self.last_error = message
        text = message.encode()[:BUF_SIZE]
        self.buffer[:] = text + bytes(BUF_SIZE - len(text))
        log.warning("%s", message)

    def _set_done(self, done: bool) -> None:
        self.done = done
        self.irq_lines[0].set(done)
