"""The differential test in CI: 10,200 random instances across A64, A32 and T32, in-process; 300 over real gRPC.

Plain Unicorn with RAM at the window is the reference; mmiosplit with a scratch device holding the same bytes must
leave identical registers, flags, PC and bytes. `python -m tests.differential.campaign` runs any number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import vcpu_service.arch
import vcpu_service.exits
import vcpu_service.vcpu
from tests.differential.campaign import (
    DEFAULT_GRPC_BATCH,
    CampaignResult,
    compare,
    grpc_services,
    run_campaign,
    summary,
)
from tests.differential.crosscheck import capstone_facts, check_instance
from tests.differential.encoders import T32, it_mask
from tests.differential.generate import (
    GPR_COUNT,
    SLOT,
    Batch,
    Instance,
    generate_batch,
    solve_self_offset,
)
from tests.differential.program import build_program
from tests.differential.runners import run_local, run_reference
from vcpu_service.completion import load_value
from vcpu_service.decode import Isa, Syndrome

CI_SEED = 1
CI_INSTANCES = 10_200  # 3,400 per ISA, 34 batches each: every register is the harness's pointer at least once
GRPC_INSTANCES = 300

EXPECTED_CLASSES = {
    Isa.A64: {
        "unsigned imm12", "unscaled imm9", "unprivileged", "register offset", "imm9 pre-index", "imm9 post-index",
        "acquire/release", "LORegion", "RCpc LDAPR", "RCpc unscaled",
    },
    Isa.A32: {
        f"{family} {offset} {mode}"
        for family, offsets in (("word/byte", ("imm12", "register")), ("halfword/signed", ("imm8", "register")))
        for offset in offsets
        for mode in ("offset", "pre-index", "post-index", "unprivileged")
    } | {"acquire/release"},
    Isa.T32: {
        "T16 register offset", "T16 imm5", "T16 SP-relative", "T32 imm12", "T32 negative imm8", "T32 unprivileged",
        "T32 imm8 pre-index", "T32 imm8 post-index", "T32 register offset", "T32 acquire/release",
    },
}


@pytest.fixture(scope="module")
def ci_campaign() -> CampaignResult:
    result = run_campaign(CI_INSTANCES, CI_SEED)
    print("\n" + summary(result))
    return result


def test_no_mismatch_and_no_cross_check_failure(ci_campaign: CampaignResult) -> None:
    assert ci_campaign.ok, summary(ci_campaign)


def test_size_of_the_ci_run(ci_campaign: CampaignResult) -> None:
    assert ci_campaign.instances >= 10_000
    for isa in Isa:
        assert ci_campaign.tallies[isa].instances == CI_INSTANCES // 3


def test_every_access_was_one_exit(ci_campaign: CampaignResult) -> None:
    """Each device access went through the exit path once (a failed condition makes none), and every writeback
    form that ran was hand-decoded: nothing reached the window without mmiosplit."""
    for isa, tally in ci_campaign.tallies.items():
        assert tally.exits + tally.posted_writes == tally.accesses, isa
        assert tally.posted_writes > 0, isa
        assert tally.hand_decoded > 0.1 * tally.instances, isa
        assert tally.accesses > 0.8 * tally.instances, isa


def test_every_class_is_covered(ci_campaign: CampaignResult) -> None:
    for isa, tally in ci_campaign.tallies.items():
        assert set(tally.classes) == EXPECTED_CLASSES[isa], isa
        assert min(tally.classes.values()) >= 20, (isa, tally.classes)


def test_every_register_number_is_covered(ci_campaign: CampaignResult) -> None:
    cov = ci_campaign.coverage
    for isa in Isa:
        gprs = set(range(32 if isa is Isa.A64 else 15))  # A64 31 is XZR as Rt/Rm and SP as Rn
        assert cov.rt[isa] == gprs, isa
        assert cov.rn[isa] == gprs, isa
        assert cov.rm[isa] == (gprs - {13} if isa is Isa.T32 else gprs), isa  # T32: SP as Rm is UNPREDICTABLE
        assert cov.reserved[isa] == set(range(GPR_COUNT[isa])), isa


def test_every_configuration_and_detail_is_covered(ci_campaign: CampaignResult) -> None:
    cov = ci_campaign.coverage
    for isa in Isa:
        assert len(cov.configurations[isa]) == 16, cov.configurations[isa]  # CPU, endianness, EL, posted writes
        tags = cov.details[isa]
        wanted = {"size 1", "size 2", "size 4", "store", "load", "signed load", "writeback pre", "writeback post"}
        wanted |= {
            Isa.A64: {"size 8", "uxtw", "sxtw", "sxtx", "lsl", "rm=rn"},
            Isa.A32: {"lsl", "lsr", "asr", "ror", "rrx", "rm=rn", "condition", "condition failed"},
            Isa.T32: {"lsl", "rm=rn", "IT block", "second access in the IT block", "condition failed"},
        }[isa]
        assert wanted <= set(tags), (isa, wanted - set(tags))


@pytest.mark.integration
def test_grpc_transport_changes_nothing() -> None:
    """The same kind of campaign through both services as subprocesses: the guest seeds and reads back the device."""
    with grpc_services() as target:
        result = run_campaign(GRPC_INSTANCES, CI_SEED, grpc=target, batch_size=DEFAULT_GRPC_BATCH)
    print("\n" + summary(result))
    assert result.ok, summary(result)
    assert result.instances == GRPC_INSTANCES
    for isa, tally in result.tallies.items():
        assert tally.exits + tally.posted_writes > tally.accesses, isa  # plus the seeding and readback copies
        assert len(result.coverage.configurations[isa]) == 16, isa


# --------------------------------------------------------------------------------------------- the harness


def test_batches_are_reproducible_from_their_seed() -> None:
    for isa in Isa:
        assert generate_batch(isa, 5, 3, 50) == generate_batch(isa, 5, 3, 50)
        assert generate_batch(isa, 5, 3, 50) != generate_batch(isa, 5, 4, 50)


def test_every_access_lands_aligned_in_its_own_slot() -> None:
    for isa in Isa:
        for number in range(8):
            batch = generate_batch(isa, 9, number, 100)
            for i in batch.instances:
                slot = batch.window_base + SLOT * i.index
                assert slot <= i.address and i.address + i.size <= slot + SLOT, i
                assert i.address % i.size == 0, i
                assert i.rt != batch.reserved and i.rn != batch.reserved and i.rm != batch.reserved, i
                check = check_instance(i)
                assert not check.problems, (i, check)


@pytest.mark.parametrize(
    ("encoding", "text"),
    [
        (0xE49DB004, "pop {fp}"),  # ldr fp, [sp], #4
        (0x941DB004, "popls {fp}"),  # ldrls fp, [sp], #-4: capstone 5 drops the sign
    ],
)
def test_capstone_pop_alias_reads_back_as_a_post_indexed_load(encoding: int, text: str) -> None:
    facts = capstone_facts(Isa.A32, encoding)
    assert facts is not None and facts.text == text
    assert (facts.load, facts.size, facts.rt, facts.rn, facts.writeback, facts.post_index) == (True, 4, 11, 13,
                                                                                               True, True)


@pytest.mark.parametrize("bits", [32, 64])
def test_solve_self_offset(bits: int) -> None:
    rng = random.Random(bits)
    for _ in range(200):
        target, shift, subtract = rng.getrandbits(bits) & ~1, rng.randrange(4), bool(rng.getrandbits(1))
        v = solve_self_offset(target, shift, subtract, bits, rng)
        if subtract and shift == 0:
            assert v is None
            continue
        assert v is not None
        assert (v - (v << shift) if subtract else v + (v << shift)) % (1 << bits) == target


# ---------------------------------------------------------------------------------------- seeded bugs


def _kvm_zero_extension(data: bytes, syn: Syndrome, big_endian: bool) -> int:
    """Upstream arm64 KVM's completion: masks to the access width after sign extension (kvm-mmio.md 0.5)."""
    return load_value(data, syn, big_endian) & ((1 << (8 * syn.size)) - 1)


