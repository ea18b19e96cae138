"""The exit trace and KVM report as people and tools read them, from hand-made messages."""

from __future__ import annotations

import io
import json

from mmiosplit.v1 import vcpu_pb2
from mmiosplit_cli.trace import (
    TracePrinter,
    disassemble,
    exit_to_dict,
    format_exit,
    format_exit_json,
    format_kvm_report,
    insn_bytes,
    insn_hex,
    kvm_report_rows,
    kvm_report_to_json,
    register_name,
)

# ESR_EL2 of a data abort from a lower EL, IL=1, translation fault level 3, and the ISS fields.
_ESR = (0x24 << 26) | (1 << 25) | 0x07
ISV = 1 << 24


def esr(sas: int, srt: int, *, sse: bool = False, sf: bool = False, wnr: bool = False, isv: bool = True) -> int:
    return (_ESR | (isv << 24) | (sas << 22) | (sse << 21) | (srt << 16) | (sf << 15) | (wnr << 6))


def exit_(**kw: object) -> vcpu_pb2.ExitTrace:
    base: dict[str, object] = dict(seq=1, vcpu_id=0, pc=0x4008_0010, isa="A64", instruction_length=4,
                                   address=0x0A00_0000, device="scratch0", outcome="ok", latency_us=12.5)
    base.update(kw)
    return vcpu_pb2.ExitTrace(**base)  # type: ignore[arg-type]


def test_a64_load_line_has_every_part_of_the_syndrome() -> None:
    e = exit_(seq=12, instruction=0xB9400001, size=4, rt=1, value=0x80, latency_us=412.3, syndrome=esr(2, 1))
    assert format_exit(e) == ("#12 vcpu0 pc=0x40080010 A64 b9400001 ldr w1, [x0]             "
                              "R 4 @0x0a000000 scratch0 -> 0x00000080 rt=w1 zero-ext  (412.3 us)")


def test_sign_extending_load_into_an_x_register() -> None:
    # ldrsh x3, [x0, #2]: the register value is 64 bits wide, and so is the value shown.
    e = exit_(instruction=0x79800403, size=2, rt=3, sign_extend=True, sixty_four=True, address=0x0A00_0002,
              value=0xFFFF_FFFF_FFFF_8001, syndrome=esr(1, 3, sse=True, sf=True))
    line = format_exit(e)
    assert "ldrsh x3, [x0, #2]" in line
    assert "R 2 @0x0a000002 scratch0 -> 0xffffffffffff8001 rt=x3 sign-ext" in line
    assert "wb=" not in line and "ISV=0" not in line


def test_store_shows_the_bytes_written_and_no_sign() -> None:
    e = exit_(instruction=0xB900001F, size=4, is_write=True, rt=31, value=0, syndrome=esr(2, 31, wnr=True))
    line = format_exit(e)
    assert "str wzr, [x0]" in line and "W 4 @0x0a000000 scratch0 <- 0x00000000 rt=wzr" in line
    assert "ext" not in line


def test_writeback_forms_say_pre_or_post_and_isv_0() -> None:
    pre = exit_(instruction=0xF8408C01, size=8, rt=1, sixty_four=True, writeback="pre", address=0x0A00_0008,
                value=7, syndrome=esr(3, 1, sf=True, isv=False))
    assert "ldr x1, [x0, #8]!" in format_exit(pre)
    assert format_exit(pre).endswith("-> 0x0000000000000007 rt=x1 zero-ext wb=pre ISV=0  (12.5 us)")
    post = exit_(instruction=0xB8404401, size=4, rt=1, writeback="post", syndrome=esr(2, 1, isv=False))
    assert "ldr w1, [x0], #4" in format_exit(post) and "wb=post ISV=0" in format_exit(post)


def test_thumb_16_and_32_bit_instructions() -> None:
    narrow = exit_(isa="T32", instruction=0x6802, instruction_length=2, size=4, rt=2, value=0x80)
    assert "T32 6802      ldr r2, [r0]" in format_exit(narrow)
    assert "rt=r2 zero-ext" in format_exit(narrow)
    # ldr.w r5, [r0], #4 is f850 5b04: hw1 in the upper half of the word, hw1 first in memory.
    wide = exit_(isa="T32", instruction=0xF8505B04, size=4, rt=5, writeback="post", value=0x80)
    assert insn_bytes("T32", 0xF8505B04) == bytes.fromhex("50f8045b")
    assert "T32 f850 5b04 ldr r5, [r0], #4" in format_exit(wide)
    sb = exit_(isa="T32", instruction=0x56C4, instruction_length=2, size=1, rt=4, sign_extend=True,
               value=0xFFFF_FF80)
    assert "ldrsb r4, [r0, r3]" in format_exit(sb) and "-> 0xffffff80 rt=r4 sign-ext" in format_exit(sb)


def test_a32_instructions_and_register_names() -> None:
    e = exit_(isa="A32", instruction=0xE1D010F0, size=2, rt=1, sign_extend=True, value=0xFFFF_8000)
    assert "A32 e1d010f0 ldrsh r1, [r0]" in format_exit(e)
    assert disassemble("A32", 0xE5E02001) == "strb r2, [r0, #1]!"
    assert [register_name("A32", n, False) for n in (0, 12, 13, 14, 15)] == ["r0", "r12", "sp", "lr", "pc"]
    assert register_name("A64", 31, True) == "xzr" and register_name("A64", 30, False) == "w30"


