"""Formatting of the exit trace and the KVM compatibility report for people and for tools.

The vcpu service records each exit as a decoded syndrome plus the raw instruction word; this module
turns those into one readable line per exit (with capstone's disassembly, so the reader need not
decode the word by hand), into JSON lines that keep every field, and into the end-of-run table of
the PCs upstream KVM/ARM could not handle (ISV=0).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import capstone

from mmiosplit.v1 import vcpu_pb2

__all__ = [
    "KvmRow",
    "TracePrinter",
    "disassemble",
    "exit_to_dict",
    "format_exit",
    "format_exit_json",
    "format_kvm_report",
    "insn_bytes",
    "insn_hex",
    "insn_length",
    "kvm_report_rows",
    "kvm_report_to_json",
    "register_name",
]

DISASM_WIDTH = 24
_ISV = 1 << 24  # ESR_ELx.ISS.ISV
_ARM_REG_ALIASES = {13: "sp", 14: "lr", 15: "pc"}

# capstone 5 calls AArch64 ARM64; capstone 6 renamed it AARCH64.
_CS_ARCH_A64 = capstone.CS_ARCH_ARM64 if hasattr(capstone, "CS_ARCH_ARM64") else capstone.CS_ARCH_AARCH64
_CS_LOCK = threading.Lock()  # one capstone handle per ISA, shared by the trace thread and the report


@functools.cache
def _capstone(isa: str) -> Any:
    if isa == "A64":
        return capstone.Cs(_CS_ARCH_A64, capstone.CS_MODE_ARM)
    if isa == "A32":
        return capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_ARM)
    if isa == "T32":
        return capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB)
    raise ValueError(f"unknown ISA {isa!r} (expected A64, A32 or T32)")


def insn_length(isa: str, word: int, length: int = 0) -> int:
    """Bytes of the instruction: given, or 4 except a T32 word that fits in one halfword."""
    if length:
        return length
    return 2 if isa == "T32" and word <= 0xFFFF else 4


def insn_bytes(isa: str, word: int, length: int = 0) -> bytes:
    """The instruction as it sits in (little-endian) memory.

    The service stores a 32-bit T32 instruction as ``(hw1 << 16) | hw2``, the order of the Arm ARM,
    while memory holds hw1 first, each halfword little-endian.
    """
    n = insn_length(isa, word, length)
    if isa == "T32" and n == 4:
        return (word >> 16).to_bytes(2, "little") + (word & 0xFFFF).to_bytes(2, "little")
    return (word & ((1 << (8 * n)) - 1)).to_bytes(n, "little")


def insn_hex(isa: str, word: int, length: int = 0) -> str:
    """The encoding as the Arm ARM and objdump write it: 8 digits, or ``hw1 hw2`` / 4 digits on T32."""
    n = insn_length(isa, word, length)
    if isa == "T32":
        return f"{word >> 16:04x} {word & 0xFFFF:04x}" if n == 4 else f"{word:04x}"
    return f"{word:08x}"


@functools.lru_cache(maxsize=4096)
def disassemble(isa: str, word: int, length: int = 0, pc: int = 0) -> str:
    """capstone's text for one instruction (PC-relative operands resolved against pc)."""
    data = insn_bytes(isa, word, length)
    try:
        with _CS_LOCK:
            insn = next(_capstone(isa).disasm(data, pc, 1), None)
    except (capstone.CsError, ValueError):
        insn = None
    if insn is None or insn.size != len(data):
        return f"(unknown {insn_hex(isa, word, length)})"
    return f"{insn.mnemonic} {insn.op_str}".strip()


def register_name(isa: str, rt: int, sixty_four: bool) -> str:
    """Rt as the assembler names it: W/X (31 = WZR/XZR, never SP, for a transfer register) or r0-r15."""
    if isa == "A64":
        if rt == 31:
            return "xzr" if sixty_four else "wzr"
        return f"{'x' if sixty_four else 'w'}{rt}"
    return _ARM_REG_ALIASES.get(rt, f"r{rt}")


# ----- the exit trace ----------------------------------------------------------------------------------------
def _value_digits(e: vcpu_pb2.ExitTrace) -> int:
    if e.is_write:
        return 2 * max(1, e.size)  # the bytes stored
    return 16 if e.isa == "A64" and e.sixty_four else 8  # the register as written


def format_exit(e: vcpu_pb2.ExitTrace) -> str:
    """One exit on one line: who, where, what instruction, then the access it decoded to."""
    length = insn_length(e.isa, e.instruction, e.instruction_length)
    text = disassemble(e.isa, e.instruction, length, e.pc)
    arrow = "<-" if e.is_write else "->"
    hex_width = 9 if e.isa == "T32" else 8  # T32 lines line up whether the instruction is 16 or 32 bits
    parts = [
        f"#{e.seq} vcpu{e.vcpu_id} pc=0x{e.pc:08x} {e.isa} {insn_hex(e.isa, e.instruction, length):<{hex_width}} "
        f"{text:<{DISASM_WIDTH}}",
        f"{'W' if e.is_write else 'R'} {e.size} @0x{e.address:08x} {e.device or '(unmapped)'} "
        f"{arrow} 0x{e.value:0{_value_digits(e)}x} rt={register_name(e.isa, e.rt, e.sixty_four)}",
    ]
    if not e.is_write:
        parts.append("sign-ext" if e.sign_extend else "zero-ext")
    if e.writeback:
        parts.append(f"wb={e.writeback}")
    if e.syndrome and not e.syndrome & _ISV:
        parts.append("ISV=0")
    if e.outcome and e.outcome != "ok":
        parts.append(f"[{e.outcome}]")
    return " ".join(parts) + f"  ({e.latency_us:.1f} us)"


