"""Stopping a vCPU from another thread never runs an instruction twice (fastreg.SafeStop).

Unicorn's own ``uc_emu_stop`` from another thread is honoured after any load or store and resumes at that
instruction: a store-exclusive then stores twice and a load into its own base register loads from the wrong
address. The guest here does both in a loop while another thread stops it thousands of times."""

from __future__ import annotations

import struct
import threading
import time

from unicorn import arm64_const as a64

from vcpu_service import fastreg
from vcpu_service.arch import arch_by_name, close_uc

# x0 = counter, x3 = iterations, x5 walks a ring of pointers (a load into its own base register).
_LOOP = [
    0xC85F7C01,  # loop: ldxr x1, [x0]
    0x91000421,  #       add  x1, x1, #1
    0xC8027C01,  #       stxr w2, x1, [x0]
    0x35FFFFA2,  #       cbnz w2, loop
    0xF94000A5,  #       ldr  x5, [x5]
    0xF1000463,  #       subs x3, x3, #1
    0x54FFFF41,  #       b.ne loop
    0xD503201F,  #       nop (the end)
]
CODE, DATA, CHAIN = 0x1000, 0x10000, 0x20000


RING = 509  # nodes in the pointer ring, a prime: a load run twice moves the chase one node too far


def _run(iterations: int) -> tuple[int, int, int]:
    arch = arch_by_name("aarch64")
    uc = arch.new_uc("")
    try:
        uc.mem_map(CODE, 0x1000)
        uc.mem_map(DATA, 0x1000)
        uc.mem_map(CHAIN, 0x1000)
        uc.mem_write(CODE, b"".join(struct.pack("<I", w) for w in _LOOP))
        uc.mem_write(CHAIN, b"".join(struct.pack("<Q", CHAIN + 8 * ((i + 1) % RING)) for i in range(RING)))
        uc.reg_write(a64.UC_ARM64_REG_X0, DATA)
        uc.reg_write(a64.UC_ARM64_REG_X3, iterations)
        uc.reg_write(a64.UC_ARM64_REG_X5, CHAIN)
        stopper = fastreg.SafeStop(uc)
        done = threading.Event()
        kicks = 0

        def kicker() -> None:
            nonlocal kicks
            while not done.is_set():
                stopper.request()
                kicks += 1
                time.sleep(0.00005)

        thread = threading.Thread(target=kicker)
        thread.start()
        end = CODE + 4 * (len(_LOOP) - 1)
        pc, restarts = CODE, 0
        try:
            while pc != end and restarts < 100_000:
                uc.emu_start(pc, end)
                stopper.clear()
                restarts += 1
                pc = uc.reg_read(a64.UC_ARM64_REG_PC)
        finally:
            done.set()
            thread.join()
        counter = struct.unpack("<Q", uc.mem_read(DATA, 8))[0]
        return counter, restarts, uc.reg_read(a64.UC_ARM64_REG_X5)
    finally:
        close_uc(uc)


def test_stops_from_another_thread_land_between_blocks_only() -> None:
    counter, restarts, chase = _run(200_000)
    assert restarts > 20, "the kicks must actually stop the vCPU for this test to mean anything"
    assert counter == 200_000
    assert chase == CHAIN + 8 * (200_000 % RING)