SEEDED_BUGS: list[tuple[str, Any, str, Callable[..., Any], Isa]] = [
    ("KVM zero-extended signed loads", vcpu_service.exits, "load_value", _kvm_zero_extension, Isa.A64),
    ("base writeback dropped", vcpu_service.exits.ExitPath, "_writeback_value", lambda self, syn: None, Isa.A32),
    ("A64 big-endian data ignored", vcpu_service.arch.AArch64, "big_endian_data", lambda self, uc: False, Isa.A64),
    ("SCTLR_EL1.EE used at EL0 too", vcpu_service.arch.AArch64, "big_endian_data",
     lambda self, uc: bool(uc.cpr_read(3, 0, 1, 0, 0) & 1 << 25), Isa.A64),
    ("SCTLR_EL1.E0E used at EL1 too", vcpu_service.arch.AArch64, "big_endian_data",
     lambda self, uc: bool(uc.cpr_read(3, 0, 1, 0, 0) & 1 << 24), Isa.A64),
    ("CPSR.E ignored", vcpu_service.arch.AArch32, "big_endian_data", lambda self, uc: False, Isa.A32),
    ("ITSTATE not advanced", vcpu_service.arch, "it_advance", lambda cpsr: cpsr, Isa.T32),
    ("IT-block store faults taken at Unicorn's late PC", vcpu_service.arch.AArch32, "store_fault_is_deferred",
     lambda self, uc: False, Isa.T32),
    ("posted writes left queued at the end of a run", vcpu_service.vcpu.Vcpu, "flush_posted", lambda self: None,
     Isa.A32),
]


