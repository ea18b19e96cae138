"""The load tester's guest: decoded with capstone (the loop holds the requested accesses) and run in a bare
Unicorn with the device as plain RAM (it makes exactly the accesses asked for, then powers off)."""

from __future__ import annotations

import struct

import capstone
import pytest
from unicorn import UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_MEM_WRITE, Uc
from unicorn.arm64_const import UC_ARM64_REG_X0
from unicorn.arm_const import UC_ARM_REG_R0

from mmiosplit_cli.loadtest.guest import (
    PSCI_CPU_ON_32,
    PSCI_CPU_ON_64,
    PSCI_SYSTEM_OFF,
    RAM_BASE,
    RAM_SIZE,
    GuestError,
    GuestProgram,
    IrqTarget,
    build_compute_program,
    build_program,
    iterations_for,
    mix_text,
    parse_mix,
    sync_exits_per_iteration,
)
from vcpu_service.arch import arch_by_name

DEVICE = 0x0A00_0000

MNEMONIC = {  # (arch, size) -> store, load
    ("aarch64", 1): ("strb", "ldrb"), ("aarch64", 2): ("strh", "ldrh"), ("aarch64", 4): ("str", "ldr"),
    ("aarch64", 8): ("str", "ldr"), ("arm", 1): ("strb", "ldrb"), ("arm", 2): ("strh", "ldrh"),
    ("arm", 4): ("str", "ldr"),
}


def disasm(arch: str, code: bytes, address: int) -> list[capstone.CsInsn]:
    md = (capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM) if arch == "aarch64"
          else capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_ARM))
    insns = list(md.disasm(code, address))
    assert len(insns) * 4 == len(code), "every word of the program decodes"
    return insns


def loop(arch: str, program: GuestProgram, bounds: tuple[int, int]) -> list[capstone.CsInsn]:
    start, end = bounds
    code = program.image[start - program.load_address:end - program.load_address]
    return disasm(arch, code, start)


def test_mix_parsing() -> None:
    assert mix_text(parse_mix("1r")) == "1r"
    assert mix_text(parse_mix("4w1r")) == "4w1r"
    assert mix_text(parse_mix("w2r")) == "1w2r"
    assert mix_text(parse_mix("1w1w1r")) == "2w1r"
    assert [a.is_write for a in parse_mix("2w1r1w")] == [True, True, False, True]
    for bad in ("", "3x", "r0", "0r", "4", "w-1r", "65r"):
        with pytest.raises(GuestError, match="--mix"):
            parse_mix(bad)


def test_exit_counting() -> None:
    assert sync_exits_per_iteration(parse_mix("4w1r"), posted=True) == 1
    assert sync_exits_per_iteration(parse_mix("4w1r"), posted=False) == 5
    assert iterations_for(2000, parse_mix("4w1r"), posted=False) == 400
    assert iterations_for(2000, parse_mix("4w1r"), posted=True) == 2000
    # Posted writes only: the writes are counted.
    assert iterations_for(2000, parse_mix("4w"), posted=True) == 500
    assert iterations_for(3, parse_mix("2r"), posted=False) == 2


@pytest.mark.parametrize(("arch", "size"), sorted(MNEMONIC))
@pytest.mark.parametrize("mix", ["1r", "4w1r", "1w", "2r2w1r"])
def test_the_measured_loop_has_the_requested_accesses(arch: str, size: int, mix: str) -> None:
    accesses = parse_mix(mix)
    program = build_program(arch, accesses, size, [DEVICE], warmup_iterations=10, iterations=1234)
    base = "x20" if arch == "aarch64" else "r5"
    store, load = MNEMONIC[(arch, size)]
    for bounds in (program.main_loop, program.warm_loop):
        insns = loop(arch, program, bounds)
        memory = [i for i in insns if i.mnemonic.startswith(("ld", "st"))]
        assert [i.mnemonic for i in memory] == [store if a.is_write else load for a in accesses]
        for i in memory:
            assert i.op_str.endswith(f"[{base}]"), i.op_str
            if arch == "aarch64":
                assert i.op_str.startswith("x" if size == 8 else "w")
        assert insns[-2].mnemonic == "subs"
        assert insns[-1].mnemonic in ("b.ne", "bne")
        assert int(insns[-1].op_str.lstrip("#"), 0) == bounds[0]


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_a_duration_guest_loops_forever(arch: str) -> None:
    program = build_program(arch, parse_mix("1r"), 4, [DEVICE], 0, 0)
    insns = loop(arch, program, program.main_loop)
    assert [i.mnemonic for i in insns] == ["ldr", "b"]
    assert int(insns[-1].op_str.lstrip("#"), 0) == program.main_loop[0]
    assert program.warm_loop == (0, 0)
    whole = disasm(arch, program.code, program.code_address)
    assert not any(i.mnemonic == "hvc" for i in whole), "one vCPU, no end: no PSCI call at all"


@pytest.mark.parametrize(("arch", "function"), [("aarch64", PSCI_CPU_ON_64), ("arm", PSCI_CPU_ON_32)])
def test_vcpu_0_starts_the_others_with_cpu_on(arch: str, function: int) -> None:
    program = build_program(arch, parse_mix("1r"), 4, [DEVICE, DEVICE + 0x40, DEVICE + 0x80], 1, 1)
    text = " ; ".join(f"{i.mnemonic} {i.op_str}" for i in disasm(arch, program.code, program.code_address))
    assert text.count("hvc #0") == 4  # two CPU_ON, a CPU_OFF for secondaries, SYSTEM_OFF for vCPU 0
    assert f"#{function >> 16:#x}, lsl #16" in text or f"#{function >> 16:#x}" in text
    width = 8 if arch == "aarch64" else 4
    table = program.image[0x800:0x800 + 3 * width]
    assert struct.unpack(f"<3{'Q' if width == 8 else 'I'}", table) == (DEVICE, DEVICE + 0x40, DEVICE + 0x80)


