"""Every generated instance checked three ways before it runs: generator intent, `decode()`, and capstone.

The generator knows what it built (size, sign, direction, Rt, Rn, X target, acquire/release, writeback); `decode()`
must say the same, and so must capstone 5's operand details. Where capstone 5 and the ARM ARM disagree the ARM ARM
wins, and the case is counted as a known divergence instead of a failure. There is one (it is also in
`CAPSTONE_DIVERGENCES` of `tests/unit/test_decode.py`): A64 LDTR/STTR with Rt == Rn. LDTR has no writeback, but
capstone (LLVM) applies the writeback-overlap check to it and refuses to disassemble it.

Capstone prints A32 LDR Rt, [SP], #4 (and STR Rt, [SP, #-4]!) as the POP/PUSH alias, with no memory operand; the
alias is read back as the load/store it stands for. (Capstone 5 also prints LDR Rt, [SP], #-4 as POP, dropping the
sign; the fields checked here, not the offset, still agree.) Capstone also under-reports writeback for A32
LDRT/STRT-style and post-indexed register forms: a post-index operand (an offset after the memory operand) counts as
writeback, because P=0 always writes back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import capstone
from capstone import arm, arm64

from tests.differential.encoders import t32_halfwords
from tests.differential.generate import Instance
from vcpu_service.decode import Isa, Syndrome, decode

_CS = {
    Isa.A64: capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM),
    Isa.A32: capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_ARM | capstone.CS_MODE_V8),
    Isa.T32: capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_V8),
}
for _md in _CS.values():
    _md.detail = True

_A64_SINGLE = re.compile(r"^(ld|st)(r|ur|tr|ar|lr|apr|apur|lur|lar|llr)(sb|sh|sw|b|h)?$")
_A32_SINGLE = re.compile(r"^(ld|st)(r|a|l)(sb|sh|b|h)?(t)?(eq|ne|hs|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)?$")
_A32_POP_PUSH = re.compile(r"^(pop|push)(eq|ne|hs|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)?$")
_A32_REGS = {f"r{n}": n for n in range(13)} | {"sb": 9, "sl": 10, "fp": 11, "ip": 12, "sp": 13, "lr": 14, "pc": 15}
_A64_REGS = (
    {f"x{n}": n for n in range(31)}
    | {f"w{n}": n for n in range(31)}
    | {"xzr": 31, "wzr": 31, "sp": 31, "wsp": 31, "fp": 29, "lr": 30}
)


@dataclass(frozen=True, slots=True)
class CsFacts:
    """What capstone says about a single-register load/store."""

    text: str
    load: bool
    size: int
    signed: bool
    rt: int
    rn: int
    x_reg: bool
    acquire_release: bool
    writeback: bool
    post_index: bool


def _code(isa: Isa, encoding: int) -> bytes:
    if isa is Isa.T32:
        return b"".join(hw.to_bytes(2, "little") for hw in t32_halfwords(encoding))
    return encoding.to_bytes(4, "little")


def disassemble(isa: Isa, encoding: int) -> str:
    """Capstone's text for an encoding, or a placeholder when it has none."""
    code = _code(isa, encoding)
    insn = next(_CS[isa].disasm(code, 0), None)
    if insn is None or insn.size != len(code):
        return "(capstone: invalid)"
    return f"{insn.mnemonic} {insn.op_str}".strip()