@pytest.mark.parametrize(("name", "owner", "attribute", "replacement", "isa"), SEEDED_BUGS,
                         ids=[b[0] for b in SEEDED_BUGS])
def test_the_differential_catches_a_seeded_bug(monkeypatch: pytest.MonkeyPatch, name: str, owner: object,
                                               attribute: str, replacement: Callable[..., Any], isa: Isa) -> None:
    monkeypatch.setattr(owner, attribute, replacement)
    result = run_campaign(400, CI_SEED, [isa], batch_size=25)  # 16 batches: every configuration
    assert result.mismatches, f"{name}: not detected"


def test_posted_writes_reach_the_device_when_the_run_ends_on_a_fault() -> None:
    """An unprivileged batch ends on the UNDEFINED HVC (a guest exception): its last posted stores must still land."""
    for isa in Isa:
        batch = generate_batch(isa, CI_SEED, 12, 40)  # configuration 12: unprivileged, posted writes
        assert batch.unprivileged and batch.posted
        program = build_program(batch)
        reference, split = run_reference(program), run_local(program)
        assert split.posted_writes > 0
        assert compare(program, reference, split) == [], isa


# ------------------------------------------------------------------- Thumb stores inside IT blocks


def _t32_instance(index: int, code: tuple[int, ...], encoding: int, regs: dict[int, int], flags: int, address: int,
                  size: int, rt: int, rn: int, writeback: str = "") -> Instance:
    values = [0x1111_1111 * (n + 1) & 0xFFFF_FFFF for n in range(15)]
    for n, v in regs.items():
        values[n] = v
    return Instance(
        index=index, isa=Isa.T32, klass="IT regression", op="STR", detail="", encoding=encoding, code=code,
        regs=tuple(values), sp=0, flags=flags, address=address, size=size, is_store=True, executes=True,
        extra_accesses=0, rt=rt, rn=rn, rm=None, signed=False, x_reg=False, acquire_release=False,
        writeback=writeback, slot=bytes(range(16 * index, 16 * index + 16)),
    )


def _it_store_batch() -> Batch:
    """Stores to the device inside IT blocks, followed by instructions that Unicorn 2.1.4 runs past the fault."""
    base, lt, eq, ne = 0x0800_0000, 0xB, 0x0, 0x1
    strh_post = (0xF820, 0xBB01)  # strh.w r11, [r0], #1
    str16 = (0x6051,)  # str r1, [r2, #4]
    strb16 = (0x7023,)  # strb r3, [r4]
    add6 = T32.add_imm3(6, 6, 1)
    instances = (
        # itt lt: strh.w (post-index) then an ADD that runs; N set, so LT holds
        _t32_instance(0, (*T32.it(lt, it_mask(lt, [True])), *strh_post, *add6), 0xF820BB01, {0: base, 11: 0xBEEF},
                      0x8000_0000, base, 2, 11, 0, "post"),
        # ite eq: str (16-bit) then an ADD that is skipped; Z set
        _t32_instance(1, (*T32.it(eq, it_mask(eq, [False])), *str16, *add6), 0x6051, {2: base + 16 - 4},
                      0x4000_0000, base + 16, 4, 1, 2),
        # it ne: a lone strb, the last instruction of its block; Z clear
        _t32_instance(2, (*T32.it(ne, it_mask(ne, [])), *strb16), 0x7023, {4: base + 33}, 0, base + 33, 1, 3, 4),
    )
    return Batch(isa=Isa.T32, seed="it-regression", number=0, cpu_model="cortex-a15", big_endian=False,
                 unprivileged=False, posted=False, reserved=9, window_base=base, window_size=0x1000,
                 instances=instances, window=b"".join(i.slot for i in instances) + bytes(0x1000 - 3 * SLOT))


@pytest.fixture
def it_store_batch() -> Iterator[Batch]:
    batch = _it_store_batch()
    for instance in batch.instances:
        assert not check_instance(instance).problems
    yield batch


def test_a_store_inside_an_it_block_completes_exactly_once(it_store_batch: Batch) -> None:
    program = build_program(it_store_batch)
    reference, split = run_reference(program), run_local(program)
    assert reference.ok and split.ok, (reference.status, split.status)
    assert compare(program, reference, split) == []
    assert split.exits == 3
    assert split.window[:2] == b"\xef\xbe"  # strh r11 went to the device


def test_without_the_workaround_unicorn_runs_past_the_store(it_store_batch: Batch,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vcpu_service.arch.AArch32, "store_fault_is_deferred", lambda self, uc: False)
    program = build_program(it_store_batch)
    assert compare(program, run_reference(program), run_local(program))