def exit_to_dict(e: vcpu_pb2.ExitTrace) -> dict[str, Any]:
    """Every field of the message under its proto name, plus the instruction as hex and disassembled."""
    d: dict[str, Any] = {f.name: getattr(e, f.name) for f in e.DESCRIPTOR.fields}
    length = insn_length(e.isa, e.instruction, e.instruction_length)
    d["instruction_hex"] = insn_hex(e.isa, e.instruction, length)
    d["disasm"] = disassemble(e.isa, e.instruction, length, e.pc)
    d["register"] = register_name(e.isa, e.rt, e.sixty_four)
    return d


def format_exit_json(e: vcpu_pb2.ExitTrace) -> str:
    """One JSON object (a JSON-lines record, no newline)."""
    return json.dumps(exit_to_dict(e), separators=(",", ":"))


class TracePrinter:
    """The callback for ``run_vm(on_trace=...)``: writes each exit to a human stream and/or a JSON-lines file."""

    def __init__(self, human: TextIO | None = None, json_lines: TextIO | None = None, newline: str = "\n") -> None:
        self.human = human
        self.json_lines = json_lines
        self.newline = newline  # "\r\n" when the human stream is a terminal in raw mode
        self.count = 0

    def __call__(self, e: vcpu_pb2.ExitTrace) -> None:
        self.count += 1
        if self.human is not None:
            self.human.write(format_exit(e) + self.newline)
        if self.json_lines is not None:
            self.json_lines.write(format_exit_json(e) + "\n")

    def flush(self) -> None:
        for stream in (self.human, self.json_lines):
            if stream is not None:
                stream.flush()


# ----- the KVM compatibility report ----------------------------------------------------------------------------
@dataclass(slots=True)
class KvmRow:
    """One PC of the report, with the counts of every vCPU that hit it summed."""

    pc: int
    isa: str
    instruction: int
    reason: str
    handled: bool
    count: int

    @property
    def status(self) -> str:
        return "decoded by mmiosplit" if self.handled else "refused"

    @property
    def instruction_hex(self) -> str:
        return insn_hex(self.isa, self.instruction)

    @property
    def disasm(self) -> str:
        return disassemble(self.isa, self.instruction, 0, self.pc)


def kvm_report_rows(entries: Iterable[vcpu_pb2.KvmReportEntry]) -> list[KvmRow]:
    """Merge the per-vCPU entries by PC and instruction; most frequent first, then by PC."""
    rows: dict[tuple[int, str, int, bool], KvmRow] = {}
    for e in entries:
        key = (e.pc, e.isa, e.instruction, e.handled)
        row = rows.get(key)
        if row is None:
            rows[key] = KvmRow(e.pc, e.isa, e.instruction, e.reason, e.handled, e.count)
        else:
            row.count += e.count
    return sorted(rows.values(), key=lambda r: (-r.count, r.pc))


def format_kvm_report(entries: Iterable[vcpu_pb2.KvmReportEntry]) -> str:
    """The end-of-run table (plain aligned text, several lines, no trailing newline)."""
    rows = kvm_report_rows(entries)
    if not rows:
        return ("KVM report: every device access had an instruction syndrome (ISV=1); "
                "upstream KVM/ARM would handle them all")
    total = sum(r.count for r in rows)
    title = (f"KVM report: {len(rows)} PC{'s' if len(rows) != 1 else ''} ({total} access{'es' if total != 1 else ''})"
             " that upstream KVM/ARM cannot handle (no instruction syndrome, ISV=0)")
    header = ("PC", "ISA", "instruction", "disassembly", "count", "reason", "mmiosplit")
    table = [header] + [(f"0x{r.pc:08x}", r.isa, r.instruction_hex, r.disasm, str(r.count), r.reason, r.status)
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [title]
    for line in table:
        cells = [cell.rjust(w) if i == 4 else cell.ljust(w)  # the count right-aligned
                 for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def kvm_report_to_json(entries: Iterable[vcpu_pb2.KvmReportEntry]) -> list[dict[str, Any]]:
    """The report as a list of plain objects, in the table's order."""
    return [{"pc": r.pc, "isa": r.isa, "instruction": r.instruction, "instruction_hex": r.instruction_hex,
             "disasm": r.disasm, "count": r.count, "reason": r.reason, "handled": r.handled, "status": r.status}
            for r in kvm_report_rows(entries)]