def capstone_facts(isa: Isa, encoding: int) -> CsFacts | None:
    """Capstone's reading of a single general-register load/store, or None when it sees something else."""
    code = _code(isa, encoding)
    i = next(_CS[isa].disasm(code, 0), None)
    if i is None or i.size != len(code):
        return None
    match = (_A64_SINGLE if isa is Isa.A64 else _A32_SINGLE).match(i.mnemonic.split(".")[0])
    reg_type, mem_type = (
        (arm64.ARM64_OP_REG, arm64.ARM64_OP_MEM) if isa is Isa.A64 else (arm.ARM_OP_REG, arm.ARM_OP_MEM)
    )
    ops = list(i.operands)
    alias = _A32_POP_PUSH.match(i.mnemonic)
    if isa is not Isa.A64 and alias and len(ops) == 1 and ops[0].type == reg_type:
        # The single-register POP/PUSH alias of LDR Rt, [SP], #4 / STR Rt, [SP, #-4]!
        pop = alias.group(1) == "pop"
        return CsFacts(f"{i.mnemonic} {i.op_str}", pop, 4, False, _A32_REGS[i.reg_name(ops[0].reg)], 13, False,
                       False, True, pop)
    mems = [k for k, op in enumerate(ops) if op.type == mem_type]
    if match is None or len(mems) != 1 or ops[0].type != reg_type:
        return None
    k = mems[0]
    regs = _A64_REGS if isa is Isa.A64 else _A32_REGS
    rt_name, rn_name = i.reg_name(ops[0].reg), i.reg_name(ops[k].mem.base)
    if rt_name not in regs or rn_name not in regs:
        return None
    x_reg = isa is Isa.A64 and (rt_name.startswith("x") or rt_name in ("fp", "lr"))
    suffix = match.group(3) or ""
    size = {"b": 1, "h": 2, "w": 4}[suffix[-1]] if suffix else (8 if x_reg else 4)
    post_index = len(ops) > k + 1
    return CsFacts(
        text=f"{i.mnemonic} {i.op_str}",
        load=match.group(1) == "ld",
        size=size,
        signed=suffix.startswith("s"),
        rt=regs[rt_name],
        rn=regs[rn_name],
        x_reg=x_reg,
        acquire_release=match.group(2) not in ("r", "ur", "tr"),
        writeback=bool(i.writeback) or post_index,
        post_index=post_index,
    )


def _known_divergence(instance: Instance) -> str | None:
    """Why capstone 5 cannot be asked about this instance, when it is a listed divergence."""
    if instance.isa is Isa.A64 and instance.klass == "unprivileged" and instance.rt == instance.rn:
        return "A64 LDTR/STTR with Rt == Rn"
    return None


@dataclass(frozen=True, slots=True)
class CheckResult:
    syndrome: Syndrome | None
    problems: tuple[str, ...]
    divergence: str | None  # a known capstone divergence that was skipped
    text: str  # capstone's disassembly


def check_instance(instance: Instance) -> CheckResult:
    """decode() against the generator's intent and against capstone; problems are empty when all agree."""
    isa, enc = instance.isa, instance.encoding
    text = disassemble(isa, enc)
    got = decode(isa, enc)
    if not isinstance(got, Syndrome):
        return CheckResult(None, (f"decode() refused a generated instance: {got.reason}",), None, text)
    problems: list[str] = []

    def expect(what: str, decoded: object, intended: object) -> None:
        if decoded != intended:
            problems.append(f"{what}: decode() says {decoded}, the generator built {intended}")

    expect("size", got.size, instance.size)
    expect("sign extension", got.sse, instance.signed)
    expect("store (WnR)", got.wnr, instance.is_store)
    expect("Rt", got.srt, instance.rt)
    expect("Rn", got.rn, instance.rn)
    expect("acquire/release", got.ar, instance.acquire_release)
    expect("ISV", got.isv, not instance.writeback)
    expect("writeback", "" if got.writeback is None else ("post" if got.writeback.post_index else "pre"),
           instance.writeback)
    expect("instruction length", got.insn_len, 2 if isa is Isa.T32 and enc <= 0xFFFF else 4)
    if isa is Isa.A64:
        expect("SF (X target)", got.sf, instance.x_reg)
    if got.writeback is not None and got.writeback.offset_reg is not None:
        expect("writeback offset register", got.writeback.offset_reg, instance.rm)

    divergence = _known_divergence(instance)
    if divergence is None:
        facts = capstone_facts(isa, enc)
        if facts is None:
            problems.append(f"capstone does not see a single-register load/store: {text}")
        else:
            for what, cs, ours in (
                ("direction (load)", facts.load, not got.wnr),
                ("size", facts.size, got.size),
                ("signedness", facts.signed, got.sse),
                ("Rt", facts.rt, got.srt),
                ("Rn", facts.rn, got.rn),
                ("acquire/release", facts.acquire_release, got.ar),
                ("writeback", facts.writeback, got.writeback is not None),
            ):
                if cs != ours:
                    problems.append(f"{what}: capstone says {cs} ({facts.text}), decode() says {ours}")
            if isa is Isa.A64 and facts.x_reg != got.sf:
                problems.append(f"X target: capstone says {facts.x_reg} ({facts.text}), decode() says {got.sf}")
            if got.writeback is not None and facts.post_index != got.writeback.post_index:
                problems.append(f"post-index: capstone says {facts.post_index} ({facts.text}), decode() says "
                                f"{got.writeback.post_index}")
    return CheckResult(got, tuple(problems), divergence, text)