def test_lengths_and_unknown_encodings() -> None:
    assert insn_hex("T32", 0x6802) == "6802" and insn_hex("A64", 0x1F) == "0000001f"
    assert insn_bytes("A64", 0xB9400001) == bytes.fromhex("010040b9")
    assert disassemble("A64", 0xFFFF_FFFF) == "(unknown ffffffff)"
    # PC-relative operands are resolved against the PC of the exit.
    assert disassemble("A64", 0x58000041, 4, 0x4008_0000) == "ldr x1, #0x40080008"


def test_posted_and_unmapped_outcomes_are_shown() -> None:
    posted = exit_(instruction=0xB9000001, size=4, is_write=True, rt=1, value=3, device="posted0",
                   outcome="posted")
    assert "posted0 <- 0x00000003 rt=w1 [posted]" in format_exit(posted)
    raz = exit_(instruction=0xB9400001, size=4, rt=1, device="", outcome="unmapped (RAZ/WI)", address=0x2000_0000)
    assert "@0x20000000 (unmapped) -> 0x00000000 rt=w1 zero-ext [unmapped (RAZ/WI)]" in format_exit(raz)


def test_json_lines_carry_every_field_and_the_disassembly() -> None:
    e = exit_(seq=4, instruction=0xB8404401, size=4, rt=1, writeback="post", value=0x80,
              syndrome=esr(2, 1, isv=False))
    d = json.loads(format_exit_json(e))
    assert set(vcpu_pb2.ExitTrace.DESCRIPTOR.fields_by_name) <= set(d)
    assert d == exit_to_dict(e)
    assert d["seq"] == 4 and d["pc"] == 0x4008_0010 and d["instruction"] == 0xB8404401
    assert d["disasm"] == "ldr w1, [x0], #4" and d["instruction_hex"] == "b8404401" and d["register"] == "w1"
    assert d["writeback"] == "post" and d["is_write"] is False and d["latency_us"] == 12.5
    assert "\n" not in format_exit_json(e)


def test_printer_writes_both_streams() -> None:
    human, lines = io.StringIO(), io.StringIO()
    printer = TracePrinter(human, lines, newline="\r\n")
    for seq in (1, 2):
        printer(exit_(seq=seq, instruction=0xB9400001, size=4, rt=1))
    assert printer.count == 2
    assert human.getvalue().count("\r\n") == 2 and human.getvalue().startswith("#1 vcpu0")
    assert [json.loads(x)["seq"] for x in lines.getvalue().splitlines()] == [1, 2]


def _entry(pc: int, word: int, count: int, handled: bool, isa: str = "A64",
           reason: str = "load/store with base writeback (ISV=0)") -> vcpu_pb2.KvmReportEntry:
    return vcpu_pb2.KvmReportEntry(pc=pc, isa=isa, instruction=word, reason=reason, handled=handled, count=count)


def test_kvm_report_merges_vcpus_and_sorts_by_count() -> None:
    entries = [
        _entry(0x4008_0004, 0xB8404401, 2, True),
        _entry(0x4008_0008, 0xA9400801, 1, False, reason="load/store pair has no instruction syndrome"),
        _entry(0x4008_0004, 0xB8404401, 3, True),  # the same PC on a second vCPU
        _entry(0x4008_0100, 0xF8505B04, 4, True, isa="T32"),
    ]
    rows = kvm_report_rows(entries)
    assert [(r.pc, r.count) for r in rows] == [(0x4008_0004, 5), (0x4008_0100, 4), (0x4008_0008, 1)]
    text = format_kvm_report(entries)
    lines = text.splitlines()
    assert lines[0].startswith("KVM report: 3 PCs (10 accesses)")
    assert lines[1].split() == ["PC", "ISA", "instruction", "disassembly", "count", "reason", "mmiosplit"]
    assert lines[2].startswith("0x40080004  A64  b8404401     ldr w1, [x0], #4")
    assert lines[2].endswith("decoded by mmiosplit") and " 5  load/store with base writeback" in lines[2]
    assert "f850 5b04" in lines[3] and "ldr r5, [r0], #4" in lines[3]
    assert lines[4].endswith("refused") and "ldp x1, x2, [x0]" in lines[4]
    # Aligned columns: the reason starts at the same offset on every row.
    assert len({line.index("load/store") for line in lines[2:]}) == 1
    assert kvm_report_to_json(entries)[0] == {
        "pc": 0x4008_0004, "isa": "A64", "instruction": 0xB8404401, "instruction_hex": "b8404401",
        "disasm": "ldr w1, [x0], #4", "count": 5, "reason": "load/store with base writeback (ISV=0)",
        "handled": True, "status": "decoded by mmiosplit",
    }


def test_empty_kvm_report_says_so() -> None:
    assert "upstream KVM/ARM would handle them all" in format_kvm_report([])
    assert kvm_report_to_json([]) == []