@pytest.mark.parametrize(("arch", "handler_at", "eret"), [("aarch64", 0x280, "eret"), ("arm", 0x18, "subs")])
def test_the_irq_guest_sleeps_masked_and_its_handler_acknowledges_and_ends_the_interrupt(
        arch: str, handler_at: int, eret: str) -> None:
    irq = IrqTarget(0x0800_0000, 0x0801_0000, 12, fire=0x0, ack=0x4, delay=0x8, delay_us=250)
    program = build_program(arch, parse_mix("1r"), 4, [DEVICE], 3, 5, irq)
    body = [i.mnemonic for i in loop(arch, program, program.main_loop)]
    if arch == "aarch64":
        assert body[:8] == ["add", "str", "wfi", "msr", "isb", "msr", "cmp", "b.ne"]
    else:
        assert body[:8] == ["add", "str", "wfi", "cpsie", "isb", "cpsid", "cmp", "bne"]
    whole = disasm(arch, program.code, program.code_address)
    by_address = {i.address: i for i in whole}
    vbar = next(i for i in whole if "vbar" in i.op_str or "c12, c0, #0" in i.op_str)
    assert vbar is not None
    vectors = next(a for a in sorted(by_address) if by_address[a].mnemonic == "udf"
                   and a % (0x800 if arch == "aarch64" else 0x20) == 0 and a > program.main_loop[1])
    branch = by_address[vectors + handler_at]
    assert branch.mnemonic == "b"
    target = int(branch.op_str.lstrip("#"), 0)
    handler = [by_address[target + 4 * k] for k in range(5)]
    assert [i.mnemonic for i in handler] == ["ldr", "str", "str", "add", eret]
    assert "#0xc" in handler[0].op_str and "#4" in handler[1].op_str and "#0x10" in handler[2].op_str
    text = " ; ".join(f"{i.mnemonic} {i.op_str}" for i in whole)
    assert "#0xfa" in text  # DELAY = 250 us, written before the loop
    with pytest.raises(GuestError, match="--vcpus 1"):
        build_program(arch, parse_mix("1r"), 4, [DEVICE, DEVICE], 0, 1, irq)


def test_bad_guests_are_refused_by_name() -> None:
    with pytest.raises(GuestError, match="--size 8 needs --arch aarch64"):
        build_program("arm", parse_mix("1r"), 8, [DEVICE], 0, 1)
    with pytest.raises(GuestError, match="--size"):
        build_program("aarch64", parse_mix("1r"), 3, [DEVICE], 0, 1)
    with pytest.raises(GuestError, match="--vcpus"):
        build_program("aarch64", parse_mix("1r"), 4, [DEVICE] * 65, 0, 1)
    with pytest.raises(GuestError, match="--arch"):
        build_program("riscv", parse_mix("1r"), 4, [DEVICE], 0, 1)


def run_bare(arch: str, program: GuestProgram, device_size: int = 0x1000) -> tuple[list[tuple[bool, int, int]], int]:
    """Run one vCPU's program in a bare Unicorn with the device as RAM; (accesses to it, PSCI function)."""
    a = arch_by_name(arch)
    uc: Uc = a.new_uc("")
    uc.mem_map(RAM_BASE, RAM_SIZE)
    uc.mem_map(DEVICE, device_size)
    uc.mem_write(program.load_address, program.image)
    uc.mem_write(program.go_address, b"\x01\0\0\0")  # released at once
    a.set_entry(uc, program.entry, 0)
    seen: list[tuple[bool, int, int]] = []
    psci: list[int] = []

    def on_mem(uc: Uc, access: int, address: int, size: int, value: int, _: object) -> None:
        seen.append((access == UC_MEM_WRITE, address, size))

    def on_intr(uc: Uc, intno: int, _: object) -> None:
        psci.append(int(uc.reg_read(UC_ARM64_REG_X0 if arch == "aarch64" else UC_ARM_REG_R0)))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, on_mem, begin=DEVICE, end=DEVICE + device_size - 1)
    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.emu_start(program.entry, 0xFFFF_FFFF if arch == "arm" else 0xFFFF_FFFF_FFFF_FFFF, count=1_000_000)
    return seen, psci[0] if psci else -1


@pytest.mark.parametrize(("arch", "size"), [("aarch64", 8), ("aarch64", 1), ("arm", 2), ("arm", 4)])
def test_the_guest_makes_exactly_the_accesses_then_powers_off(arch: str, size: int) -> None:
    mix = parse_mix("4w1r")
    program = build_program(arch, mix, size, [DEVICE + 0x10], warmup_iterations=7, iterations=31)
    seen, psci = run_bare(arch, program)
    assert psci == PSCI_SYSTEM_OFF
    assert len(seen) == (7 + 31) * 5
    assert all(address == DEVICE + 0x10 and width == size for _, address, width in seen)
    assert [w for w, _, _ in seen[:5]] == [True, True, True, True, False]
    assert program.ready_addresses == (program.load_address + 0x100,)


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_the_compute_guest_never_touches_a_device(arch: str) -> None:
    program = build_compute_program(arch, 1000)
    insns = disasm(arch, program.code, program.code_address)
    body = [i for i in insns if program.main_loop[0] <= i.address < program.main_loop[1]]
    assert len(body) == 6
    assert insns[[i.address for i in insns].index(program.stop_address)].mnemonic == "hvc"
    seen, psci = run_bare(arch, program)
    assert seen == [] and psci == PSCI_SYSTEM_OFF
